"""The gate's verdict, bound to exactly the data it validated.

Why: a summary that only says ``success: true`` says nothing about *which* bytes passed. Re-embedding
a date after validate (a fix, a new model, an Airflow clear of one task) would publish unvalidated
vectors under yesterday's green light, and a validate that crashed midway would leave an older
success readable as current. So:

* :func:`invalidate` removes the date's ``summary.json`` (durably) before validate reads anything:
  while it runs and after a crash there is *no* verdict, never an old one.
* Validate digests its inputs before the checks and again after (:func:`inputs`,
  :func:`require_unchanged`), and stores that digest with its summary (:func:`bind`), written
  atomically (temp file, fsync, rename, fsync of the directory).
* Publish (:func:`check`) recomputes the digest of what it is about to publish and refuses, naming
  the partitions and files that changed, unless it matches the stored verdict exactly.

The inputs are the day's partitions the gate checks: ``tokens``, ``embeddings/profile`` and
``embeddings/title`` of ``dt=D``, every file in them (the embed ``_manifest.json`` included, with
its row checksum), by name and SHA-256 of the bytes. Shared state that later days legitimately
grow (the title vocabulary, the catalogue) is not bound, or every re-publish of an old day would be
refused. Cost: one read of the day's partitions per digest (~1 s per GB).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path

from fm.durable import fsync_path
from jobs.core.io import partition
from jobs.core.settings import Paths

SUMMARY = "summary.json"


class GateFailed(RuntimeError):
    """The day's tables did not pass validation; nothing may be published."""


class VerdictMismatch(GateFailed):
    """No current verdict covers the data about to be published (missing, stale, failed or changed)."""


def input_roots(paths: Paths) -> dict[str, Path]:
    """The tables whose ``dt=D`` partition the gate validates, by name."""
    return {"tokens": paths.tokens, "profile_embeddings": paths.profile_embeddings,
            "title_embeddings": paths.title_embeddings}


def summary_path(paths: Paths, day: dt.date) -> Path:
    return partition(paths.gx / "results", day) / SUMMARY


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def partition_files(part: Path) -> dict[str, str] | None:
    """``{relative name: sha256}`` of every visible file in ``part`` (None: no partition).

    Hidden names (``.x.tmp-*``, ``.old-*``) are a writer's scratch, never data a reader sees."""
    if not part.is_dir():
        return None
    out = {}
    for f in sorted(part.rglob("*")):
        rel = f.relative_to(part)
        if f.is_file() and not any(p.startswith(".") for p in rel.parts):
            out[rel.as_posix()] = file_sha256(f)
    return out


def inputs(paths: Paths, day: dt.date) -> dict[str, dict[str, str] | None]:
    """The per-file digests of every input partition of ``day`` (see the module docstring)."""
    return {name: partition_files(partition(root, day)) for name, root in input_roots(paths).items()}


def combined(digests: dict) -> str:
    """One SHA-256 over all inputs (names, files, hashes): the checksum the verdict carries."""
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def differences(stored: dict, now: dict) -> list[str]:
    """Human-readable list of what differs between two :func:`inputs` results."""
    out = []
    for name in sorted(set(stored) | set(now)):
        a, b = stored.get(name), now.get(name)
        if a == b:
            continue
        if a is None or b is None:
            out.append(f"{name}: partition {'appeared' if a is None else 'disappeared'}")
            continue
        changed = sorted(f for f in set(a) & set(b) if a[f] != b[f])
        added, removed = sorted(set(b) - set(a)), sorted(set(a) - set(b))
        parts = [f"{label} {files[:3]}{' ...' if len(files) > 3 else ''}"
                 for label, files in (("changed", changed), ("added", added), ("removed", removed)) if files]
        out.append(f"{name}: {'; '.join(parts)}")
    return out


def invalidate(paths: Paths, day: dt.date) -> None:
    """Remove ``day``'s verdict durably, so a validate that dies before writing a new one leaves
    no verdict at all (publish then refuses) instead of the previous run's success."""
    path = summary_path(paths, day)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    fsync_path(path.parent)


def require_unchanged(before: dict, paths: Paths, day: dt.date) -> None:
    """Raise when the inputs changed while validate was reading them (a concurrent writer)."""
    diff = differences(before, inputs(paths, day))
    if diff:
        raise GateFailed(f"the inputs of {day} changed while validate was reading them ({'; '.join(diff)}): "
                         f"no verdict stored. Re-run `fmpipe validate date={day}` once embed/tokenize has finished.")


def bind(summary: dict, digests: dict) -> dict:
    """``summary`` with the inputs it judged: per-file digests and their combined checksum."""
    return {**summary, "inputs": digests, "inputs_sha256": combined(digests)}


def _refuse(day: dt.date, why: str) -> VerdictMismatch:
    return VerdictMismatch(f"refusing to publish {day}: {why}. Re-run `fmpipe validate date={day}` "
                           f"(then publish), or publish with require_gate=false to skip the gate knowingly.")


def read(paths: Paths, day: dt.date) -> dict:
    """The stored verdict of ``day``; :class:`VerdictMismatch` when it is missing or unreadable."""
    path = summary_path(paths, day)
    try:
        verdict = json.loads(path.read_text())
    except FileNotFoundError:
        raise _refuse(day, f"no validation result at {path} (validate never finished for this date)") from None
    except (OSError, ValueError) as e:
        raise _refuse(day, f"the validation result {path} is unreadable ({e})") from None
    if not isinstance(verdict, dict):
        raise _refuse(day, f"the validation result {path} is not a JSON object")
    return verdict


def check(paths: Paths, day: dt.date) -> dict:
    """The stored verdict of ``day`` if it passed *and* covers exactly the data on disk now.

    Refuses (:class:`VerdictMismatch`, naming what and how to fix) a missing or unreadable summary, one
    of another date, one written before verdicts were bound to their inputs (stale), a failed gate,
    and data changed after validation (files named)."""
    path = summary_path(paths, day)
    verdict = read(paths, day)
    if verdict.get("date") not in (None, day.isoformat()):
        raise _refuse(day, f"the validation result {path} is for {verdict.get('date')}")
    if "inputs" not in verdict or "inputs_sha256" not in verdict:
        raise _refuse(day, f"the validation result {path} is stale: it records no checksum of the data it validated")
    if not verdict.get("success"):
        raise GateFailed(f"refusing to publish {day}: validation failed (see {path}); fix the data and re-run "
                         f"`fmpipe validate date={day}`")
    now = inputs(paths, day)
    if combined(now) != verdict["inputs_sha256"]:
        diff = differences(verdict["inputs"], now) or ["stored checksum does not match its own inputs"]
        raise _refuse(day, f"the data changed after validation ({'; '.join(diff)})")
    return verdict
