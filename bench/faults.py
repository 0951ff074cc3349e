"""Fault suite: break the daily pipeline at exact write boundaries and check nothing is lost or half-served.

Builds a small world, publishes "yesterday" (day D-1), runs an undisturbed reference for day D in a
copy, then for each fault starts again from the yesterday snapshot, injects the fault and checks:

* while the fault is in effect, consumers are served one whole publication — yesterday's or today's,
  whichever the commit point implies: the pointer, every online row of every view and layer, and
  the current indexes (:func:`bench.fault_tables.served`);
* where the run must fail, the failure names the cause;
* after the cause is gone, a re-run leaves every table equal to the reference: ``rows_lost`` counts
  reference rows missing or different over raw, tokens, quarantine, vocab, catalogue, history,
  offline ``published/`` (each view), online (each view and layer) and the indexes.

The kinds (:mod:`bench.fault_kinds`, :mod:`bench.fault_inputs`, :mod:`bench.fault_imports`): kill -9
at every failpoint of the commit paths, simulated power loss (:mod:`bench.fault_harness`), ENOSPC at
each write site, torn journal, empty pointer, crash loop, old-date re-runs, backfill, rollback then
re-run, two CLI runs at once, late events, overlapping imports, re-imports, duplicate catalogue ids,
and the input faults. Then a reader process does >= 10,000 reads while >= 20 publishes, rollbacks
and crashes happen (:mod:`bench.fault_reader`). Redis kinds run only where ``redis-server`` exists
(reported as skipped otherwise, not as survived).

    .venv/bin/python bench/faults.py --quick            # a few kinds + a short reader phase (minutes)
    .venv/bin/python bench/faults.py                    # every kind, 10,000 reads
    .venv/bin/python bench/faults.py --only kill9@publish.swapped,torn_journal --reads 0

Last output line: one JSON object with faults_tried, faults_survived, rows_lost, reader_reads,
reader_mixed_reads; a Markdown table is written to bench/results/faults.md (--quick: faults_quick.md,
--only: faults_only.md).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from bench import fault_imports as imp  # noqa: E402
from bench import fault_redis as fr  # noqa: E402
from bench import fault_inputs as inp  # noqa: E402
from bench import fault_kinds as k  # noqa: E402
from bench.common import emit, provenance  # noqa: E402
from bench.fault_tables import rows_lost, served, table_rows  # noqa: E402
from jobs.core.settings import Paths  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WORLD = {"profiles": 200, "titles": 150, "days": 4, "new_titles_per_day": 4, "seed": 11}

Y, T = "yesterday", "today"
KILL = [  # (failpoint, first step of the day it lies in, what consumers must be served after the kill)
    ("tokenize.vocab_grown", "tokenize", Y), ("io.renamed:titles.parquet", "tokenize", Y),
    ("io.swap_dir.aside:tokens/dt={D}", "tokenize", Y), ("tokenize.tokens_committed", "tokenize", Y),
    ("io.swap_dir.aside:history/dt={D}", "tokenize", Y), ("tokenize.history_committed", "tokenize", Y),
    ("tokenize.history_gc_done", "tokenize", Y),
    ("io.swap_dir.aside:profile/dt={D}", "embed", Y), ("embed.profiles_committed", "embed", Y), ("embed.committed", "embed", Y),
    ("validate.invalidated", "validate", Y), ("io.before_rename:summary.json", "validate", Y), ("validate.verdict_written", "validate", Y),
    ("publish.staged_view", "publish", Y), ("index.write:titles.faiss", "publish", Y), ("publish.index_built", "publish", Y),
    ("publish.swap.uncommitted", "publish", Y), ("publish.swapped", "publish", T), ("publish.settle.manifest#2", "publish", T),
    ("io.before_rename:CURRENT.json", "publish", T), ("publish.settle.pointer#2", "publish", T),
    ("publish.journal.unsynced", "publish", T), ("publish.settle.journal#2", "publish", T), ("published.placed", "publish", T),
    ("published.before_state#2", "publish", T), ("publish.gc.online_dropped", "publish", T), ("io.renamed:publish.json", "publish", T),
]
POWER = [("tokenize.history_committed", "tokenize", Y), ("embed.committed", "embed", Y), ("validate.verdict_written", "validate", Y),
         ("publish.index_built", "publish", Y), ("publish.swapped", "publish", T), ("publish.settle.journal#2", "publish", T)]
ENOSPC = [("vocab/", "tokenize", Y), ("tokens/", "tokenize", Y), ("quarantine/", "tokenize", Y), ("history/", "tokenize", Y),
          ("embeddings/profile", "embed", Y), ("embeddings/title", "embed", Y), ("gx/results", "validate", Y),
          ("publications/", "publish", Y), ("CURRENT.json", "publish", T), ("history.jsonl", "publish", T),
          ("published/", "publish", T), ("reports/dt={D}/steps/.publish.json", "publish", T)]


def _world(fn):
    return ("world", fn)


FAULTS: dict[str, tuple[str, tuple]] = {
    **{f"kill9@{p}": (f"kill -9 there: {s} served whole; re-run equals reference", _world(k.kill_at(p, step, s))) for p, step, s in KILL},
    **{f"kill9@{p}": (f"kill -9 there: {s} served whole; rollback re-run, release, day re-run", _world(k.kill_rollback(p, s)))
       for p, s in (("rollback.staged", T), ("rollback.committed", Y), ("rollback.release", Y))},
    **{f"power_loss@{p}": (f"unsynced writes dropped: {s} served whole; re-run equals reference", _world(k.power_loss_at(p, step, s)))
       for p, step, s in POWER},
    **{f"enospc@{site}": (f"fails naming no space: {s} served whole; re-run equals reference", _world(k.enospc_at(site, step, s)))
       for site, step, s in ENOSPC},
    "torn_journal": ("torn history.jsonl line skipped: day publishes", _world(k.torn_journal)),
    "empty_current_json": ("pointer recovered from the SQLite record", _world(k.empty_current)),
    "crash_loop": ("killed after commit, then twice during recovery: today whole throughout", _world(k.crash_loop)),
    "rerun_old_date": ("yesterday re-run after today: no-op or refused, serving stays today", _world(k.rerun_old_date)),
    "backfill_over_existing": ("backfill yesterday..today over published state: same result", _world(k.backfill_over)),
    "rollback_then_rerun": ("rollback pins yesterday; re-run refused until release; then reference", _world(k.rollback_then_rerun)),
    "two_cli_runs": ("second fmpipe publish exits 75 naming the holder", _world(k.two_cli_runs)),
    "late_events": ("late events of a published day: today publishes; backfill brings them in", _world(k.late_events)),
    "overlapping_imports": ("two imports of one day at once: every event and title kept", ("scratch", imp.overlapping_imports)),
    "reimport_same_file": ("re-importing a file changes nothing", ("scratch", imp.reimport_same_file)),
    "duplicate_catalogue_ids": ("refused naming the id, nothing written", ("scratch", imp.duplicate_catalogue_ids)),
    "kill9@import.old_files_removed": ("re-import killed there: re-import restores", ("scratch", imp.kill_import_at("import.old_files_removed", False))),
    "kill9@import.catalogue_committed": ("import killed there: re-import restores", ("scratch", imp.kill_import_at("import.catalogue_committed", False))),
    "power_loss@import.raw_committed": ("unsynced writes dropped: re-import restores", ("scratch", imp.kill_import_at("import.raw_committed", True))),
    "redis_killed_mid_publish": ("redis-server kill -9 mid-publish: clear failure, yesterday whole after restart, "
                                 "re-run serves today", ("redis", fr.killed_mid_publish)),
    "redis_flushed": ("FLUSHALL after publishing: the re-run re-seeds the served state byte for byte",
                      ("redis", fr.flushed)),
    "empty_day": ("fails clearly, nothing published", _world(inp.input_fault(lambda t: t.slice(0, 0), r"no profiles active"))),
    "missing_partition": ("fails first step naming the path", _world(inp.input_fault(lambda t: None, r"raw partition missing for .*raw/dt="))),
    "wrong_column_types": ("fails naming the column", _world(inp.input_fault(inp._wrong_types, r"column 'row_position' has type string"))),
    "future_timestamps": ("quarantined", _world(inp.input_fault(inp._future, None, inp.counts("future_ts", 10)))),
    "duplicate_events": ("deduplicated", _world(inp.input_fault(inp._dup, None, inp.counts("duplicates", 25)))),
    "unknown_titles": ("quarantined", _world(inp.input_fault(inp._unknown_titles, None, inp.counts("unknown_title", 10)))),
    "profile_100k_events": ("handled, history capped", _world(inp.input_fault(inp._heavy_profile, None, inp.heavy_check))),
    "nan_embeddings": ("gate blocks, yesterday serves", _world(inp.nan_embeddings)),
    "corrupt_checkpoint": ("clear error, nothing published", _world(inp.corrupt_checkpoint)),
    "disk_full_tmpfs": ("embeddings on a 64 KiB tmpfs: clear failure", _world(inp.disk_full)),
}
QUICK = ("kill9@tokenize.history_committed", "kill9@publish.swap.uncommitted", "kill9@publish.swapped",
         "power_loss@publish.swapped", "enospc@CURRENT.json", "torn_journal", "two_cli_runs", "reimport_same_file")


@dataclass
class World:
    root: Path
    base: Paths
    validated: Paths
    reference: Paths
    yesterday: dt.date
    day: dt.date
    served_y: dict
    served_t: dict
    ref_rows: dict


def use(paths: Paths) -> Paths:
    os.environ["FMPIPE_HOME"] = str(paths.home)
    return paths


def setup(root: Path) -> World:
    """World + yesterday published + the undisturbed reference for today."""
    from jobs.tools import generate
    from jobs import pipeline, tokenize, train
    base = use(Paths(root / "base"))
    generate.run(generate.GenerateConfig(**WORLD), base)
    days = sorted(dt.date.fromisoformat(p.name[3:]) for p in base.raw.glob("dt=*"))
    yesterday, today = days[-2], days[-1]
    tokenize.run(tokenize.TokenizeConfig(date=days[-3].isoformat(), full=True), base)
    train.run(train.TrainJobConfig(date=days[-3].isoformat(), time_budget_s=5, max_epochs=3, d_model=64), base)
    pipeline.run_all(yesterday.isoformat())
    served_y = served(base)
    ref = use(Paths(root / "reference"))
    shutil.copytree(base.home, ref.home)
    pipeline.run_all(today.isoformat())
    validated = use(Paths(root / "validated"))               # today checked, tokenized, embedded, validated
    shutil.copytree(base.home, validated.home)
    for step in ("check_raw", "tokenize", "embed", "validate"):
        getattr(pipeline, step)(today.isoformat())
    w = World(root, base, validated, ref, yesterday, today, served_y, served(ref), table_rows(ref))
    use(base)
    return w


def run_fault(name: str, w: World) -> k.Outcome:
    expectation, (kind, fn) = FAULTS[name]
    o = k.Outcome(name, expectation)
    if kind == "redis":
        why = fr.available()
        if why:
            o.skipped, o.detail = True, f"skipped: {why} (not counted as survived)"
            return o
        kind = "scratch"
    paths = Paths(w.root / name.replace("/", "_").replace(":", "_").replace("#", "_").replace("{", "").replace("}", ""))
    try:
        if kind == "scratch":
            o.compare = None
            fn(w, o)
        else:
            src = w.validated if getattr(fn, "base", "base") == "validated" else w.base
            shutil.copytree(src.home, paths.home)
            use(paths)
            fn(w, paths, o)
            if o.compare is not None:
                got = table_rows(paths)
                ref = {t: c for t, c in w.ref_rows.items() if not o.compare or t in o.compare}
                o.lost_by_table = rows_lost(ref, got)
                o.rows_lost = sum(o.lost_by_table.values())
                o.checks["no_rows_lost"] = o.rows_lost == 0
                if not o.compare:
                    o.checks["serves_reference_after_rerun"] = k.same_serving(served(paths), w.served_t)
        o.survived = bool(o.checks) and all(o.checks.values())
    except Exception as e:                                           # noqa: BLE001
        o.detail = f"harness: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        o.survived = False
        traceback.print_exc()
    finally:
        use(w.base)
        shutil.rmtree(paths.home, ignore_errors=True)
    return o


def write_table(outcomes: list[k.Outcome], reader: dict, prov: dict, wall_s: float, name: str) -> None:
    lines = ["# Fault suite results", "", f"Commit: {prov['commit']}  ", f"Command: `{prov['command']}`  ",
             f"Machine: {prov['machine']}  ", f"Load (1/5/15 min) at start: {prov['loadavg_start']}, at end: "
             f"{[round(x, 2) for x in os.getloadavg()]}  ", f"Wall time: {wall_s:.0f} s", "",
             f"Tried {sum(not o.skipped for o in outcomes)}, survived {sum(o.survived for o in outcomes)}, skipped "
             f"{sum(o.skipped for o in outcomes)}; rows lost {sum(o.rows_lost for o in outcomes)}.", ""]
    if reader:
        lines += [f"Reader: {reader.get('reader_reads')} reads, {reader.get('reader_mixed_reads')} mixed, "
                  f"{reader.get('reader_retries')} retried (pointer moved during the read), {reader.get('reader_errors')} errors, "
                  f"during {reader.get('reader_operations')} operations ({reader.get('reader_publications')} publications).", ""]
    lines += ["Power loss drops writes not fsynced; SQLite files count as durable (SQLite fsyncs from C) and "
              "deletions as durable (lenient).", "",
              "| fault | expected | survived | rows lost | checks | detail |", "|---|---|---|---|---|---|"]
    for o in outcomes:
        checks = ", ".join(f"{c}: {'ok' if v else 'FAIL'}" for c, v in o.checks.items())
        lost = f"{o.rows_lost}" + (f" ({o.lost_by_table})" if o.lost_by_table else "")
        lines.append(f"| {o.name} | {o.expectation} | {'skipped' if o.skipped else 'yes' if o.survived else 'NO'} | {lost} | "
                     f"{checks} | {o.detail.replace('|', '/')[:300]} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated fault names (see FAULTS)")
    ap.add_argument("--reads", type=int, default=None, help="reader phase reads (default 10000, --quick 500, 0: none)")
    ap.add_argument("--ops", type=int, default=None, help="publishes, rollbacks and crashes during the reader phase "
                                                          "(default 20, --quick 6)")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(FAULTS))
        return {}
    names = [n for n in args.only.split(",") if n] or (list(QUICK) if args.quick else list(FAULTS))
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        raise SystemExit(f"unknown fault(s) {unknown}; see --list")
    out_name = "faults_only.md" if args.only else "faults_quick.md" if args.quick else "faults.md"
    reads = args.reads if args.reads is not None else (500 if args.quick else 10_000)
    ops = args.ops if args.ops is not None else (6 if args.quick else 20)
    prov = provenance("bench/faults.py", argv)
    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    outcomes, reader = [], {}
    try:
        w = setup(root)
        if reads:                                 # first: its home is the reference, which no fault touches
            from bench import fault_reader
            reader = fault_reader.run(w, w.reference, reads, ops, lambda m: print(m, flush=True))
            print({kk: v for kk, v in reader.items() if kk != "reader_ops"}, flush=True)
        for name in names:
            outcomes.append(run_fault(name, w))
            o = outcomes[-1]
            print(f"{name:<40} survived={o.survived} skipped={o.skipped} rows_lost={o.rows_lost} {o.checks} {o.detail}", flush=True)
            write_table(outcomes, reader, prov, time.perf_counter() - t0, out_name)     # partial results as it goes
    finally:
        shutil.rmtree(root, ignore_errors=True)
    wall = time.perf_counter() - t0
    write_table(outcomes, reader, prov, wall, out_name)
    tried = [o for o in outcomes if not o.skipped]
    result = {"faults_tried": len(tried), "faults_survived": sum(o.survived for o in tried),
              "faults_skipped": [o.name for o in outcomes if o.skipped], "rows_lost": sum(o.rows_lost for o in outcomes),
              "reader_reads": reader.get("reader_reads", 0), "reader_mixed_reads": reader.get("reader_mixed_reads", 0),
              **{kk: v for kk, v in reader.items() if kk not in ("reader_reads", "reader_mixed_reads", "reader_ops")},
              "failed": [o.name for o in tried if not o.survived], "wall_s": round(wall, 1),
              "commit": prov["commit"], "machine": prov["machine"]}
    emit(result)
    return result


if __name__ == "__main__":
    main()
