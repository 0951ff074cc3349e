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
