"""The catalogue of faults ``bench/faults.py`` injects, each at an exact write boundary.

Every fault gets a fresh copy of the world (yesterday published, today's raw data landed) and a
:class:`Outcome`. Its function breaks the day, records checks (``o.checks``), and re-runs the day
when the cause is gone; the driver then compares every table with the undisturbed reference
(:mod:`bench.fault_tables`). Kinds:

* ``kill9@<failpoint>[#n]``: kill -9 at a failpoint (:mod:`jobs.core.failpoints`; ``#2``: its second hit, e.g.
  the commit's settle after the recovery's at the start of publish); while broken, consumers
  must be served yesterday's or today's publication whole, whichever the commit point implies.
* ``power_loss@<failpoint>``: the same, then every write not fsynced is dropped
  (:func:`bench.fault_harness.drop_unsynced`).
* ``enospc@<site>``: the disk is full at the flush of one write site; the step must fail naming it.
* scenarios: torn journal, empty CURRENT.json, a crash loop, re-runs of old dates, a backfill over
  existing state, rollback then re-run, two CLI runs at once, late events, and (on a scratch home)
  overlapping imports, re-imports and duplicate catalogue ids (:mod:`bench.fault_imports`).
"""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Callable

from bench.fault_harness import kill, power_loss, run_step, start, steps_code, wait_reached
from bench.fault_tables import describe_serving, same_serving, served
from jobs.pipeline import STEPS


@dataclass
class Outcome:
    name: str
    expectation: str
    survived: bool = False
    skipped: bool = False
    rows_lost: int = 0
    lost_by_table: dict = field(default_factory=dict)
    detail: str = ""
    compare: tuple | None = ()           # tables compared with the reference: () = all, None = the kind checks itself
    checks: dict = field(default_factory=dict)


def run_day(day: dt.date) -> None:
    from jobs import pipeline
    pipeline.run_all(day.isoformat())


def steps_before(day: dt.date, step: str) -> list[str]:
    """Run (in-process) the steps before ``step``; return the steps from ``step`` on. Faults at
    ``publish`` start from the world's copy with today already validated (:func:`from_validated`)."""
    from jobs import pipeline
    i = STEPS.index(step)
    for s in STEPS[:i] if step != "publish" else ():
        getattr(pipeline, s)(day.isoformat())
    return list(STEPS[i:])


def from_validated(fn: Callable, step: str) -> Callable:
    """Mark a fault whose first step is publish: it starts from the copy where today is validated."""
    fn.base = "validated" if step == "publish" else "base"
    return fn


def expect_whole(w, paths, serves: str, o: Outcome, label: str) -> bool:
    """Consumers see ``serves`` ("yesterday"/"today") whole: pointer, every online row, the index."""
    seen = served(paths)
    want = w.served_y if serves == "yesterday" else w.served_t
    ok = same_serving(seen, want)
    o.checks[f"serves_{serves}_whole_{label}"] = ok
    if not ok:
        o.detail = (o.detail + " " + describe_serving(seen, w.served_y, w.served_t)).strip()
    return ok


def point_name(point: str, w) -> str:
    return point.replace("{D}", w.day.isoformat()).replace("{Y}", w.yesterday.isoformat())


def kill_at(point: str, step: str, serves: str) -> Callable:
    def fault(w, paths, o: Outcome) -> None:
        rest = steps_before(w.day, step)
        r = run_step(paths, steps_code(w.day, rest), point=point_name(point, w))
        o.checks["killed_at_failpoint"] = r.reached
        if not r.reached:
            o.detail = r.stderr_tail[-300:]
        expect_whole(w, paths, serves, o, "after_kill")
        run_day(w.day)
    return from_validated(fault, step)


def power_loss_at(point: str, step: str, serves: str) -> Callable:
    def fault(w, paths, o: Outcome) -> None:
        rest = steps_before(w.day, step)
        r, stats = power_loss(paths, steps_code(w.day, rest), point_name(point, w))
        o.checks["killed_at_failpoint"] = r.reached
        o.detail = ", ".join(f"{k} {v}" for k, v in stats.items() if v)
        if not r.reached:
            o.detail += " " + r.stderr_tail[-300:]
        expect_whole(w, paths, serves, o, "after_power_loss")
        run_day(w.day)
    return from_validated(fault, step)


def enospc_at(site: str, step: str, serves: str, n: int = 1) -> Callable:
    def fault(w, paths, o: Outcome) -> None:
        rest = steps_before(w.day, step)
        r = run_step(paths, steps_code(w.day, rest), enospc=f"{point_name(site, w)}:{n}")
        o.checks["failed_naming_no_space"] = r.rc != 0 and bool(re.search(r"No space left|Errno 28|ENOSPC", r.stderr_tail))
        if not o.checks["failed_naming_no_space"]:
            o.detail = f"rc {r.rc}: {r.stderr_tail[-200:]}"
        expect_whole(w, paths, serves, o, "after_enospc")
        run_day(w.day)
    return from_validated(fault, step)


def rollback_code(day: dt.date) -> str:
    return ("from jobs.rollback import rollback, RollbackConfig; from jobs.core.settings import Paths; "
            f"rollback(RollbackConfig(to={day.isoformat()!r}), Paths.from_env())")


def release_code() -> str:
    return "from jobs.rollback import release; from jobs.core.settings import Paths; release(Paths.from_env())"


def kill_rollback(point: str, serves: str) -> Callable:
    """Today published; a rollback to yesterday is killed at ``point``; the operator runs it again,
    releases the pin and re-runs today."""
    def fault(w, paths, o: Outcome) -> None:
        from jobs.rollback import RollbackConfig, release, rollback
        run_day(w.day)
        if point == "rollback.release":
            rollback(RollbackConfig(to=w.yesterday.isoformat()), paths)
            r = run_step(paths, release_code(), point=point)
        else:
            r = run_step(paths, rollback_code(w.yesterday), point=point)
        o.checks["killed_at_failpoint"] = r.reached
        expect_whole(w, paths, serves, o, "after_kill")
        rollback(RollbackConfig(to=w.yesterday.isoformat()), paths)
        expect_whole(w, paths, "yesterday", o, "after_rollback_rerun")
        release(paths)
        run_day(w.day)
    return fault


# ------------------------------------------------------------------------------------------------
# Scenarios on the daily world
# ------------------------------------------------------------------------------------------------
def torn_journal(w, paths, o: Outcome) -> None:
    from jobs.core import publication as pubs
    with open(pubs.root(paths) / "history.jsonl", "ab") as f:
        f.write(b'{"date": "2026-01-0')                         # power loss in the middle of a line
    expect_whole(w, paths, "yesterday", o, "with_torn_line")
    run_day(w.day)


def empty_current(w, paths, o: Outcome) -> None:
    from jobs.core import publication as pubs
    pubs.pointer_path(paths).write_bytes(b"")
    expect_whole(w, paths, "yesterday", o, "with_empty_pointer")
    run_day(w.day)


@lambda f: from_validated(f, "publish")
def crash_loop(w, paths, o: Outcome) -> None:
    """Killed after the commit, then killed twice more during the recovery that follows."""
    code = steps_code(w.day, steps_before(w.day, "publish"))
    r = run_step(paths, code, point="publish.swapped")
    o.checks["killed_after_commit"] = r.reached
    for i in (1, 2):
        r = run_step(paths, code, point="publish.reconcile")
        o.checks[f"killed_in_recovery_{i}"] = r.reached
        expect_whole(w, paths, "today", o, f"after_recovery_crash_{i}")
    run_day(w.day)


def rerun_old_date(w, paths, o: Outcome) -> None:
    """Today published, then yesterday re-run whole (an Airflow clear): serving never moves back."""
    run_day(w.day)
    try:
        run_day(w.yesterday)
        o.checks["noop_or_refused"] = True
    except Exception as e:                                        # noqa: BLE001
        o.checks["noop_or_refused"] = "serving is already at the later date" in str(e)
        o.detail = f"{type(e).__name__}: {str(e)[:140]}"
    expect_whole(w, paths, "today", o, "after_old_rerun")


def backfill_over(w, paths, o: Outcome) -> None:
    """Today published, then a backfill over yesterday..today: republished forward, same result."""
    from jobs import pipeline
    from jobs.core.publication import PublishOrderError
    run_day(w.day)
    try:
        pipeline.backfill(w.yesterday.isoformat(), w.day.isoformat())
        o.checks["republished_or_refused_clearly"] = True
    except PublishOrderError as e:                      # yesterday's content changed: the documented way forward
        o.checks["republished_or_refused_clearly"] = "publish.force=true" in str(e)
        o.detail = f"plain backfill refused ({str(e)[:90]}...); ran the forced backfill the message names"
        expect_whole(w, paths, "today", o, "after_refusal")
        pipeline.backfill(w.yesterday.isoformat(), w.day.isoformat(), {"publish": {"force": "true"}})
    expect_whole(w, paths, "today", o, "after_backfill")


def rollback_then_rerun(w, paths, o: Outcome) -> None:
    from jobs.rollback import RollbackConfig, RollbackPinned, release, rollback
    run_day(w.day)
    rollback(RollbackConfig(to=w.yesterday.isoformat()), paths)
    expect_whole(w, paths, "yesterday", o, "after_rollback")
    try:
        run_day(w.day)
        o.checks["rerun_refused_while_pinned"] = False
    except RollbackPinned as e:
        o.checks["rerun_refused_while_pinned"] = "rollback --release" in str(e)
    expect_whole(w, paths, "yesterday", o, "after_refused_rerun")
    release(paths)
    run_day(w.day)


@lambda f: from_validated(f, "publish")
def two_cli_runs(w, paths, o: Outcome) -> None:
    """A CLI publish holds the date (blocked mid-publish); a second ``fmpipe publish`` exits 75 naming it."""
    cli = f"import sys; from jobs.cli import main; sys.exit(main(['publish', 'date={w.day.isoformat()}']))"
    first, marker, err1, _ = start(paths, cli, point="publish.staged_view")
    try:
        o.checks["first_holds_the_lock"] = wait_reached(first, marker)
        r = run_step(paths, cli, env_extra={"FMPIPE_LOCK_WAIT_S": "0"})
        o.checks["second_exits_75"] = r.rc == 75
        o.checks["names_the_holder"] = str(first.pid) in r.stderr_tail or "held by" in r.stderr_tail
        o.detail = r.stderr_tail[-200:] if r.rc != 75 else r.stderr_tail[:160]
    finally:
        kill(first)
    del err1
    expect_whole(w, paths, "yesterday", o, "after_both")
    run_day(w.day)


def late_events(w, paths, o: Outcome) -> None:
    """Events for yesterday land after yesterday was published: today runs; a backfill brings them in."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from jobs import pipeline
    from jobs.core.io import partition
    def valid_events() -> int:
        return sum(pq.read_table(partition(paths.tokens, w.yesterday), columns=["n_events"])["n_events"].to_pylist())
    before = valid_events()
    src = sorted(partition(paths.raw, w.yesterday).glob("*.parquet"))[0]
    t = pq.read_table(src).slice(0, 20)
    t = t.set_column(t.schema.get_field_index("event_id"), "event_id", pa.array([f"late-{i}" for i in range(t.num_rows)]))
    pq.write_table(t, partition(paths.raw, w.yesterday) / "part-late.parquet")
    run_day(w.day)
    o.checks["today_published"] = served(paths)["date"] == w.day.isoformat()
    pipeline.backfill(w.yesterday.isoformat(), w.day.isoformat(), {"publish": {"force": "true"}})
    o.checks["late_events_reach_tokens"] = valid_events() == before + t.num_rows
    o.detail = f"valid events of {w.yesterday}: {before} before, {valid_events()} after the backfill"
    s = served(paths)
    o.checks["serves_today_whole_after_backfill"] = s["date"] == w.day.isoformat() == s["index_date"]
    o.compare = ("raw", "vocab", "catalogue")           # the late events legitimately change the rest
