"""Durable file commits shared by everything that writes state (checkpoints, training state, caches).

A rename is durable only once the renamed file's data and then its directory are flushed: without
both, power loss can leave a committed name pointing at an empty file. ``jobs.core.io`` builds the
pipeline's atomic writes on these; ``fm`` uses them directly (it must not import ``jobs``).
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable


def fsync_path(path: Path) -> None:
    """Flush one file or directory to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` (and ``root`` itself)."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            fsync_path(Path(dirpath) / f)
        fsync_path(Path(dirpath))


def commit_file(tmp: Path, path: Path) -> None:
    """Flush ``tmp``, rename it to ``path``, flush the directory."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def commit_dir(directory: Path, fill: Callable[[Path], None]) -> Path:
    """Build a directory aside (``fill`` writes into the fresh folder it is given), flush it whole,
    then rename it over ``directory``: a reader or a crash sees the old folder or the new, never half."""
    tmp = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    fill(tmp)
    fsync_tree(tmp)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    fsync_path(directory.parent)
    return directory
