"""Two days of the daily DAG run by a real Airflow scheduler, not ``dags test``.

Real ``airflow`` processes on a fresh SQLite metadata DB (absolute path, ``AIRFLOW_HOME`` under the
test's tmp dir): ``dag-processor`` parses ``dags/``, ``scheduler`` with the ``LocalExecutor`` queues
and runs the task instances, and ``api-server --apps execution`` serves the Task Execution API the
task processes report through (Airflow 3 tasks never touch the metadata DB). No triggerer: the raw
partitions exist, so ``wait_for_raw`` never defers.

The two days go through the scheduler as a backfill (``airflow backfill create``, which needs
``--reprocess-behavior`` because the tasks depend on past; the scheduler creates and runs one dag
run per timetable interval: logical date D, data interval [D, D+1), run id ``backfill__<D+1>``).
The scheduler only runs dag runs of an unpaused DAG; ``use_job_schedule=False`` stops it from also
adding today's (wall-clock) interval, which has no raw data.

Why: ``dag.test()`` runs every task in the test's own process, so it cannot catch what only the
scheduler path does — serialisation of the DAG, ``depends_on_past`` across runs, the branch skip
through the scheduler, task processes with their own environment, XComs over the execution API.

Takes about 4-5 minutes on 2 busy cores (world ~40 s, ``db migrate`` and parsing ~40 s, then the two
runs: each task is a fresh process, each tokenize starts its own Spark).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.core import publication
from jobs.core.io import partition
from conftest import two_days_left

REPO = Path(__file__).resolve().parents[1]
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
DAG_ID = "fm_embeddings_daily"
WORLD = {"profiles": 80, "titles": 60, "days": 4, "new_titles_per_day": 4, "malformed_per_day": 2,
         "start": "2026-11-01", "seed": 5}
RUNS_TIMEOUT_S = float(os.environ.get("FMPIPE_SCHEDULER_TEST_TIMEOUT_S", 600))
TASKS_RUN = {"wait_for_raw", "check_raw", "spark_mode", "tokenize_local", "embed", "validate", "publish",
             "index", "report"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _airflow_env(tmp: Path, fmpipe_home: Path) -> dict:
    port = _free_port()
    af_home = tmp / "airflow"
    af_home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "FMPIPE_"))}
    env.update({
        "AIRFLOW_HOME": str(af_home),
        # wait up to 60 s for SQLite's one writer (pysqlite's default 5 s lost `backfill create`
        # to "database is locked" on a busy machine)
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{af_home / 'airflow.db'}?timeout=60",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API_AUTH__JWT_SECRET": "fmpipe-scheduler-test-secret",   # shared by scheduler and api-server
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "3600",   # parse once; the files don't change
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(af_home / "logs"),
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(_free_port()),    # the scheduler serves task logs
        "FMPIPE_HOME": str(fmpipe_home),
        "GX_ANALYTICS_ENABLED": "false",
        "SPARK_LOCAL_IP": "127.0.0.1",
    })
    return env


def _cli(env: dict, *args: str, timeout: float = 300) -> str:
    out = subprocess.run([AIRFLOW, *args], env=env, capture_output=True, text=True, timeout=timeout,
                         check=False)
    assert out.returncode == 0, f"airflow {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def _backfill_create(env: dict, db: Path, *args: str, attempts: int = 3) -> str:
    """``airflow backfill create`` again when SQLite's one writer slot stayed busy past the 60 s
    timeout (seen with five busy processes on two cores) and the failed transaction left no backfill
    behind; any other failure fails the test at once."""
    for attempt in range(attempts):
        try:
            return _cli(env, "backfill", "create", *args)
        except AssertionError as e:
            if "database is locked" not in str(e) or _query(db, "SELECT 1 FROM backfill") or attempt == attempts - 1:
                raise
            time.sleep(5)
    raise AssertionError("unreachable")


def _query(db: Path, sql: str, *params) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, params).fetchall()
    except sqlite3.OperationalError:           # a table not migrated yet, or the writer holds a lock
        return []
    finally:
        con.close()


def _wait(what: str, ready, timeout: float, procs: dict) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        dead = {name: p.returncode for name, (p, _) in procs.items() if p.poll() is not None}
        assert not dead, f"airflow processes exited while waiting for {what}: {dead}"
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _enqueued_by_local_executor(scheduler_log: Path) -> set[tuple[str, str]]:
    """(run_id, task_id) of every task instance the scheduler handed to the LocalExecutor."""
    lines = scheduler_log.read_text(errors="replace").splitlines()
    return {(run_id, task_id) for line in lines if "for executor: LocalExecutor(" in line
            for task_id, run_id in re.findall(rf"<TaskInstance: {DAG_ID}\.(\S+) (\S+) \[", line)}


def _tail(path: Path, n: int = 60) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else ["<no log>"]
    return "\n".join(lines[-n:])


def _task_log_tails(af_home: Path, failed: list[tuple]) -> str:
    """The last lines of each failed task's log (the scheduler's log says only that it failed)."""
    out = []
    for run_id, task_id in failed:
        for f in sorted((af_home / "logs").rglob(f"*run_id={run_id}*/task_id={task_id}/*.log")):
            out.append(f"--- task log {f.relative_to(af_home)}\n{_tail(f, 40)}")
    return "\n".join(out)


@pytest.fixture
def scheduled_world(tmp_path, spark, monkeypatch):
    """History tokenized and a tiny model trained through the third-last day: two days left to run."""
    monkeypatch.setenv("FMPIPE_HOME", str((tmp_path / "var").resolve()))
    paths, days = two_days_left(tmp_path, spark, WORLD)
    return paths, days[-2:]


def test_scheduler_runs_two_days_with_the_local_executor(tmp_path, scheduled_world, live_state):
    paths, (day1, day2) = scheduled_world
    env = _airflow_env(tmp_path, paths.home)
    af_home = Path(env["AIRFLOW_HOME"])
    db = af_home / "airflow.db"
    _cli(env, "db", "migrate")

    procs: dict[str, tuple[subprocess.Popen, Path]] = {}
    t0 = time.monotonic()

    def start(name: str, *args: str) -> None:
        log = tmp_path / f"{name}.log"
        with open(log, "wb") as fh:
            procs[name] = (subprocess.Popen([AIRFLOW, *args], env=env, stdout=fh, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True), log)

    try:
        # the backfill is created while only the dag-processor writes to the DB (fewer lock waits)
        start("dag-processor", "dag-processor")
        _wait("the DAG to be parsed and serialised",
              lambda: _query(db, "SELECT 1 FROM serialized_dag WHERE dag_id=?", DAG_ID), 240, procs)
        _cli(env, "dags", "unpause", DAG_ID)
        _backfill_create(env, db, "--dag-id", DAG_ID, "--from-date", day1, "--to-date", day2,
                         "--max-active-runs", "1", "--reprocess-behavior", "completed")   # required with depends_on_past
        start("api-server", "api-server", "--apps", "execution", "--workers", "1")
        start("scheduler", "scheduler")

        def runs() -> list[tuple]:
            return _query(db, "SELECT run_id, date(data_interval_start), state, run_type FROM dag_run "
                              "WHERE dag_id=? ORDER BY data_interval_start", DAG_ID)

        def both_finished() -> bool:            # or a task failed: its retries wait 5 min, report it now
            got = runs()
            return (len(got) == 2 and all(r[2] in ("success", "failed") for r in got)) or bool(_query(
                db, "SELECT 1 FROM task_instance WHERE state IN ('failed', 'up_for_retry', 'upstream_failed')"))

        try:
            _wait("both backfill runs to finish", both_finished, RUNS_TIMEOUT_S, procs)
            got = runs()
            assert [(r[1], r[2], r[3]) for r in got] == [(day1, "success", "backfill"), (day2, "success", "backfill")]
        except AssertionError:
            failed = _query(db, "SELECT run_id, task_id FROM task_instance WHERE dag_id=? AND state IN "
                                "('failed', 'up_for_retry', 'upstream_failed')", DAG_ID)
            tis = _query(db, "SELECT run_id, task_id, state, try_number FROM task_instance WHERE dag_id=? "
                             "ORDER BY run_id, start_date", DAG_ID)
            print(f"dag runs: {runs()}\ntask instances:\n" + "\n".join(map(str, tis)))
            print(_task_log_tails(af_home, failed))
            raise
        wall = time.monotonic() - t0
        print(f"two scheduled days in {wall:.0f} s")

        # every task instance was queued by the scheduler job and ran in its own process (a pid that
        # is none of ours); the DB leaves the executor column empty for the default executor, so the
        # scheduler's log is the witness that the LocalExecutor ran each one
        tis = _query(db, "SELECT t.run_id, t.task_id, t.state, j.job_type, t.pid FROM task_instance t "
                         "LEFT JOIN job j ON j.id=t.queued_by_job_id WHERE t.dag_id=?", DAG_ID)
        ran = [t for t in tis if t[2] == "success"]
        assert {t[1] for t in ran} == TASKS_RUN and len(ran) == 2 * len(TASKS_RUN), tis
        assert {t[1] for t in tis if t[2] == "skipped"} == {"tokenize_submit"}     # spark_mode auto -> local
        assert all(t[3] == "SchedulerJob" and t[4] and t[4] != os.getpid() for t in ran), tis
        assert {(t[0], t[1]) for t in ran} <= _enqueued_by_local_executor(procs["scheduler"][1])

        # both days published, in order, and the second is serving
        moves = [r["date"] for r in publication.history(paths)]
        assert moves == [day1, day2], moves
        assert publication.current(paths)["date"] == day2
        state = live_state(paths)
        assert all(len(rows) > 0 for rows in state.values()), {t: len(r) for t, r in state.items()}
        for day in (day1, day2):
            report = json.loads((partition(paths.reports, dt.date.fromisoformat(day)) / "summary.json").read_text())
            assert report["validation"]["success"], report
    except BaseException:
        for name, (_, log) in procs.items():
            print(f"===== {name} log tail ({log})\n{_tail(log)}")
        raise
    finally:
        _stop([p for p, _ in procs.values()])


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process group (the process and the task workers it forked), SIGKILL what is left."""
    def signal_groups(sig):
        for p in procs:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
    signal_groups(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    signal_groups(signal.SIGKILL)
    for p in procs:
        p.wait(timeout=30)
