"""Redis faults for ``bench/faults.py``: the online store is a real ``redis-server`` (Debian's), the
feature repo a copy whose ``feature_store.yaml`` says ``type: redis``, the day's embed outputs
synthetic (``bench.publish.write_day``). Each kind compares the served Redis state, key by key and
byte for byte, with an undisturbed publication of the same days into a second server.

* ``redis_killed_mid_publish``: ``kill -9`` of ``redis-server`` (AOF, ``appendfsync always``, as a
  durable production Redis runs) while the publisher has staged one view (failpoint
  ``publish.staged_view``): the publish must fail in one clear line, the pointer must stay on
  yesterday, the restarted server must serve yesterday whole, and the re-run must serve today.
* ``redis_flushed``: ``FLUSHALL`` after today was published (or a restart without persistence):
  the next publish (a re-run of today) re-seeds the store from the offline tables to exactly the
  served state.

Skipped (not survived) where ``redis-server`` or the ``redis`` package is missing.
"""
from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
Y, T = dt.date(2026, 11, 1), dt.date(2026, 11, 2)
PROFILES = (np.arange(0, 300), np.arange(150, 450))


def available() -> str | None:
    """Why the Redis kinds cannot run here, or None."""
    if shutil.which("redis-server") is None:
        return "no redis-server on this machine (Debian: apt-get install redis-server)"
    import importlib.util
    if importlib.util.find_spec("redis") is None:
        return "python package redis not installed (pip install -e '.[redis]')"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ``redis-server`` process with its own data directory (AOF on, fsync on every write)."""

    def __init__(self, data: Path):
        self.data, self.port, self.proc = data, free_port(), None
        data.mkdir(parents=True, exist_ok=True)

    def start(self) -> "Server":
        import redis
        self.proc = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data),
             "--save", "", "--appendonly", "yes", "--appendfsync", "always"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client, deadline = redis.Redis(host="127.0.0.1", port=self.port), time.monotonic() + 30
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)

    def client(self):
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port)

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def redis_repo(root: Path, port: int) -> Path:
    """A copy of ``feature_repo/`` at ``root/feature_repo`` whose online store is the Redis on ``port``
    (also the fixture of ``tests/test_redis_publication.py``)."""
    from jobs.core.feast_store import FEATURE_REPO
    repo = root / "feature_repo"
    shutil.copytree(FEATURE_REPO, repo, ignore=shutil.ignore_patterns("__pycache__", "data"))
    yaml = (repo / "feature_store.yaml").read_text()
    block = "online_store:\n  type: sqlite\n  path: ../var/feast/online.db\n"
    if block not in yaml:
        raise RuntimeError("feature_repo/feature_store.yaml no longer has the SQLite block this harness replaces")
    (repo / "feature_store.yaml").write_text(
        yaml.replace(block, f'online_store:\n  type: redis\n  connection_string: "127.0.0.1:{port}"\n'))
    return repo


@contextmanager
def _env(repo: Path, home: Path):
    old = {k: os.environ.get(k) for k in ("FMPIPE_FEATURE_REPO", "FMPIPE_HOME")}
    os.environ.update(FMPIPE_FEATURE_REPO=str(repo), FMPIPE_HOME=str(home))
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _home(root: Path, server: Server):
    """A home with yesterday's and today's embed outputs, on ``server``."""
    from bench.publish import write_day
    from jobs.core.settings import Paths
    repo, home = redis_repo(root, server.port), root / "var"
    with _env(repo, home):
        paths = Paths.from_env()
        for day, pids, seed in ((Y, PROFILES[0], 1), (T, PROFILES[1], 2)):
            write_day(paths, day, pids, 16, seed)
    return repo, paths


def _publish(repo: Path, paths, day: dt.date) -> dict:
    from jobs import publish
    with _env(repo, paths.home):
        return publish.run(publish.PublishConfig(date=day.isoformat(), require_gate=False, with_index=False), paths)


def _current(repo: Path, paths) -> str | None:
    from jobs.core import publication as pubs
    with _env(repo, paths.home):
        cur = pubs.current(paths)
    return (cur or {}).get("date")


def state(client) -> dict:
    """Every key's hash in the live database (the publication marker aside): the whole served state,
    byte for byte -- what readers get."""
    from jobs.core.redis_store import marker_key
    marker = marker_key("fm_embeddings")
    return {k: client.hgetall(k) for k in client.scan_iter() if k != marker}


def _reference(root: Path) -> tuple[dict, dict]:
    """Yesterday's and today's served state, published without faults into their own server."""
    server = Server(root / "ref-redis").start()
    try:
        repo, paths = _home(root / "ref", server)
        _publish(repo, paths, Y)
        y = state(server.client())
        _publish(repo, paths, T)
        return y, state(server.client())
    finally:
        server.stop()


@contextmanager
def _scenario(w, prefix: str):
    """The undisturbed reference states, and a home on its own server with yesterday published."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=w.root))
    server = Server(root / "redis").start()
    try:
        ref_y, ref_t = _reference(root)
        repo, paths = _home(root / "faulty", server)
        _publish(repo, paths, Y)
        yield root, server, repo, paths, ref_y, ref_t
    finally:
        server.stop()


def killed_mid_publish(w, o) -> None:
    with _scenario(w, "redis-kill-") as (root, server, repo, paths, ref_y, ref_t):
        marker = root / "reached"
        env = {**os.environ, "FMPIPE_FEATURE_REPO": str(repo), "FMPIPE_HOME": str(paths.home),
               "FMPIPE_FAILPOINT": "publish.staged_view", "FMPIPE_FAILPOINT_MARKER": str(marker),
               "FMPIPE_FAILPOINT_PAUSE_S": "2"}
        proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "publish", f"date={T}", "require_gate=false",
                                 "with_index=false"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        o.checks["killed_at_failpoint"] = marker.exists()
        server.kill9()                                      # the publisher resumes against a dead server
        out, err = proc.communicate(timeout=300)
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        o.checks["publish_fails_in_a_clear_line"] = proc.returncode != 0 and "Traceback" not in err and 0 < len(lines) <= 3
        o.checks["pointer_stays_yesterday"] = _current(repo, paths) == Y.isoformat()
        server.start()                                      # same data directory: the AOF as of the kill
        o.checks["serves_yesterday_whole_after_restart"] = state(server.client()) == ref_y
        _publish(repo, paths, T)
        o.checks["serves_reference_after_rerun"] = state(server.client()) == ref_t \
            and _current(repo, paths) == T.isoformat()
        o.detail = f"publish exit {proc.returncode}: {lines[0][:200] if lines else ''}"


def flushed(w, o) -> None:
    with _scenario(w, "redis-flush-") as (_, server, repo, paths, _, ref_t):
        _publish(repo, paths, T)
        client = server.client()
        client.flushall()
        o.checks["flush_emptied_the_store"] = state(client) == {}
        r = _publish(repo, paths, T)                        # today re-run (an Airflow clear): re-seeds first
        o.checks["reseeded_to_the_served_state"] = state(client) == ref_t
        o.checks["pointer_stays_today"] = _current(repo, paths) == T.isoformat()
        o.detail = f"re-run: {r.get('status') or r.get('publication')}"
