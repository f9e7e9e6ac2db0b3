"""Atomic file writes: a temporary file beside the target, fsync, then ``os.replace``, so a
process killed mid-write leaves the previous complete file (or none), never a torn one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write", "write_text", "write_json"]


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a fresh temporary file in ``path``'s folder, fsync it and
    move it onto ``path``. The folder is created when missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | Path, values, indent: int = 2, sort_keys: bool = True) -> Path:
    """Write ``values`` as JSON to ``path`` atomically (non-JSON values as their str)."""
    return write_text(path, json.dumps(values, indent=indent, sort_keys=sort_keys,
                                       default=str) + "\n")
