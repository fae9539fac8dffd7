"""Atomic writes: a temporary file in the same folder, then a rename.

A run killed at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only; give written files the usual mode.
FILE_MODE = 0o666 & ~_read_umask()


def writable_dir(path: Path) -> Path:
    """Create folder path if needed and prove it writable, before any long work starts.

    Raises OutputError naming the folder; a real write is tried because permission
    bits say nothing on a read-only mount, or to root.
    """
    from .errors import OutputError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: a file is in the way (expected a folder)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise OutputError(f"{path}: cannot write here ({exc.strerror or type(exc).__name__})") from None
    return path


def atomic_write(path: Path, write: Callable[[IO], None], binary: bool = False) -> None:
    """Call write(handle) on a temporary file beside path, then rename it to path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8",
                                                                            "newline": ""})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text))


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda handle: json.dump(obj, handle, indent=2, sort_keys=False))


def torch_save(obj: Any, path: Path) -> None:
    import torch

    atomic_write(path, lambda handle: torch.save(obj, handle), binary=True)
