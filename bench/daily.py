"""The daily run at scale: generate a world, then run the daily DAG's steps for two consecutive days
and record, per step, wall time, CPU time (this process and its children, Spark's JVM included),
peak RSS of the process tree, and bytes written; for embed also the history row groups and bytes
it read of the state's total (``fm.stream.history_scan``).

    .venv/bin/python bench/daily.py --quick                      # 10k profiles (~10 min here)
    .venv/bin/python bench/daily.py --profiles 100000 --titles 5000
    .venv/bin/python bench/daily.py --profiles 1000000 --titles 20000 --sessions 4   # ~10M events/day

What runs is the product: ``jobs.tools.generate``, a ``full`` tokenize backfill and a short ``fmpipe
train`` to set up (timed, not part of the per-day figures), then for each of the last two days the
same functions the DAG's tasks call (``jobs.pipeline.check_raw`` ... ``report``), each in a fresh
Python process as an Airflow task runs (so a step's peak RSS is its own). The machine is
shared and noisy, so a fixed single-thread matmul is timed at the start and the end (``anchor_s``)
and each step's wall time is also given in anchor units. Writes ``bench/results/daily[_quick].md``
/ ``.json`` (commit, command, machine, load) and prints one JSON line.
"""
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import psutil  # noqa: E402

from bench.common import PeakRSS, emit  # noqa: E402

MODEL_SHAPE = ("d_model", "n_layers", "n_heads", "max_len")
STEPS = ("check_raw", "tokenize", "embed", "validate", "publish", "index", "report")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10k profiles, 1,000 titles")
    ap.add_argument("--profiles", type=int, default=100_000)
    ap.add_argument("--titles", type=int, default=5_000)
    ap.add_argument("--days", type=int, default=4, help="generated days (the last two are measured)")
    ap.add_argument("--sessions", type=float, default=1.2, help="sessions per active profile and day")
    ap.add_argument("--train-budget-s", type=float, default=None,
                    help="set-up training, wall seconds (default 60 s per 100k profiles, at least 60)")
    ap.add_argument("--worlds", default=str(Path(_HERE) / ".work" / "worlds"),
                    help="cache of generated worlds, keyed by the generator's config ('' : always generate)")
    ap.add_argument("--work", default=str(Path(_HERE) / ".work" / "daily"))
    ap.add_argument("--out", default=str(Path(_HERE) / "results"))
    ap.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)      # internal: one step in its own process
    ap.add_argument("--day", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.days < 3:
        ap.error(f"--days {a.days}: at least 3 (the days before the last two are the history the measured days build on)")
    if a.quick:
        a.profiles, a.titles = 10_000, 1_000
    return a


def anchor_s() -> float:
    """Seconds for a fixed single-thread workload: the machine's speed right now."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    x = torch.randn(384, 384, generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    for _ in range(200):
        x = torch.tanh(x @ x / 20.0)
    torch.set_num_threads(n)
    return time.perf_counter() - t


def _tree() -> list[psutil.Process]:
    me = psutil.Process()
    return [me, *me.children(recursive=True)]


def _counters() -> tuple[float, int]:
    """(CPU seconds, bytes written) of this process and its live children."""
    cpu, written = 0.0, 0
    for p in _tree():
        try:
            t = p.cpu_times()
            cpu += t.user + t.system
            written += p.io_counters().write_bytes
        except (psutil.Error, AttributeError):
            continue
    return cpu, written


def measured(fn) -> tuple[object, dict]:
    """Run ``fn`` and return its result with wall s, CPU s, peak RSS (MB) and bytes written."""
    cpu0, w0 = _counters()
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        out = fn()
    cpu1, w1 = _counters()
    return out, {"wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(cpu1 - cpu0, 2),
                 "peak_rss_mb": rss.mb, "written_mb": round((w1 - w0) / 2**20, 1)}


def world(args, paths) -> dict:
    """Generate the world into the run's home, or copy it from the cache of worlds generated with
    the same ``GenerateConfig`` (the generator is deterministic for a config: a 1M-profile world
    takes ~30 min of Python to generate, and it is set-up, not part of the daily figures)."""
    from dataclasses import asdict

    from jobs.tools import generate
    cfg = generate.GenerateConfig(days=args.days, profiles=args.profiles, titles=args.titles,
                                  sessions_per_day=args.sessions, malformed_per_day=5)
    key = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(args.worlds) / key if args.worlds else None
    made = cache / "world.json" if cache else None
    if made is not None and made.exists():
        shutil.copytree(cache / "raw", paths.raw)
        shutil.copytree(cache / "catalogue", paths.catalogue.parent)
        return {**json.loads(made.read_text())["generate"], "reused_from": str(cache)}
    _, gen = measured(lambda: generate.run(cfg, paths))
    if cache is not None:
        tmp = cache.with_name(cache.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(paths.raw, tmp / "raw")
        shutil.copytree(paths.catalogue.parent, tmp / "catalogue")
        (tmp / "world.json").write_text(json.dumps({"config": asdict(cfg), "generate": gen}, indent=1))
        shutil.rmtree(cache, ignore_errors=True)
        tmp.rename(cache)
    return gen


def setup(args, paths) -> tuple[list[str], dict]:
    """World, backfill of history up to the day before the measured days, a short training."""
    from jobs import tokenize, train
    if paths.home.exists():
        shutil.rmtree(paths.home)
    paths.home.mkdir(parents=True)
    gen = world(args, paths)
    days = sorted(p.name[3:] for p in paths.raw.glob("dt=*"))
    budget = args.train_budget_s or max(60.0, 60.0 * args.profiles / 100_000)
    _, tok = measured(lambda: tokenize.run(tokenize.TokenizeConfig(date=days[-3], full=True), paths))
    out, trn = measured(lambda: train.run(train.TrainJobConfig(date=days[-3], time_budget_s=budget,
                                                               clock="wall", promote="always"), paths))
    model = json.loads((Path(out["path"]) / "config.json").read_text())
    trn.update(budget_wall_s=budget, model_version=out["model_version"], n_params=out["n_params"],
               epochs=out.get("epochs"), shape={k: model["model_config"].get(k) for k in MODEL_SHAPE})
    return days[-2:], {"generate": gen, "backfill_tokenize": tok, "train": trn}


def history_read(day: str) -> dict:
    """What embed read of the day's history state (footers only): row groups, compressed bytes."""
    import datetime as dt

    from fm.stream import history_scan
    from jobs.core.io import partition
    from jobs.core.settings import Paths
    d = dt.date.fromisoformat(day)
    return history_scan(partition(Paths.from_env().history, d), d)


def one_step(step: str, day: str) -> dict:
    """One step of one day in this process, measured (``--step``: what :func:`run_day` runs per task)."""
    from jobs import pipeline
    result, m = measured(lambda: getattr(pipeline, step)(day))
    if step == "tokenize":
        m["raw_events"], m["profiles_active"] = result.get("raw_events"), result.get("profiles_active")
    if step == "embed":
        m["history_read"] = history_read(day)
    if step == "publish":
        m["profile_rows_per_s"] = result.get("profile_rows_per_s")
    return m


def run_day(day: str) -> dict:
    """Each step in a fresh Python process, as the DAG's tasks run under Airflow's executors: its
    peak RSS is that task's (its Spark JVM included), not a long-lived driver's accumulated heap.
    ``wall_s`` is the whole process (start-up and imports included, as a task pays them)."""
    out = {}
    for step in STEPS:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--step", step, "--day", day],
                              stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"daily bench: step {step} of {day} failed (exit {proc.returncode}); its log is above")
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        m["wall_in_step_s"], m["wall_s"] = m["wall_s"], round(time.perf_counter() - t0, 2)
        out[step] = m
    return out


def embed_fraction(quick: bool) -> dict:
    """The production shape's embed rate over the matmul bound, timed now, on this run's machine state.

    The default model of the daily run is small (I/O decides its embed time), so the bound fraction
    the issue asks for is measured on the production shape (``bench.embed_timing.REALISTIC``: d 256, 4
    layers, 512 events) with ``bench/embed.py``'s interleaved rounds: matmul window, then one pass of
    the production encoder (``fm.stream.embed_batches``); the median over rounds of the ratio."""
    import torch

    from bench.embed_timing import REALISTIC, bench_context, make_model
    r = bench_context(make_model(REALISTIC), REALISTIC["max_len"], 16 if quick else 48, 3 if quick else 5,
                      torch.device("cpu"), False, 2048)
    return {"shape": {k: REALISTIC[k] for k in ("d_model", "n_layers", "n_heads", "max_len")},
            "profiles_per_s": round(r["fast_profiles_per_s"], 2), "matmul_gflops": round(r["matmul_flops_during"] / 1e9, 1),
            "fraction_median_of_rounds": round(r["fast_ratio_median_of_rounds"], 3)}


def publish_fraction(paths, rows_per_s: float | None) -> dict:
    """Day 2's profile write rate over plain ``sqlite3`` inserting the same online rows (one
    transaction, no Feast, no protobuf; ``bench.publish.raw_sqlite``), timed right after the run."""
    import tempfile

    from bench.publish import raw_sqlite
    from jobs.core.feast_store import sqlite_online_path
    db = sqlite_online_path(paths)
    if db is None or not rows_per_s:
        return {"fraction": None, "why": "online store is not SQLite" if db is None else "no publish rate"}
    with tempfile.TemporaryDirectory() as scratch:
        raw = raw_sqlite(db, Path(scratch))
    return {"ours_rows_per_s": rows_per_s, **raw,
            "fraction": round(rows_per_s / raw["sqlite_raw_rows_per_s"], 3)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.step:
        res = one_step(args.step, args.day)
        emit(res)
        return res
    from bench.quality import provenance
    from jobs.core.settings import Paths
    paths = Paths(Path(args.work) / ("quick" if args.quick else f"p{args.profiles}"))
    os.environ["FMPIPE_HOME"] = str(paths.home)
    prov = provenance(argv)
    prov["command"] = prov["command"].replace("bench/quality.py", "bench/daily.py")
    a0 = anchor_s()
    days, prep = setup(args, paths)
    per_day = {d: run_day(d) for d in days}
    bounds = {"embed": embed_fraction(args.quick),
              "publish": publish_fraction(paths, per_day[days[-1]]["publish"].get("profile_rows_per_s"))}
    a1 = anchor_s()
    anchor = (a0 + a1) / 2
    for steps in per_day.values():
        for m in steps.values():
            m["wall_anchor_units"] = round(m["wall_s"] / anchor, 2)
    res = {**prov, "loadavg_end": [round(x, 2) for x in os.getloadavg()], "profiles": args.profiles,
           "titles": args.titles, "setup": prep, "days": per_day, "bounds": bounds, "anchor_s": [round(a0, 3), round(a1, 3)],
           "day_wall_s": {d: round(sum(m["wall_s"] for m in s.values()), 1) for d, s in per_day.items()}}
    day2 = per_day[days[-1]]
    res["summary"] = {
        "profiles": args.profiles, "events": day2["tokenize"].get("raw_events"),
        "model": {k: prep["train"].get(k) for k in ("model_version", "shape", "n_params", "epochs")},
        "day2_wall_s": res["day_wall_s"][days[-1]],
        "peak_rss_gib": round(max(m["peak_rss_mb"] for m in day2.values()) / 1024, 2),
        "steps": {k: {"wall_s": m["wall_s"], "cpu_s": m["cpu_s"]} for k, m in day2.items()},
        "embed_history_read": day2["embed"].get("history_read"),
        "embed_fraction_of_bound": bounds["embed"]["fraction_median_of_rounds"],
        "publish_fraction_of_raw_sqlite": bounds["publish"]["fraction"],
        "anchor_s": res["anchor_s"]}
    write(res, args)
    emit(res["summary"])
    return res


def write(res: dict, args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = f"{args.profiles // 1_000_000}m" if args.profiles % 1_000_000 == 0 else str(args.profiles)
    name = "daily_quick" if args.quick else f"daily_{size}"
    lines = [f"# Daily run at {args.profiles:,} profiles, {args.titles:,} titles", "",
             f"- command: `{res['command']}`; commit `{res['commit']}`",
             f"- machine: {res['machine']}; load {res['loadavg_start']} → {res['loadavg_end']}; anchor (fixed "
             f"single-thread matmul) {res['anchor_s'][0]} s at start, {res['anchor_s'][1]} s at end",
             "- setup (not part of the daily figures): " + ", ".join(
                 f"{k} {v['wall_s']} s" + (f" (copied from {v['reused_from']})" if v.get("reused_from") else "")
                 for k, v in res["setup"].items()),
             ""]
    for day, steps in res["days"].items():
        tok = steps["tokenize"]
        lines += [f"## {day}: {tok.get('raw_events')} raw events, {tok.get('profiles_active')} active profiles", "",
                  "| step | wall s | anchor units | CPU s | peak RSS MB | written MB |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {k} | {m['wall_s']} | {m['wall_anchor_units']} | {m['cpu_s']} | {m['peak_rss_mb']} | {m['written_mb']} |"
                  for k, m in steps.items()]
        lines += [f"| **day** | **{res['day_wall_s'][day]}** | | | | |", ""]
        h = steps["embed"].get("history_read")
        if h:
            lines += [f"embed read {h['row_groups_read']} of {h['row_groups']} history row groups, "
                      f"{h['bytes_read'] / 2**20:.1f} of {h['bytes'] / 2**20:.1f} MB (compressed, columns read), "
                      f"{h['rows_read']:,} of {h['rows']:,} profiles", ""]
    e, p = res["bounds"]["embed"], res["bounds"]["publish"]
    lines += ["## Bounds, measured after the days in the same run", "",
              f"- embed, production shape {e['shape']}: {e['profiles_per_s']} profiles/s, "
              f"**{e['fraction_median_of_rounds']:.0%}** of the matmul bound (median of rounds; matmul "
              f"{e['matmul_gflops']} GFLOP/s)",
              f"- publish: day 2 wrote {p.get('ours_rows_per_s')} profiles/s, plain sqlite3 the same rows "
              f"{p.get('sqlite_raw_rows_per_s')} /s -> **{p['fraction']}** of raw SQLite" if p.get("fraction") is not None
              else f"- publish: not compared ({p.get('why')})", ""]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{name}.json").write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
