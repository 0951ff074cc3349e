"""Fault suite: break the daily pipeline on purpose and check nothing is lost or half-published.

Builds a small world, publishes "yesterday" (day D-1), runs an undisturbed reference for day D in a
copy, then for each fault starts again from the yesterday snapshot, injects the fault, and checks:

* while the fault is in effect yesterday's publication keeps serving (Feast online values and the
  current FAISS index are yesterday's),
* the failure message is clear (names what is wrong) where the run must fail,
* after the cause is removed, a re-run publishes exactly the reference (same vectors, same online
  values, same index) — ``rows_lost`` counts reference rows missing or different afterwards.

    .venv/bin/python bench/faults.py --quick     # input faults + one kill -9, a few minutes
    .venv/bin/python bench/faults.py             # every fault, kill -9 in the middle of each step

Last output line: one JSON object with faults_tried, faults_survived, rows_lost; a Markdown table is
written to bench/results/faults.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.common import emit, machine  # noqa: E402
from jobs.io import atomic_write_table, partition, raw_partition  # noqa: E402
from jobs.settings import Paths  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "faults.md"
WORLD = {"profiles": 200, "titles": 150, "days": 4, "new_titles_per_day": 4, "seed": 11}


@dataclass
class Outcome:
    name: str
    expectation: str
    survived: bool = False
    rows_lost: int = 0
    detail: str = ""
    checks: dict = field(default_factory=dict)


def use(paths: Paths) -> Paths:
    os.environ["FMPIPE_HOME"] = str(paths.home)
    return paths


def snapshot(paths: Paths) -> dict:
    """What consumers see: current index date, and online values of a fixed sample of profiles."""
    from jobs.feast_store import get_store
    from jobs.index import TitleIndex
    store = get_store(paths)
    pids = [int(p) for p in range(1, WORLD["profiles"] + 1, 7)]
    got = store.get_online_features(features=["profile_embeddings:emb_layer2_last", "profile_embeddings:model_version"],
                                    entity_rows=[{"profile_id": p} for p in pids]).to_dict()
    vecs = [None if v is None else np.round(np.asarray(v, np.float32), 5).tobytes() for v in got["emb_layer2_last"]]
    return {"index_date": TitleIndex.current(paths).meta["date"], "online": dict(zip(pids, vecs))}


def publication(paths: Paths, day: dt.date) -> dict[int, bytes]:
    t = pq.read_table(partition(paths.profile_embeddings, day), columns=["profile_id", "emb_layer2_last"])
    return {int(p): np.asarray(v, np.float32).tobytes() for p, v in zip(t["profile_id"].to_pylist(),
                                                                         t["emb_layer2_last"].to_pylist())}


def rows_lost(paths: Paths, day: dt.date, reference: dict[int, bytes]) -> int:
    try:
        got = publication(paths, day)
    except (FileNotFoundError, OSError):
        return len(reference)
    return sum(1 for k, v in reference.items() if got.get(k) != v)


def run_day(day: dt.date) -> None:
    from jobs import pipeline
    pipeline.run_all(day.isoformat())


def setup(root: Path) -> tuple[Paths, dt.date, dict, dict]:
    """World + yesterday published + the undisturbed reference for today."""
    from jobs import generate, pipeline, tokenize, train
    base = use(Paths(root / "base"))
    cfg = generate.GenerateConfig(**WORLD)
    generate.run(cfg, base)
    days = sorted(dt.date.fromisoformat(p.name[3:]) for p in base.raw.glob("dt=*"))
    yesterday, today = days[-2], days[-1]
    tokenize.run(tokenize.TokenizeConfig(date=days[-3].isoformat(), full=True), base)
    train.run(train.TrainJobConfig(date=days[-3].isoformat(), time_budget_s=5, max_epochs=3, d_model=64), base)
    pipeline.run_all(yesterday.isoformat())
    ref = copy_home(base, root / "reference")
    run_day(today)
    return base, today, snapshot(use(base)), {"publication": publication(ref, today), "view": snapshot(ref)}


def copy_home(src: Paths, dst: Path) -> Paths:
    shutil.copytree(src.home, dst)
    return use(Paths(dst))


def still_serving_yesterday(paths: Paths, yesterday_view: dict) -> bool:
    return snapshot(paths) == yesterday_view


# ------------------------------------------------------------------------------------------------
# Faults
# ------------------------------------------------------------------------------------------------
def check_serves_whole(paths: Paths, serves: str, yesterday: dict, ref: dict, o: Outcome) -> None:
    """Consumers see ``serves`` ("yesterday" or "today") whole: online values and index of that one day."""
    seen, want = snapshot(paths), {"yesterday": yesterday, "today": ref["view"]}[serves]
    o.checks[f"serves_{serves}_whole_after_kill"] = seen == want
    if seen != want:
        got = seen["online"]
        o.detail = (f"index of {seen['index_date']}; sampled profiles: "
                    f"{sum(got[k] == yesterday['online'].get(k) for k in got)} as yesterday, "
                    f"{sum(got[k] == ref['view']['online'].get(k) for k in got)} as today, "
                    f"{sum(got[k] is None for k in got)} missing, of {len(got)}")


def kill_during(step: str) -> Callable:
    """kill -9 a subprocess running the day once it has entered ``step``; then re-run in-process."""
    from jobs.pipeline import STEPS
    previous = STEPS[STEPS.index(step) - 1]
    serves = "today" if STEPS.index(step) > STEPS.index("publish") else "yesterday"     # the publish commit decides

    def fault(paths: Paths, day: dt.date, yesterday: dict, ref: dict, o: Outcome) -> None:
        code = f"from jobs import pipeline; pipeline.run_all({day.isoformat()!r})"
        proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        marker = partition(paths.reports, day) / "steps" / f"{previous}.json"
        deadline = time.time() + 600
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep({"tokenize": 6.0, "embed": 0.5, "validate": 2.0, "publish": 0.3, "index": 0.05}.get(step, 0.5))
        finished = proc.poll() is not None
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:                    # the whole run already ended: nothing to kill
            pass
        proc.wait()
        o.checks["killed_mid_step"] = not finished
        check_serves_whole(paths, serves, yesterday, ref, o)
        run_day(day)
    return fault


def kill_at(point: str, serves: str) -> Callable:
    """kill -9 a subprocess running the day the moment it reaches failpoint ``point`` (jobs/failpoints.py),
    check consumers are served ``serves`` ("yesterday" before the commit point, "today" after it)
    whole — online values and index of one and the same day — then re-run in-process."""
    def fault(paths: Paths, day: dt.date, yesterday: dict, ref: dict, o: Outcome) -> None:
        marker = paths.home / f"failpoint-{point}"
        env = {**os.environ, "FMPIPE_FAILPOINT": point, "FMPIPE_FAILPOINT_MARKER": str(marker)}
        code = f"from jobs import pipeline; pipeline.run_all({day.isoformat()!r})"
        log = paths.home.parent / f"{paths.home.name}.stderr"
        with open(log, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                                    stderr=err, start_new_session=True)
        deadline = time.time() + 900
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        o.checks["killed_at_failpoint"] = marker.exists()
        if not marker.exists():           # say why the run never got there
            o.detail = " / ".join(log.read_text(errors="replace").strip().splitlines()[-3:])[:300]
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        check_serves_whole(paths, serves, yesterday, ref, o)
        run_day(day)
    return fault


def input_fault(mutate: Callable[[pa.Table], pa.Table], must_fail: str | None, check: Callable | None = None) -> Callable:
    """Rewrite today's raw partition, run the day; it must fail with ``must_fail`` or succeed + ``check``."""
    def fault(paths: Paths, day: dt.date, yesterday: dict, ref: dict, o: Outcome) -> None:
        raw = raw_partition(paths, day) / "part-0.parquet"
        original = pq.read_table(raw)
        new = mutate(original)
        if new is None:
            shutil.rmtree(raw_partition(paths, day))
        else:
            atomic_write_table(new, raw)
        try:
            run_day(day)
            o.checks["ran"] = True
            if must_fail:
                o.checks[f"fails with /{must_fail}/"] = False
        except Exception as e:                                       # noqa: BLE001 (we classify below)
            import re
            o.detail = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            o.checks[f"fails with /{must_fail}/"] = bool(must_fail and re.search(must_fail, str(e)))
            o.checks["yesterday_served"] = still_serving_yesterday(paths, yesterday)
        if check is not None:
            o.checks.update(check(paths, day))
        if new is None:
            raw_partition(paths, day).mkdir(parents=True)
        atomic_write_table(original, raw)                        # remove the cause, re-run the day
        run_day(day)
    return fault


def nan_embeddings(paths: Paths, day: dt.date, yesterday: dict, ref: dict, o: Outcome) -> None:
    from jobs import pipeline, validate
    pipeline.check_raw(day.isoformat()), pipeline.tokenize(day.isoformat()), pipeline.embed(day.isoformat())
    f = partition(paths.profile_embeddings, day) / "part-0.parquet"
    t = pq.read_table(f)
    col = t["emb_layer2_last"].to_pylist()
    col[0] = [float("nan")] * len(col[0])
    pq.write_table(t.set_column(t.schema.get_field_index("emb_layer2_last"), "emb_layer2_last",
                                pa.array(col, pa.list_(pa.float32()))), f)
    try:
        pipeline.validate(day.isoformat())
        o.checks["gate_blocked"] = False
    except validate.GateFailed as e:
        o.checks["gate_blocked"] = "nonfinite" in str(e)
        o.detail = str(e).splitlines()[1][:160]
    try:
        pipeline.publish(day.isoformat())
        o.checks["publish_refused"] = False
    except RuntimeError:
        o.checks["publish_refused"] = True
    o.checks["yesterday_served"] = still_serving_yesterday(paths, yesterday)
    run_day(day)


def corrupt_checkpoint(paths: Paths, day: dt.date, yesterday: dict, ref: dict, o: Outcome) -> None:
    from fm.checkpoint import CheckpointError
    from jobs.train import current_model_dir
    weights = current_model_dir(paths) / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 3] + b"\x00" * 64)
    try:
        run_day(day)
        o.checks["clear_error"] = False
    except CheckpointError as e:
        o.checks["clear_error"] = "cannot read tensors" in str(e)
        o.detail = str(e)[:160]
    o.checks["nothing_published"] = not partition(paths.profile_embeddings, day).exists()
    o.checks["yesterday_served"] = still_serving_yesterday(paths, yesterday)
    weights.write_bytes(good)
    run_day(day)


def disk_full(paths: Paths, day: dt.date, yesterday: dict, ref: dict, o: Outcome) -> None:
    """Embeddings directory on a 1 MiB tmpfs: the embed step runs out of space mid-write."""
    target = paths.profile_embeddings.parent
    keep = Path(tempfile.mkdtemp()) / "embeddings"
    shutil.move(str(target), keep)
    target.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(target)], capture_output=True).returncode == 0
    if not mounted:
        shutil.rmtree(target)
        shutil.move(str(keep), target)
        raise RuntimeError("cannot mount a small tmpfs here (needs root): disk-full fault not run")
    try:
        run_day(day)
        o.checks["clear_failure"] = False
    except OSError as e:
        o.checks["clear_failure"] = "No space left" in str(e) or getattr(e, "errno", None) == 28
        o.detail = f"{type(e).__name__}: {str(e)[:120]}"
    except Exception as e:                                            # noqa: BLE001
        o.checks["clear_failure"] = "No space left" in str(e)
        o.detail = f"{type(e).__name__}: {str(e)[:120]}"
    o.checks["nothing_half_published"] = not partition(paths.profile_embeddings, day).exists()
    o.checks["yesterday_served"] = snapshot(paths)["index_date"] == yesterday["index_date"]
    subprocess.run(["umount", str(target)], check=True)
    shutil.rmtree(target)
    shutil.move(str(keep), target)
    run_day(day)


def _dup(t: pa.Table) -> pa.Table:
    return pa.concat_tables([t, t.slice(0, 25)])


def _future(t: pa.Table) -> pa.Table:
    ts = t["ts"].to_pylist()
    for i in range(10):
        ts[i] = "2031-01-01T00:00:00Z"
    return t.set_column(t.schema.get_field_index("ts"), "ts", pa.array(ts))


def _unknown_titles(t: pa.Table) -> pa.Table:
    ids = t["title_id"].to_pylist()
    for i in range(0, 40, 4):
        ids[i] = f"ghost-{i}"
    return t.set_column(t.schema.get_field_index("title_id"), "title_id", pa.array(ids))


def _wrong_types(t: pa.Table) -> pa.Table:
    return t.set_column(t.schema.get_field_index("row_position"), "row_position",
                        pa.array([str(x) for x in t["row_position"].to_pylist()]))


def _heavy_profile(t: pa.Table) -> pa.Table:
    """One profile with 100k events today (a bot or a stuck client)."""
    n = 100_000
    base = t.slice(0, 1).to_pylist()[0]
    secs = np.sort(np.random.default_rng(0).integers(0, 86_000, n))
    day = base["ts"][:10]
    rows = {c: [base[c]] * n for c in t.column_names}
    rows["event_id"] = [f"bot-{i}" for i in range(n)]
    rows["ts"] = [f"{day}T{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}Z" for s in secs]
    rows["title_id"] = [t["title_id"][i % t.num_rows].as_py() for i in range(n)]
    return pa.concat_tables([t, pa.table(rows, schema=t.schema)])


def counts(key: str, expected: int) -> Callable:
    def check(paths: Paths, day: dt.date) -> dict:
        import json
        tok = json.loads((partition(paths.reports, day) / "steps" / "tokenize.json").read_text())
        got = tok["quarantine_reasons"].get(key, 0) if key != "duplicates" else tok["duplicates"]
        return {f"{key} == {expected}": got == expected}
    return check


def heavy_check(paths: Paths, day: dt.date) -> dict:
    hist = pq.read_table(partition(paths.history, day), columns=["n_tokens"])
    return {"history capped at 512": max(hist["n_tokens"].to_pylist()) <= 512}


FAULTS: dict[str, tuple[str, Callable]] = {
    "empty_day": ("fails clearly, nothing published", input_fault(lambda t: t.slice(0, 0), r"no profiles active")),
    "missing_partition": ("fails first step naming the path", input_fault(lambda t: None, r"raw partition missing for .*raw/dt=")),
    "wrong_column_types": ("fails naming the column", input_fault(_wrong_types, r"column 'row_position' has type string")),
    "future_timestamps": ("quarantined", input_fault(_future, None, counts("future_ts", 10))),
    "duplicate_events": ("deduplicated", input_fault(_dup, None, counts("duplicates", 25))),
    "unknown_titles": ("quarantined", input_fault(_unknown_titles, None, counts("unknown_title", 10))),
    "profile_100k_events": ("handled, history capped", input_fault(_heavy_profile, None, heavy_check)),
    "nan_embeddings": ("gate blocks, yesterday serves", nan_embeddings),
    "corrupt_checkpoint": ("clear error, nothing published", corrupt_checkpoint),
    "disk_full": ("clear failure, nothing half-published", disk_full),
    **{f"kill9_{s}": ("re-run equals undisturbed run", kill_during(s)) for s in ("tokenize", "embed", "validate", "index")},
    "kill9_publish_staged": ("killed mid-publish (one view staged): yesterday whole, re-run equals undisturbed",
                             kill_at("publish.staged_view", "yesterday")),
    "kill9_publish_swapped": ("killed after the commit (swap) before CURRENT.json: today whole, re-run equals undisturbed",
                              kill_at("publish.swapped", "today")),
}
QUICK = ("empty_day", "missing_partition", "wrong_column_types", "future_timestamps", "duplicate_events",
         "nan_embeddings", "corrupt_checkpoint", "kill9_publish_staged")


def run_fault(name: str, base: Paths, day: dt.date, yesterday: dict, ref: dict, root: Path) -> Outcome:
    expectation, fn = FAULTS[name]
    o = Outcome(name, expectation)
    paths = copy_home(base, root / name)
    try:
        fn(paths, day, yesterday, ref, o)
        o.rows_lost = rows_lost(paths, day, ref["publication"])
        o.checks["rerun_equals_reference"] = o.rows_lost == 0
        o.checks["online_equals_reference"] = snapshot(paths) == ref["view"]
        o.survived = all(o.checks.values())
    except Exception as e:                                           # noqa: BLE001
        o.detail = f"harness: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        o.survived = False
        traceback.print_exc()
    shutil.rmtree(paths.home, ignore_errors=True)
    return o


def write_table(outcomes: list[Outcome], command: str, wall_s: float) -> None:
    lines = ["# Fault suite results", "", f"Command: `{command}`  ", f"Machine: {machine()}  ",
             f"Wall time: {wall_s:.0f} s", "", "| fault | expected | survived | rows lost | checks | detail |",
             "|---|---|---|---|---|---|"]
    for o in outcomes:
        checks = ", ".join(f"{k}: {'ok' if v else 'FAIL'}" for k, v in o.checks.items())
        lines.append(f"| {o.name} | {o.expectation} | {'yes' if o.survived else 'NO'} | {o.rows_lost} | {checks} | "
                     f"{o.detail.replace('|', '/')} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated fault names")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or (list(QUICK) if args.quick else list(FAULTS))
    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    try:
        base, day, yesterday, ref = setup(root)
        outcomes = []
        for name in names:
            outcomes.append(run_fault(name, base, day, yesterday, ref, root))
            o = outcomes[-1]
            print(f"{name:<22} survived={o.survived} rows_lost={o.rows_lost} {o.checks} {o.detail}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    wall = time.perf_counter() - t0
    write_table(outcomes, "python bench/faults.py " + " ".join(sys.argv[1:]), wall)
    emit({"faults_tried": len(outcomes), "faults_survived": sum(o.survived for o in outcomes),
          "rows_lost": sum(o.rows_lost for o in outcomes), "failed": [o.name for o in outcomes if not o.survived],
          "wall_s": round(wall, 1), "machine": machine()})


if __name__ == "__main__":
    main()
