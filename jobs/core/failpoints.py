"""Named fault-injection points, in the spirit of the failpoints of databases (TiKV, FoundationDB).

The fault suite (``bench/faults.py``) must ``kill -9`` a step at a known moment, not at a guessed
time: on a small world a whole publish takes a fraction of a second. A process started with
``FMPIPE_FAILPOINT=<name>`` creates the file ``FMPIPE_FAILPOINT_MARKER`` (if set) when it reaches
that point and then blocks, so the harness kills it exactly there. Unset, as in production, a
failpoint is one environment lookup.
"""
from __future__ import annotations

import os
import time
from pathlib import Path


_HITS: dict[str, int] = {}


def failpoint(name: str) -> None:
    """Block here (after signalling through the marker file) when ``FMPIPE_FAILPOINT`` names this point;
    ``FMPIPE_FAILPOINT_SKIP=n`` lets the first n hits pass (a point reached on recovery and on commit)."""
    if os.environ.get("FMPIPE_FAILPOINT") != name:
        return
    _HITS[name] = _HITS.get(name, 0) + 1
    if _HITS[name] <= int(os.environ.get("FMPIPE_FAILPOINT_SKIP", "0")):
        return
    marker = os.environ.get("FMPIPE_FAILPOINT_MARKER")
    if marker:
        Path(marker).write_text(f"{os.getpid()} {name}\n")
    time.sleep(float(os.environ.get("FMPIPE_FAILPOINT_PAUSE_S", "3600")))
