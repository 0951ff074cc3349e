"""Import faults for ``bench/faults.py``, on a scratch home of their own (no daily world needed).

Two interaction logs ``a.csv`` and ``b.csv`` touch the same days. Checks: overlapping imports of
both keep every event and every catalogue title; re-importing a file changes nothing; a catalogue
with a duplicate id is refused naming it and writes nothing; kill -9 and power loss at the import's
commit points leave the raw events whole after the re-import.
"""
from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

from bench.fault_harness import drop_unsynced, kill, run_step, snapshot_home, start, wait_reached
from bench.fault_kinds import Outcome
from bench.fault_tables import _parquet_rows
from jobs.core.settings import Paths


def write_logs(root: Path) -> dict[str, Path]:
    """Two logs over the same two days, disjoint users and partly shared items; a catalogue with a duplicate id."""
    out = {}
    for name, users, items in (("a", range(1, 31), range(1, 41)), ("b", range(31, 61), range(21, 61))):
        lines = ["user_id,item_id,timestamp"]
        for u in users:
            for k in range(6):
                item = items[(u * 7 + k * 3) % len(items)]
                lines.append(f"{u},i{item},2026-11-0{1 + k % 2}T{10 + k:02d}:{u % 60:02d}:00Z")
        (root / f"{name}.csv").write_text("\n".join(lines) + "\n")
        out[name] = root / f"{name}.csv"
    cat = ["item_id,title"] + [f"i{i},Title {i}" for i in range(1, 61)] + ["i5,Another title 5"]
    (root / "dup_catalogue.csv").write_text("\n".join(cat) + "\n")
    out["dup_catalogue"] = root / "dup_catalogue.csv"
    return out


def import_code(src: Path, catalogue: Path | None = None) -> str:
    cat = f", catalogue={str(catalogue)!r}, catalogue_map='title_id:item_id,name:title'" if catalogue else ""
    return ("from jobs.tools.event_import import run, ImportConfig; from jobs.core.settings import Paths; "
            f"run(ImportConfig(source={str(src)!r}{cat}), Paths.from_env())")


def raw_rows(paths: Paths) -> Counter:
    return _parquet_rows(list(paths.raw.glob("dt=*/*.parquet")))


def titles(paths: Paths) -> set[str]:
    import pyarrow.parquet as pq
    return set(pq.read_table(paths.catalogue, columns=["title_id"])["title_id"].to_pylist()) if paths.catalogue.exists() else set()


def scratch(w, name: str) -> tuple[Paths, dict[str, Path]]:
    home = w.root / f"{name}-home"
    home.mkdir()
    logs_dir = w.root / f"{name}-logs"
    logs_dir.mkdir()
    return Paths(home), write_logs(logs_dir)


def clean_import(w, logs: dict[str, Path], names: tuple[str, ...]) -> tuple[Counter, set]:
    """The raw rows and titles a clean, sequential import of ``names`` gives (the reference)."""
    ref = Paths(w.root / f"ref-import-{'-'.join(names)}-{len(list(w.root.iterdir()))}")
    ref.home.mkdir()
    for n in names:
        r = run_step(ref, import_code(logs[n]))
        assert r.rc == 0, r.stderr_tail
    out = raw_rows(ref), titles(ref)
    shutil.rmtree(ref.home, ignore_errors=True)
    return out


def compare(o: Outcome, paths: Paths, ref: tuple[Counter, set], label: str) -> None:
    got_rows, got_titles = raw_rows(paths), titles(paths)
    lost = sum((ref[0] - got_rows).values()) + len(ref[1] - got_titles)
    o.rows_lost += lost
    o.lost_by_table.update({f"raw/catalogue {label}": lost} if lost else {})
    o.checks[f"raw_and_catalogue_whole_{label}"] = lost == 0 and got_rows == ref[0] and got_titles == ref[1]


def overlapping_imports(w, o: Outcome) -> None:
    """a.csv pauses between writing its merged catalogue and renaming it; b.csv imports meanwhile."""
    paths, logs = scratch(w, "overlap")
    first, marker, _, _ = start(paths, import_code(logs["a"]), point="io.before_rename:catalogue.parquet",
                                env_extra={"FMPIPE_FAILPOINT_PAUSE_S": "8"})
    try:
        o.checks["first_paused_mid_import"] = wait_reached(first, marker)
        r = run_step(paths, import_code(logs["b"]))
        o.checks["second_ran"] = r.rc == 0
        if r.rc != 0:
            o.detail = r.stderr_tail[-200:]
        first.wait(timeout=300)
        o.checks["first_finished"] = first.returncode == 0
    finally:
        kill(first)
    compare(o, paths, clean_import(w, logs, ("a", "b")), "after_both")


def reimport_same_file(w, o: Outcome) -> None:
    paths, logs = scratch(w, "reimport")
    run_step(paths, import_code(logs["a"]))
    before = raw_rows(paths), titles(paths)
    files = sorted(p.relative_to(paths.home) for p in paths.raw.rglob("*.parquet"))
    r = run_step(paths, import_code(logs["a"]))
    o.checks["reimport_ran"] = r.rc == 0
    o.checks["same_files"] = files == sorted(p.relative_to(paths.home) for p in paths.raw.rglob("*.parquet"))
    compare(o, paths, before, "after_reimport")


def duplicate_catalogue_ids(w, o: Outcome) -> None:
    paths, logs = scratch(w, "dupcat")
    run_step(paths, import_code(logs["a"]))
    before = raw_rows(paths), titles(paths)
    r = run_step(paths, import_code(logs["b"], logs["dup_catalogue"]))
    o.checks["refused"] = r.rc != 0
    o.checks["names_the_id"] = "i5" in r.stderr_tail
    o.detail = r.stderr_tail[-180:]
    compare(o, paths, before, "after_refusal")


def kill_import_at(point: str, power: bool) -> callable:
    """Re-import a.csv (b.csv already in), killed at ``point`` (with power loss if ``power``); then re-import."""
    def fault(w, o: Outcome) -> None:
        paths, logs = scratch(w, point.replace(".", "_") + ("-pl" if power else ""))
        for n in ("a", "b"):
            run_step(paths, import_code(logs[n]))
        before = snapshot_home(paths.home, w.root / f"{paths.home.name}.before") if power else None
        r = run_step(paths, import_code(logs["a"]), point=point, hooked=power)
        o.checks["killed_at_failpoint"] = r.reached
        if power:
            stats = drop_unsynced(paths.home, before, r.log)
            o.detail = ", ".join(f"{k} {v}" for k, v in stats.items() if v)
            shutil.rmtree(before, ignore_errors=True)
        r = run_step(paths, import_code(logs["a"]))
        o.checks["reimport_ran"] = r.rc == 0
        compare(o, paths, clean_import(w, logs, ("a", "b")), "after_reimport")
    return fault
