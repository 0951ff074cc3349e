"""Input faults (bad raw data, NaN embeddings, a corrupt checkpoint, a full disk) for ``bench/faults.py``.

Each rewrites or breaks one input, runs the day (it must fail naming the cause, or quarantine and
go on), checks yesterday keeps serving whole, then restores the input and re-runs the day.
"""
from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.fault_kinds import Outcome, expect_whole, run_day
from jobs.core.io import atomic_write_table, partition, raw_partition
from jobs.core.settings import Paths


def input_fault(mutate: Callable[[pa.Table], pa.Table], must_fail: str | None, check: Callable | None = None) -> Callable:
    """Rewrite today's raw partition, run the day; it must fail with ``must_fail`` or succeed + ``check``."""
    def fault(w, paths: Paths, o: Outcome) -> None:
        day = w.day
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
            expect_whole(w, paths, "yesterday", o, "while_failing")
        if check is not None:
            o.checks.update(check(paths, day))
        if new is None:
            raw_partition(paths, day).mkdir(parents=True)
        atomic_write_table(original, raw)                        # remove the cause, re-run the day
        run_day(day)
    return fault


def nan_embeddings(w, paths: Paths, o: Outcome) -> None:
    day = w.day
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
    expect_whole(w, paths, "yesterday", o, "while_failing")
    run_day(day)


def corrupt_checkpoint(w, paths: Paths, o: Outcome) -> None:
    day = w.day
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
    expect_whole(w, paths, "yesterday", o, "while_failing")
    weights.write_bytes(good)
    run_day(day)


def disk_full(w, paths: Paths, o: Outcome) -> None:
    day = w.day
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
    expect_whole(w, paths, "yesterday", o, "while_failing")
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
