"""Atomic file writes: a temporary file in the target's folder, fsync, then ``os.replace`` into place.

A reader (or an interrupted run) sees either the old file or the complete new one, never a partial write.
One implementation for every output the project writes (calibrations, reports, sweeps, measurement summaries).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: os.PathLike | str, writer: Callable[[str], None]) -> Path:
    """Call ``writer(tmp_path)`` to fill a temporary file beside ``path``, then replace ``path`` with it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def atomic_write_bytes(path: os.PathLike | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: os.PathLike | str, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (no newline translation)."""
    def _w(tmp: str) -> None:
        with open(tmp, "w", encoding=encoding, newline="") as f:
            f.write(text)

    return atomic_write(path, _w)
