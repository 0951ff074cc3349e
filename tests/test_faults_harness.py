"""The fault suite's own machinery: the power-loss harness on a tiny file scenario, and one fault kind end to end."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fault_harness import drop_unsynced, run_step, snapshot_home  # noqa: E402

SCENARIO = r'''
import os
from jobs.core.failpoints import failpoint
home = os.environ["FMPIPE_HOME"]
def write(name, text, sync):
    with open(os.path.join(home, name), "w") as f:
        f.write(text)
        f.flush()
        if sync:
            os.fsync(f.fileno())
def sync_dir():
    fd = os.open(home, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
write("new_unsynced", "lost", False)
write("new_synced", "kept", True)
write("old", "changed but never flushed", False)
write(".c.tmp", "renamed, directory flushed", True)
os.replace(os.path.join(home, ".c.tmp"), os.path.join(home, "c"))
sync_dir()
write(".b.tmp", "renamed, directory not flushed", True)
os.replace(os.path.join(home, ".b.tmp"), os.path.join(home, "b"))
write("late", "written after the last flush", False)
failpoint("test.power_loss")
'''


def test_power_loss_drops_exactly_the_unsynced_writes(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "old").write_text("as before the step")
    (home / "untouched").write_text("same")
    before = snapshot_home(home, tmp_path / "before")
    run = run_step(SimpleNamespace(home=home), SCENARIO, point="test.power_loss", hooked=True)
    assert run.reached, run.stderr_tail
    stats = drop_unsynced(home, before, run.log)

    assert (home / "new_unsynced").read_text() == ""                    # data never flushed: empty file
    assert (home / "new_synced").read_text() == "kept"                  # fsynced: kept
    assert (home / "old").read_text() == "as before the step"           # changed, not flushed: old content
    assert not (home / "b").exists()                                    # rename without directory fsync: reverted
    assert (home / ".b.tmp").read_text() == "renamed, directory not flushed"
    assert (home / "c").read_text() == "renamed, directory flushed"     # rename then directory fsync: kept
    assert (home / "late").read_text() == ""
    assert (home / "untouched").read_text() == "same"
    assert stats["renames_reverted"] == 1 and stats["files_restored"] == 1


def test_enospc_is_raised_at_the_named_flush(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    code = ("import os\nf = open(os.path.join(os.environ['FMPIPE_HOME'], 'x.json'), 'w'); f.write('1'); f.flush()\n"
            "os.fsync(f.fileno())\n")
    r = run_step(SimpleNamespace(home=home), code, enospc="x.json:1")
    assert r.rc != 0 and "No space left on device" in r.stderr_tail


def test_an_import_killed_at_its_catalogue_commit_is_restored_by_the_reimport(tmp_path):
    from bench.fault_imports import kill_import_at
    from bench.fault_kinds import Outcome
    o = Outcome("kill9@import.catalogue_committed", "")
    kill_import_at("import.catalogue_committed", False)(SimpleNamespace(root=tmp_path), o)
    assert o.checks and all(o.checks.values()), (o.checks, o.detail)
    assert o.rows_lost == 0
    assert os.listdir(tmp_path)


def test_overlapping_imports_keep_every_title(tmp_path):
    """Found by the fault suite: the second import's catalogue titles were lost when the first import's
    merged catalogue, read before the second wrote, was renamed into place after it."""
    from bench.fault_imports import overlapping_imports
    from bench.fault_kinds import Outcome
    o = Outcome("overlapping_imports", "")
    overlapping_imports(SimpleNamespace(root=tmp_path), o)
    assert o.checks and all(o.checks.values()), (o.checks, o.detail)
    assert o.rows_lost == 0
