"""Orchestration guarantees without Airflow: per-date locks, a backfill equals the daily runs, and the
tokenize step submitted with a real ``spark-submit`` equals the in-process one."""
from __future__ import annotations

import datetime as dt
import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.core import locks
from jobs import pipeline
from jobs.core.io import partition
from jobs.core.settings import Paths

DAY = "2026-11-03"
SEEDED = ("raw", "catalogue", "vocab", "models")          # inputs; everything else is the pipeline's output
KEYS = {"tokens": ("profile_id", "ts", "event_id"), "history": ("profile_id",), "quarantine": ("event_id",)}


# ---------------------------------------------------------------------------------------------
# Child processes (module level so the spawn start method can import them)
# ---------------------------------------------------------------------------------------------
def _hold_date(home: str, day: str, ready, release) -> None:
    """Hold ``day``'s lock as step 'publish' until ``release`` is set (or the process is killed)."""
    with locks.date_lock(Paths(Path(home)), dt.date.fromisoformat(day), "publish"):
        ready.set()
        release.wait(120)


def _publish(home: str, day: str, wait_s: str, start, results) -> None:
    """Run the publish step for ``day`` once ``start`` fires; report ``ok`` or the error."""
    os.environ["FMPIPE_HOME"] = home
    os.environ["FMPIPE_LOCK_WAIT_S"] = wait_s
    import jobs.publish  # noqa: F401  (import before the start line, so both really start together)
    start.wait(120)
    try:
        out = pipeline.publish(day)
        results.put(("ok", out["publication"]))
    except Exception as e:                                   # noqa: BLE001 - reported to the test
        results.put((type(e).__name__, str(e)))


def _holder(home: Paths, day: str):
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_date, args=(str(home.home), day, ready, release))
    proc.start()
    assert ready.wait(60), "the holder process never took the lock"
    return proc, release


# ---------------------------------------------------------------------------------------------
# Locks
# ---------------------------------------------------------------------------------------------
def test_second_run_for_a_locked_date_fails_fast_naming_the_date_and_the_holder(home):
    proc, release = _holder(home, DAY)
    try:
        with pytest.raises(locks.LockBusy, match=rf"date {DAY} is locked by step 'publish' "
                                                 rf"\(pid {proc.pid} on host {socket.gethostname()}"):
            pipeline.check_raw(DAY)                          # any step of that date
        with pytest.raises(FileNotFoundError, match="raw partition missing for 2026-11-04"):
            pipeline.check_raw("2026-11-04")                 # other dates are not blocked
        assert not (partition(home.reports, dt.date.fromisoformat(DAY)) / "steps" / "check_raw.json").exists()
    finally:
        release.set()
        proc.join(30)
    assert proc.exitcode == 0


def test_a_waiting_run_gets_the_lock_when_the_holder_finishes_or_dies(home, monkeypatch):
    day = dt.date.fromisoformat(DAY)
    proc, release = _holder(home, DAY)
    threading.Timer(1.0, release.set).start()
    t0 = time.monotonic()
    monkeypatch.setenv("FMPIPE_LOCK_WAIT_S", "60")
    with locks.date_lock(home, day, "test") as info:          # waits for the release, then holds it
        assert info["pid"] == os.getpid()
        assert locks.holder(locks.date_lock_path(home, day))["step"] == "test"
    assert time.monotonic() - t0 >= 0.9
    proc.join(30)

    proc, _ = _holder(home, DAY)                              # kill -9: the kernel drops the lock
    proc.kill()
    proc.join(30)
    with locks.date_lock(home, day, "after-crash", wait_s=0):
        pass


def test_a_second_cli_run_of_a_date_is_refused_naming_the_first(home):
    """Two real ``fmpipe publish date=D`` processes: the first is stopped inside its publish (a
    failpoint, holding the date lock), the second exits 75 at once naming the date and the first's
    pid, without touching the publication; once the first dies the date is free again."""
    import signal
    from jobs.core.settings import REPO_ROOT
    from test_publish import D1, write_day
    write_day(home, D1, range(0, 20), "m1", 1)
    marker = home.home / "reached"
    env = {**os.environ, "FMPIPE_HOME": str(home.home), "FMPIPE_LOCK_WAIT_S": "0"}
    cmd = [sys.executable, "-m", "jobs.cli", "publish", f"date={D1}"]
    first = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                             env={**env, "FMPIPE_FAILPOINT": "publish.staged_view", "FMPIPE_FAILPOINT_MARKER": str(marker)})
    try:
        deadline = time.time() + 300
        while not marker.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), first.stderr.read().decode(errors="replace")[-2000:]
        second = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 75, second.stderr[-2000:]
        assert (f"fmpipe publish: date {D1} is locked by step 'publish' (pid {first.pid} on host "
                f"{socket.gethostname()}") in second.stderr and "Traceback" not in second.stderr
        from jobs.core import publication as pubs
        assert pubs.current(home) is None                    # neither run published
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    with locks.date_lock(home, D1, "after", wait_s=0):      # the kernel dropped the first's lock
        pass


def test_cli_steps_take_the_pipelines_shared_state_locks(home, capsys, monkeypatch):
    """``fmpipe tokenize`` of another date waits on the shared tokenize state like the DAG's step;
    bounded here, it is refused naming the shared state before any work starts."""
    from jobs import cli
    monkeypatch.setenv("FMPIPE_SHARED_LOCK_WAIT_S", "0.3")
    with locks.shared_lock(home, "state-tokenize", "tokenize"):
        assert cli.main(["tokenize", "date=2026-11-09"]) == cli.LOCKED
    err = capsys.readouterr().err
    assert "fmpipe tokenize: shared state 'state-tokenize' is locked by step 'tokenize'" in err
    assert "waited 0.3s" in err and not home.tokens.exists()
    assert pipeline.CLI_STEPS["PublishConfig"] == "publish" and "train" in pipeline.SHARED_STATE


# ---------------------------------------------------------------------------------------------
# Backfill == daily runs
# ---------------------------------------------------------------------------------------------
def _seed(src: Paths, root: Path) -> Paths:
    """A fresh FMPIPE_HOME holding only the world's inputs and its trained checkpoint."""
    dst = Paths((root / "var").resolve())
    for sub in SEEDED:
        shutil.copytree(src.home / sub, dst.home / sub)
    return dst


@pytest.fixture(scope="module")
def runs(world, spark, tmp_path_factory):
    """The first two days run one by one as daily runs in one home, and as one backfill in another."""
    days = world["days"][:2]
    daily, backfill = (_seed(world["paths"], tmp_path_factory.mktemp(n)) for n in ("daily", "backfill"))
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setenv("FMPIPE_HOME", str(daily.home))
        t0 = time.perf_counter()
        for day in days:
            pipeline.run_all(day)
        daily_s = time.perf_counter() - t0
        mp_.setenv("FMPIPE_HOME", str(backfill.home))
        from jobs import cli
        assert cli.main(["backfill", "--start", days[0], "--end", days[-1]]) == 0
    return {"days": days, "daily": daily, "backfill": backfill, "daily_s": daily_s}


def _table(root: Path, day: str, key: tuple[str, ...]):
    return pq.read_table(partition(root, dt.date.fromisoformat(day))).sort_by([(k, "ascending") for k in key])


def publication(paths: Paths) -> dict:
    """The current publication without what is unique to one run (ids, timings)."""
    from jobs.core import publication as pubs
    cur = pubs.current(paths)
    m = pubs.manifest(paths, cur["publication"])
    index = {name: {k: v for k, v in meta.items() if k in ("type", "vectors", "dim", "metric", "recall_at_10")}
             for name, meta in (m.get("index") or {}).items()}
    return {"date": cur["date"], "model_version": cur["model_version"], "seq": cur["seq"], "rows": m["rows"],
            "carried": m["carried"], "seeded": m["seeded"], "status": m.get("status"), "index": index,
            "base_date": (m["base"] or "").split(".")[0]}


def test_backfill_publishes_exactly_what_the_daily_runs_publish(runs, live_state):
    daily, backfill = runs["daily"], runs["backfill"]
    print(f"two daily runs: {runs['daily_s']:.1f}s")
    for day in runs["days"]:
        for root, key in KEYS.items():
            a, b = _table(daily.home / root, day, key), _table(backfill.home / root, day, key)
            assert a.num_rows > 0 or root == "quarantine"
            assert a.equals(b), f"{root}/dt={day} differs"
        for table, key in ((daily.profile_embeddings, "profile_id"), (daily.title_embeddings, "title_id")):
            other = backfill.home / table.relative_to(daily.home)
            assert _table(table, day, (key,)).equals(_table(other, day, (key,))), f"{table.name}/dt={day} differs"
    assert pq.read_table(daily.title_vocab).equals(pq.read_table(backfill.title_vocab))
    assert publication(daily) == publication(backfill)
    assert publication(daily)["date"] == runs["days"][-1] and publication(daily)["seq"] == 2
    assert live_state(daily) == live_state(backfill)
    from jobs.index import TitleIndex
    a, b = TitleIndex.current(daily), TitleIndex.current(backfill)
    probe = a.title_ids[:: max(1, len(a.title_ids) // 10)]
    assert [a.similar_titles(t, 10) for t in probe] == [b.similar_titles(t, 10) for t in probe]
    last = partition(backfill.reports, dt.date.fromisoformat(runs["days"][-1]))
    assert json.loads((last / "steps" / "report.json").read_text())["step"] == "report"


def test_backfill_rejects_an_empty_range_and_unknown_step_options():
    with pytest.raises(ValueError, match="end 2026-11-01 is before start 2026-11-02"):
        pipeline.backfill("2026-11-02", "2026-11-01")
    with pytest.raises(ValueError, match=r"no options for step\(s\) \['tokenise'\]"):
        pipeline.run_all("2026-11-01", {"tokenise": {}})
    assert pipeline.days_in("2026-12-30", "2027-01-02") == ["2026-12-30", "2026-12-31", "2027-01-01", "2027-01-02"]
    assert pipeline._step_overrides(["embed.engine=spark", "tokenize.history_len=64"]) == {
        "embed": {"engine": "spark"}, "tokenize": {"history_len": "64"}}


def test_two_concurrent_publishes_of_one_date_leave_the_single_run_publication(runs, live_state):
    """Both processes start publishing the same date at the same instant: one fails naming the lock
    (or, if they did not overlap, both succeed one after the other); the served state is unchanged."""
    home, day = runs["backfill"], runs["days"][-1]
    before = live_state(home), publication(home)
    ctx = mp.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_publish, args=(str(home.home), day, "0", start, results)) for _ in range(2)]
    for p in procs:
        p.start()
    time.sleep(8)                                   # let both finish importing Feast
    start.set()
    got = [results.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(30)
    print(f"concurrent publishes of {day}: {[status for status, _ in got]}")
    assert any(status == "ok" for status, _ in got), got
    for status, message in got:
        if status != "ok":
            assert status == "LockBusy" and f"date {day} is locked by step 'publish'" in message, got
    assert live_state(home) == before[0] == live_state(runs["daily"])
    after = publication(home)
    assert {k: v for k, v in after.items() if k not in ("seq", "base_date")} == \
           {k: v for k, v in before[1].items() if k not in ("seq", "base_date")}


# ---------------------------------------------------------------------------------------------
# spark-submit
# ---------------------------------------------------------------------------------------------
def test_tokenize_as_a_spark_submit_application_equals_the_in_process_run(runs, world, tmp_path):
    """The DAG's ``submit`` mode for real: spark-submit --master local[1] jobs/tokenize.py ...

    The one place the submit path runs end to end; it costs a second JVM (~30-40 s on 2 idle cores)."""
    home, day = _seed(world["paths"], tmp_path), runs["days"][0]
    app = Path(__file__).resolve().parents[1] / "jobs" / "tokenize.py"
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
           "FMPIPE_HOME": "/nonexistent"}                     # --home must win over the environment
    cmd = [str(Path(sys.executable).with_name("spark-submit")), "--master", "local[1]", "--name", "fmpipe-tokenize",
           str(app), "--date", day, "--home", str(home.home), "--overrides", "{}"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    print(f"spark-submit tokenize: {time.perf_counter() - t0:.1f}s")
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["step"] == "tokenize" and stats["date"] == day and stats["tokens"] > 0
    record = partition(home.reports, dt.date.fromisoformat(day)) / "steps" / "tokenize.json"
    assert json.loads(record.read_text())["tokens"] == stats["tokens"]
    key = ("profile_id", "ts", "event_id")
    assert _table(home.tokens, day, key).equals(_table(runs["daily"].tokens, day, key))
    assert _table(home.history, day, ("profile_id",)).equals(_table(runs["daily"].history, day, ("profile_id",)))


def test_failpoint_blocks_only_where_named_and_signals_the_harness(tmp_path, monkeypatch):
    """bench/faults.py kills a publish exactly at a failpoint: it must fire only for its own name."""
    from jobs.core.failpoints import failpoint
    marker = tmp_path / "reached"
    monkeypatch.setenv("FMPIPE_FAILPOINT", "publish.swapped")
    monkeypatch.setenv("FMPIPE_FAILPOINT_MARKER", str(marker))
    monkeypatch.setenv("FMPIPE_FAILPOINT_PAUSE_S", "0")
    failpoint("publish.staged_view")
    assert not marker.exists()
    failpoint("publish.swapped")
    assert marker.read_text().split()[1] == "publish.swapped"
