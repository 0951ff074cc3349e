"""What embed reads of the history state, before and after issue 16's layout, on one generated world.

    .venv/bin/python bench/history_layout.py                       # 20k profiles, 4 days
    .venv/bin/python bench/history_layout.py --profiles 50000 --active-prob 0.2

Generates one world, then builds the history state of the last day twice from the same raw days
(a ``full`` tokenize of the second-last day, then the last day incrementally, as the DAG does):

* ``before``: the previous layout, files sorted by ``profile_id`` with Parquet's default row groups
  (the module's settings are set back to those for this run, nothing else differs),
* ``after``: the current layout (:data:`jobs.tokenize.HISTORY_SORT`, bounded row groups).

For each, embed's read of the day (``fm.stream.iter_history(path, day)``) is measured from the
footers (:func:`fm.stream.history_scan`: row groups and compressed bytes of the columns read, kept
vs total) and timed, and the profiles it yields (and their tokens) are checked to be the same both times. Writes ``bench/results/history_layout_<profiles>_a<active_prob>.md`` / ``.json`` and prints one JSON line.
"""
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pyarrow as pa  # noqa: E402

from bench.common import emit, provenance, write_results  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", type=int, default=20_000)
    ap.add_argument("--titles", type=int, default=1_000)
    ap.add_argument("--days", type=int, default=4)
    ap.add_argument("--active-prob", type=float, default=0.6, help="share of profiles active each day (generator)")
    ap.add_argument("--work", default=str(Path(_HERE) / ".work" / "history_layout"))
    ap.add_argument("--out", default=str(Path(_HERE) / "results"))
    return ap.parse_args(argv)


def build(layout: str, paths, days: list[str], spark) -> float:
    """Tokenize into ``paths`` with the given layout; returns the wall seconds of the two runs."""
    from jobs import tokenize
    saved = tokenize.HISTORY_SORT, tokenize.history_write_options
    if layout == "before":
        tokenize.HISTORY_SORT, tokenize.history_write_options = ("profile_id",), dict
    try:
        t = time.perf_counter()
        tokenize.run(tokenize.TokenizeConfig(date=days[-2], full=True), paths, spark)
        tokenize.run(tokenize.TokenizeConfig(date=days[-1]), paths, spark)
        return time.perf_counter() - t
    finally:
        tokenize.HISTORY_SORT, tokenize.history_write_options = saved


def measure(path: Path, day: dt.date) -> tuple[dict, list[int], pa.Table]:
    from fm.stream import history_scan, iter_history
    scan = history_scan(path, day)
    t = time.perf_counter()
    batches = list(iter_history(path, day))
    scan["read_s"] = round(time.perf_counter() - t, 3)
    table = pa.Table.from_batches(batches)
    scan["profiles_active"] = table.num_rows
    scan["row_groups_read_frac"] = round(scan["row_groups_read"] / scan["row_groups"], 4)
    scan["bytes_read_frac"] = round(scan["bytes_read"] / scan["bytes"], 4)
    scan["active_frac"] = round(table.num_rows / scan["rows"], 4)
    return scan, table["profile_id"].to_pylist(), table


def main(argv=None) -> dict:
    args = parse_args(argv)
    from jobs.tools import generate
    from jobs.core.io import partition
    from jobs.core.settings import Paths
    from jobs.core.spark import get_spark
    prov = provenance("bench/history_layout.py", argv)
    t0 = time.perf_counter()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    src = Paths(work / "world")
    cfg = generate.GenerateConfig(days=args.days, profiles=args.profiles, titles=args.titles,
                                  active_prob=args.active_prob, malformed_per_day=5)
    generate.run(cfg, src)
    days = sorted(p.name[3:] for p in src.raw.glob("dt=*"))
    day = dt.date.fromisoformat(days[-1])
    spark = get_spark("fmpipe-bench-history-layout")
    res = {**prov, "profiles": args.profiles, "titles": args.titles, "days": days, "active_prob": args.active_prob,
           "layouts": {}}
    tables, orders = {}, {}
    for layout in ("before", "after"):
        paths = Paths(work / layout)
        shutil.copytree(src.home, paths.home)
        tok_s = build(layout, paths, days, spark)
        scan, orders[layout], tables[layout] = measure(partition(paths.history, day), day)
        scan["tokenize_two_days_s"] = round(tok_s, 1)
        res["layouts"][layout] = scan
    spark.stop()
    # Same profiles and tokens; the order across files may differ, since AQE coalesces the shuffle
    # partitions into files by their byte sizes, which follow the previous state's layout.
    res["same_content"] = tables["before"].sort_by("profile_id").equals(tables["after"].sort_by("profile_id"))
    res["same_profiles_same_order"] = orders["before"] == orders["after"]
    b, a = res["layouts"]["before"], res["layouts"]["after"]
    res["loadavg_end"], res["wall_s"] = [round(x, 2) for x in os.getloadavg()], time.perf_counter() - t0
    res["summary"] = {"profiles": args.profiles, "active_frac": a["active_frac"],
                      "before": {k: b[k] for k in ("row_groups_read", "row_groups", "bytes_read", "bytes", "read_s")},
                      "after": {k: a[k] for k in ("row_groups_read", "row_groups", "bytes_read", "bytes", "read_s")},
                      "same_profiles_same_order": res["same_profiles_same_order"], "same_content": res["same_content"]}
    write(res, args)
    emit(res["summary"])
    return res


def write(res: dict, args) -> None:
    Path(args.out).mkdir(parents=True, exist_ok=True)
    lines = [f"# Embed's history read of {res['days'][-1]}: {args.profiles:,} profiles, active_prob {args.active_prob}", "",
             f"Embed's profiles and their tokens identical before/after: {res['same_content']}; in the same order: "
             f"{res['same_profiles_same_order']} (files are coalesced shuffle partitions, grouped by byte size).", "",
             "| layout | files | row groups read / total | MB read / total (compressed, columns read) | rows read / total "
             "| active profiles | iter_history s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for k, m in res["layouts"].items():
        lines.append(f"| {k} | {m['files']} | {m['row_groups_read']} / {m['row_groups']} | {m['bytes_read'] / 2**20:.1f} / "
                     f"{m['bytes'] / 2**20:.1f} | {m['rows_read']:,} / {m['rows']:,} | {m['profiles_active']:,} | "
                     f"{m['read_s']} |")
    lines += ["", "(``tokenize_two_days_s`` in the JSON is not a layout comparison: the first layout built "
              "also warms the JVM up.)"]
    write_results(args.out, f"history_layout_{args.profiles}_a{args.active_prob}", [*lines, ""], res)


if __name__ == "__main__":
    main()
