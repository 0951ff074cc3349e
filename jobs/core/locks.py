"""Exclusive locks on a date (and on state shared across dates), so two runs never interleave writes.

Every step writes a date's outputs aside and swaps them in, which makes a single run crash-safe, but
two runs of one step for one date at the same moment could still race on the same swap (one moves
the other's staging away) or on shared read-modify-write state (the title vocabulary, the GE
context, the model pointer). So each step of a date holds ``locks/date=D.lock``; steps that touch
state shared by all dates also hold ``locks/<name>.lock``. Lock order is always date -> shared ->
publication (``jobs.core.publication.lock``), so they cannot deadlock.

Why ``fcntl.flock`` on a file under ``$FMPIPE_HOME``: the kernel drops the lock when its process
dies (``kill -9`` included), so there are no stale locks to clean up, and a process that finds the
lock taken can read who holds it (pid, host, step, since) from the file and say so. The lock covers
the processes that share that filesystem; for workers on several hosts keep ``$FMPIPE_HOME`` on a
filesystem with working ``flock`` (local disk, NFSv4) and rely on the DAG's ``max_active_runs=1``.

A second run for a locked date fails fast by default (``FMPIPE_LOCK_WAIT_S=0``): the message names
the date and the holder, and Airflow's retries run it again later. Set ``FMPIPE_LOCK_WAIT_S`` to
wait instead; shared-state locks always wait (up to ``FMPIPE_SHARED_LOCK_WAIT_S``, default 1 h),
since different dates queueing on them is normal.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from jobs.core.settings import LOCK_DIR_MODE, LOCK_MODE, Paths

POLL_S = 0.2


class LockBusy(RuntimeError):
    """Another process holds the lock (the message names what is locked and by whom)."""


def lock_dir(paths: Paths) -> Path:
    return paths.home / "locks"


def date_lock_path(paths: Paths, day: dt.date) -> Path:
    return lock_dir(paths) / f"date={day.isoformat()}.lock"


def shared_lock_path(paths: Paths, name: str) -> Path:
    return lock_dir(paths) / f"{name}.lock"


def wait_from_env(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw else default
    except ValueError as e:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from e


def holder(path: Path) -> dict:
    """Who holds (or last held) the lock: what the holder wrote into the file; {} when unknown."""
    try:
        text = path.read_text()
        return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}


def settled_holder(path: Path, grace_s: float = 1.0) -> dict:
    """The holder's details, allowing it ``grace_s`` to write them: it takes the lock first and
    writes its details just after, so a contender arriving in between would otherwise read nothing."""
    deadline = time.monotonic() + grace_s
    info = holder(path)
    while not info and time.monotonic() < deadline:
        time.sleep(POLL_S)
        info = holder(path)
    return info


def describe(info: dict) -> str:
    if not info:
        return "an unknown process (it has not written its details yet)"
    return (f"step {info.get('step', '?')!r} (pid {info.get('pid', '?')} on host {info.get('host', '?')}, "
            f"since {info.get('since', '?')})")


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def _record(fd: int, info: dict) -> None:
    data = json.dumps(info, sort_keys=True).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def open_lock_file(path: Path) -> int:
    """Open (creating) a lock file readable and writable by its owner only, in an owner-only folder.

    Why: ``flock`` needs only an open descriptor, so any user who can open the file can take the lock
    and hold it, blocking every publish. ``fchmod`` also tightens a file created by an older version."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, LOCK_DIR_MODE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, LOCK_MODE)
    try:
        os.fchmod(fd, LOCK_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def exclusive(path: Path, what: str, step: str, wait_s: float) -> Iterator[dict]:
    """Hold ``path`` exclusively for the block, waiting at most ``wait_s`` seconds for it.

    ``what`` names the locked thing in the error (``"date 2026-11-03"``). The file is opened without
    truncating, so a waiter can read the holder's details; they are written only once locked.
    """
    fd = open_lock_file(path)
    try:
        deadline = time.monotonic() + max(wait_s, 0.0)
        while not _try_flock(fd):
            if time.monotonic() >= deadline:
                raise LockBusy(f"{what} is locked by {describe(settled_holder(path))}: another run is writing it "
                               f"(waited {wait_s:g}s; lock file {path}). Retry when it has finished, or set "
                               f"FMPIPE_LOCK_WAIT_S to wait longer.")
            time.sleep(POLL_S)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "step": step, "what": what,
                "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        _record(fd, info)
        try:
            yield info
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def date_lock(paths: Paths, day: dt.date, step: str, wait_s: float | None = None) -> contextlib.AbstractContextManager:
    """The lock every step of one date holds while it reads and writes that date's outputs."""
    wait = wait_from_env("FMPIPE_LOCK_WAIT_S", 0.0) if wait_s is None else wait_s
    return exclusive(date_lock_path(paths, day), f"date {day.isoformat()}", step, wait)


def shared_lock(paths: Paths, name: str, step: str, wait_s: float | None = None) -> contextlib.AbstractContextManager:
    """A lock on state every date shares (``name`` like ``state-tokenize``); waits by default."""
    wait = wait_from_env("FMPIPE_SHARED_LOCK_WAIT_S", 3600.0) if wait_s is None else wait_s
    return exclusive(shared_lock_path(paths, name), f"shared state {name!r}", step, wait)
