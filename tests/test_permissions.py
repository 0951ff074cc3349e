"""Lock files and outputs are created with restrictive permissions (issue 14), whatever the umask:
lock files owner-only (no other local user can open one and hold it to block publishing), outputs
never world-writable nor world-readable, and every entry point tightens the process umask."""
from __future__ import annotations

import datetime as dt
import json
import os
import stat

import pyarrow as pa
import pytest

from jobs.core import locks
from jobs.core import publication as pubs
from jobs.core.io import atomic_write_json, atomic_write_table, atomic_write_text, swap_dir
from jobs.core.settings import DIR_MODE, FILE_MODE, LOCK_DIR_MODE, LOCK_MODE, UMASK, Paths, restrict_umask

D1 = dt.date(2026, 11, 1)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def open_umask():
    """The loosest umask (0): every mode below comes from the code, not from the environment."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_lock_files_are_owner_only_even_when_they_existed_before(tmp_path, open_umask):
    paths = Paths(tmp_path / "var")
    stale = locks.shared_lock_path(paths, "state-gx")
    stale.parent.mkdir(parents=True, mode=0o777)
    stale.write_text("")
    os.chmod(stale, 0o666)                                  # left by an older version, or a hostile user's umask
    with locks.date_lock(paths, D1, "publish"), locks.shared_lock(paths, "state-gx", "validate"), pubs.lock(paths):
        assert mode(locks.date_lock_path(paths, D1)) == LOCK_MODE == 0o600
        assert mode(stale) == LOCK_MODE
        assert mode(pubs.root(paths) / ".lock") == LOCK_MODE
        assert mode(locks.lock_dir(paths)) == LOCK_DIR_MODE == 0o700
        assert json.loads(locks.date_lock_path(paths, D1).read_text())["step"] == "publish"


def test_outputs_are_not_world_writable_or_readable(tmp_path, open_umask):
    out = tmp_path / "var"
    written = [atomic_write_json({"a": 1}, out / "reports" / "dt=2026-11-01" / "summary.json"),
               atomic_write_text("report", out / "reports" / "dt=2026-11-01" / "summary.txt"),
               atomic_write_table(pa.table({"x": [1]}), out / "tokens" / "dt=2026-11-01" / "part-0.parquet")]
    staging = out / "embeddings" / ".tmp-x"
    (staging / "sub").mkdir(parents=True, mode=0o777)
    (staging / "sub" / "part-0.parquet").write_bytes(b"PAR1")
    os.chmod(staging / "sub" / "part-0.parquet", 0o666)
    swap_dir(staging, out / "embeddings" / "dt=2026-11-01")
    written.append(out / "embeddings" / "dt=2026-11-01" / "sub" / "part-0.parquet")
    for f in written:
        assert mode(f) == FILE_MODE == 0o640, f
    for d in (out / "embeddings" / "dt=2026-11-01", out / "embeddings" / "dt=2026-11-01" / "sub"):
        assert mode(d) == DIR_MODE == 0o750, d


def test_the_publication_history_is_created_and_kept_owner_writable_only(tmp_path, open_umask):
    paths = Paths(tmp_path / "var")
    pubs.root(paths).mkdir(parents=True)
    pubs._append_history(paths, {"date": D1.isoformat(), "publication": "p1", "seq": 1})
    f = pubs.root(paths) / "history.jsonl"
    assert mode(f) == FILE_MODE
    os.chmod(f, 0o666)
    pubs._append_history(paths, {"date": D1.isoformat(), "publication": "p2", "seq": 2})
    assert mode(f) == FILE_MODE and [r["publication"] for r in pubs.history(paths)] == ["p1", "p2"]


def test_entry_points_tighten_the_umask_and_never_loosen_it(tmp_path, monkeypatch, open_umask):
    from jobs import validate
    monkeypatch.setenv("FMPIPE_HOME", str(tmp_path / "var"))
    with pytest.raises(FileNotFoundError, match="run tokenize"):     # the CLI path: run_cli, no data yet
        validate.main([f"date={D1}", "build_docs=false"])
    assert os.umask(0o077) == UMASK                          # set by run_cli; read and replaced here
    assert restrict_umask() == 0o077 and os.umask(0) == 0o077   # a stricter umask stays as it is
