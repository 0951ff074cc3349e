"""Fault-injection machinery for ``bench/faults.py``: kill -9 at a failpoint, simulated power loss, ENOSPC.

* :func:`run_step` runs pipeline steps in a subprocess (its own session, so ``kill -9`` takes its
  Spark JVM too). With ``point`` set (``FMPIPE_FAILPOINT``, :mod:`jobs.core.failpoints`) it waits until
  the process blocks there and kills it: the crash lands exactly at that write boundary.
* Power loss: the subprocess also loads :data:`HOOK` (a ``sitecustomize`` on a PYTHONPATH directory
  given to that subprocess only). It logs, with one sequence number, every ``os.fsync`` (file or
  directory: the path via ``/proc/self/fd/N`` plus its inode), ``os.replace`` and ``os.rename``.
  :func:`drop_unsynced` then plays the page cache's loss against a snapshot taken before the step:
  renames whose destination directory was not fsynced afterwards are reverted, and every file whose
  content changed since the snapshot and whose inode was not fsynced after its last modification
  (mtime) goes back to its snapshot version (a new file: truncated to zero length, as ext4 leaves a
  file whose data never reached the disk). SQLite files (``*.db``, ``*-wal``, ``*-shm``, ``*-journal``)
  count as durable: SQLite fsyncs them itself from C (``synchronous=FULL``), which the Python hook
  cannot see. Deletions (``unlink``/``rmtree``) are taken as durable: lenient, said in the report.
* ENOSPC: with ``FMPIPE_ENOSPC=<substring>:<n>`` the hook raises ``OSError(28)`` at the n-th fsync
  of a path whose part under FMPIPE_HOME contains the substring (a full disk surfaces at the flush of delayed allocation; the
  writes themselves come from C++ and the JVM, which the hook cannot reach).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SQLITE_SUFFIXES = (".db", ".db-wal", ".db-shm", ".db-journal", ".sqlite")

HOOK = r'''
import errno, os, time
_LOG = os.environ.get("FMPIPE_FSYNC_LOG")
_ENOSPC = os.environ.get("FMPIPE_ENOSPC", "")
_hits = [0]
if _LOG:
    _fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    _seq = [0]
    def _log(*fields):
        _seq[0] += 1
        os.write(_fd, ("\t".join([str(os.getpid()), str(_seq[0]), str(time.time_ns()), *map(str, fields)]) + "\n").encode())
    _fsync, _replace, _rename = os.fsync, os.replace, os.rename
    def fsync(fd):
        fno = fd if isinstance(fd, int) else fd.fileno()
        try:
            path = os.readlink(f"/proc/self/fd/{fno}")
            st = os.fstat(fno)
        except OSError:
            path, st = "?", None
        if _ENOSPC:
            sub, n = _ENOSPC.rsplit(":", 1)
            home = os.path.realpath(os.environ.get("FMPIPE_HOME", "/")) + "/"
            if sub in (path[len(home):] if path.startswith(home) else path):      # matched inside the home only
                _hits[0] += 1
                if _hits[0] == int(n):
                    _log("enospc", path)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        _fsync(fno)
        _log("fsync", path, f"{st.st_dev}:{st.st_ino}" if st else "?")
    def _renamer(real, kind):
        def f(src, dst, *a, **k):
            real(src, dst, *a, **k)
            if not a and not k:
                _log(kind, os.path.realpath(src), os.path.realpath(dst))
        return f
    os.fsync = fsync
    os.replace = _renamer(_replace, "rename")
    os.rename = _renamer(_rename, "rename")
'''


@dataclass
class StepRun:
    reached: bool          # the failpoint was reached (or, without one, the step ran to its end)
    rc: int | None
    stderr_tail: str
    log: Path | None       # the fsync/rename log (hooked runs)


def hook_dir(root: Path) -> Path:
    d = root / "fault-hook"
    d.mkdir(exist_ok=True)
    (d / "sitecustomize.py").write_text(HOOK)
    return d


def start(paths, code: str, point: str | None = None, hooked: bool = False, enospc: str | None = None,
          env_extra: dict | None = None) -> tuple[subprocess.Popen, Path, Path, Path | None]:
    """Start ``code`` (Python, FMPIPE_HOME = ``paths.home``) in its own session; returns the process,
    its failpoint marker, its stderr file and its fsync log."""
    root = paths.home.parent
    tag = f"{paths.home.name}-{time.monotonic_ns()}"
    marker, err = root / f"{tag}.reached", root / f"{tag}.stderr"
    env = {**os.environ, "FMPIPE_HOME": str(paths.home), **(env_extra or {})}
    env.pop("FMPIPE_FAILPOINT", None)
    if point:                                   # "name#n": the n-th time the point is reached
        name, _, nth = point.partition("#")
        env.update(FMPIPE_FAILPOINT=name, FMPIPE_FAILPOINT_MARKER=str(marker), FMPIPE_FAILPOINT_SKIP=str(int(nth or 1) - 1))
    log = None
    if hooked or enospc:
        log = root / f"{tag}.fsync.log"
        env["FMPIPE_FSYNC_LOG"] = str(log)
        env["PYTHONPATH"] = os.pathsep.join([str(hook_dir(root)), str(REPO)])
        if enospc:
            env["FMPIPE_ENOSPC"] = enospc
    with open(err, "wb") as e:
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=e, start_new_session=True)
    return proc, marker, err, log


def wait_reached(proc: subprocess.Popen, marker: Path, timeout_s: float = 900) -> bool:
    deadline = time.time() + timeout_s
    while proc.poll() is None and not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    return marker.exists()


def kill(proc: subprocess.Popen) -> int:
    try:
        os.killpg(proc.pid, signal.SIGKILL)            # the process group: Spark's JVM and workers too
    except ProcessLookupError:
        pass
    return proc.wait()


def tail(err: Path) -> str:
    return " / ".join(err.read_text(errors="replace").strip().splitlines()[-4:])[-600:]


def run_step(paths, code: str, point: str | None = None, hooked: bool = False, enospc: str | None = None,
             env_extra: dict | None = None, timeout_s: float = 900) -> StepRun:
    """Run ``code`` in a subprocess; with ``point``, kill -9 it the moment it blocks there."""
    proc, marker, err, log = start(paths, code, point, hooked, enospc, env_extra)
    if point:
        reached = wait_reached(proc, marker, timeout_s)
    else:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        reached = proc.poll() is not None
    rc = kill(proc)
    return StepRun(reached, rc, tail(err), log)


def steps_code(day, steps: list[str], overrides: str = "None") -> str:
    calls = "; ".join(f"pipeline.{s}({day.isoformat()!r}{', ' + overrides if s not in ('check_raw', 'report') and overrides != 'None' else ''})"
                      for s in steps)
    return f"from jobs import pipeline; {calls}"


# ------------------------------------------------------------------------------------------------
# Power loss
# ------------------------------------------------------------------------------------------------
def snapshot_home(home: Path, dst: Path) -> Path:
    """A copy of ``home`` with mtimes (what the disk held before the step)."""
    shutil.copytree(home, dst, symlinks=True)
    return dst


def read_log(log: Path | None) -> list[tuple]:
    """``(seq, ns, kind, a, b)`` records in global order (pid, then per-process seq: one writer here)."""
    if log is None or not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        f = line.split("\t")
        if len(f) >= 5:
            out.append((int(f[2]), f[3], f[4], f[5] if len(f) > 5 else ""))
    return sorted(out, key=lambda r: r[0])


def _durable_kind(p: Path) -> bool:
    return p.name.endswith(SQLITE_SUFFIXES)


def drop_unsynced(home: Path, before: Path, log: Path | None) -> dict:
    """Make ``home`` look as the disk would after power loss at the kill (see the module docstring)."""
    recs = read_log(log)
    home, before = home.resolve(), before.resolve()
    dir_syncs: dict[str, list[int]] = {}
    ino_syncs: dict[str, int] = {}
    for ns, kind, a, b in recs:
        if kind == "fsync":
            dir_syncs.setdefault(a, []).append(ns)
            ino_syncs[b] = max(ino_syncs.get(b, 0), ns)
    stats = {"renames_reverted": 0, "files_restored": 0, "files_truncated": 0, "files_kept_synced": 0, "sqlite_kept": 0}
    for ns, kind, src, dst in reversed([r for r in recs if r[1] == "rename"]):
        parent = os.path.dirname(dst)
        if any(t > ns for t in dir_syncs.get(parent, [])):
            continue                                       # the rename reached the disk
        if not (home.as_posix() in dst):
            continue
        if os.path.lexists(dst):
            if os.path.isdir(os.path.dirname(src)):
                os.replace(dst, src)
            elif os.path.isdir(dst):
                shutil.rmtree(dst)
            else:
                os.unlink(dst)
        rel = os.path.relpath(dst, home)
        old = before / rel
        if os.path.lexists(old):
            (shutil.copytree if old.is_dir() else shutil.copy2)(old, dst)
        stats["renames_reverted"] += 1
    for dirpath, _, files in os.walk(home):
        for name in files:
            p = Path(dirpath) / name
            old = before / p.relative_to(home)
            st = p.stat()
            if old.exists() and old.stat().st_size == st.st_size and old.stat().st_mtime_ns == st.st_mtime_ns:
                continue                                   # unchanged since the snapshot
            if _durable_kind(p):
                stats["sqlite_kept"] += 1
                continue
            if ino_syncs.get(f"{st.st_dev}:{st.st_ino}", -1) >= st.st_mtime_ns:
                stats["files_kept_synced"] += 1
                continue
            if old.exists():
                shutil.copy2(old, p)
                stats["files_restored"] += 1
            else:
                os.truncate(p, 0)
                stats["files_truncated"] += 1
    return stats


def power_loss(paths, code: str, point: str) -> tuple[StepRun, dict]:
    """Snapshot, run ``code`` hooked, kill -9 at ``point``, drop every write not fsynced."""
    before = snapshot_home(paths.home, paths.home.parent / f"{paths.home.name}.before-power-loss")
    run = run_step(paths, code, point=point, hooked=True)
    try:
        stats = drop_unsynced(paths.home, before, run.log)
    finally:
        shutil.rmtree(before, ignore_errors=True)
    return run, stats


def tmp_root(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
