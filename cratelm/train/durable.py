"""Durable writes: a file is complete-or-absent and survives a power loss once written.

A file is written under a temporary name, flushed and fsynced, renamed over its final name,
and the directory is fsynced (so the rename itself is on disk).
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory: its entries (a rename, a new file) survive a power loss."""
    fsync_file(path)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file under ``path``, then every directory, deepest first."""
    dirs = []
    for d, _, files in os.walk(path):
        dirs.append(d)
        for f in files:
            if not os.path.islink(os.path.join(d, f)):
                fsync_file(os.path.join(d, f))
    for d in reversed(dirs):
        fsync_dir(d)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``path`` complete-or-absent: temporary name, fsync, rename, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
