"""Helpers shared by the benchmarks: peak-RSS sampling over a process tree and machine facts."""
from __future__ import annotations

import json
import os
import platform
import threading
import time

import psutil


class PeakRSS:
    """Sample RSS of this process and all its children (Spark's JVM included) every 100 ms."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mb(self) -> float:
        return round(self.peak / 2**20, 1)


def machine() -> dict:
    return {"cpus": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform()}


def emit(result: dict) -> None:
    """The last output line of every benchmark: one JSON object."""
    print(json.dumps(result, sort_keys=True, default=str), flush=True)


def provenance(script: str, argv: list[str] | None) -> dict:
    """What a results file names: commit (+dirty), the exact command, the machine and its load."""
    import subprocess
    import sys
    from pathlib import Path

    import torch
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=here).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=here).stdout.strip())
    except OSError:
        commit, dirty = "unknown", True
    cpuinfo = Path("/proc/cpuinfo")
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")), "unknown") if cpuinfo.exists() else "unknown"
    return {"commit": commit + ("+dirty" if dirty else ""),
            "command": " ".join([".venv/bin/python", script, *(argv if argv is not None else sys.argv[1:])]),
            "machine": f"{os.cpu_count()}-core CPU ({cpu}), "
                       f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}, torch {torch.__version__}",
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def write_results(out, stem: str, lines: list[str], rec: dict):
    """``<out>/<stem>.md`` (``lines`` plus the run's provenance from :func:`provenance`) and
    ``<stem>.json`` (the whole record): every results file names commit, command, machine and load."""
    from pathlib import Path
    lines = [*lines, "## Run", "", f"commit `{rec['commit']}`, `{rec['command']}`, {rec['machine']}, load "
             f"{rec['loadavg_start']} → {rec['loadavg_end']}, wall {rec['wall_s']:.0f} s", ""]
    path = Path(out) / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    (Path(out) / f"{stem}.json").write_text(json.dumps(rec, indent=1, default=str))
    return path
