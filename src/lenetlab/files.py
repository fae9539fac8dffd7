"""Files lenetlab writes: atomic writes, and stamped JSON records read back through one reader.

Every write goes to a temporary file beside its target, then a rename, so a run killed at
any moment leaves either the old file or the new one. Every JSON file lenetlab writes for
itself (run plan, trial results, summary) is strict JSON stamped with a format number, its
kind and a SHA-256 of its own content: read_record() is the one reader, and any damage or
hand edit becomes one RunDirError line naming the file, instead of silently wrong numbers.
The TOML specs users write (sweeps, searches) come in through read_toml.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

from .errors import OutputError, RunDirError, SpecError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FORMAT = 1


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only; give written files the usual mode.
FILE_MODE = 0o666 & ~_read_umask()


def write_problem(path: Path, exc: OSError) -> OutputError:
    """One line for a failed write; a full disk says so, whatever the library called it."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"{path}: cannot write, the disk is full")
    return OutputError(f"{path}: cannot write ({exc.strerror or exc})")


def writable_dir(path: Path) -> Path:
    """Create folder path if needed and prove it writable, before any long work starts.

    A real write is tried because permission bits say nothing on a read-only mount, or to root.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: a file is in the way (expected a folder)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise write_problem(path, exc) from None
    return path


def atomic_write(path: Path, data: bytes | Callable[[IO[bytes]], object]) -> None:
    """Write data (bytes, or a function that writes to a binary handle) to path atomically."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            if isinstance(data, bytes):
                handle.write(data)
            else:
                data(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except OSError as exc:
        raise write_problem(path, exc) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, text.encode("utf-8"))


def to_json(obj: Any) -> str:
    """Strict JSON (NaN and infinity refused, as strict parsers do), indented for people."""
    return json.dumps(obj, indent=2, allow_nan=False) + "\n"


def torch_save(obj: Any, path: Path) -> None:
    """torch.save through memory first: a full disk then fails as an OSError naming the file,
    not as a torch error about stream positions."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


def sha256_of_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _digest(body: dict) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def write_record(path: Path, kind: str, body: dict) -> None:
    """Write a stamped JSON record: format, which file it is, the body's fields and their SHA-256."""
    stamped = {"format": FORMAT, "file": kind, **body}
    atomic_write(path, to_json({**stamped, "sha256": _digest(stamped)}).encode("utf-8"))


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: strict JSON has no infinity
        raise ValueError(f"{text[:20]} is not a finite number")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not strict JSON")


def strict_json(text: str):
    """JSON as write_record writes it: no NaN or infinity; ValueError for anything else, nesting
    too deep for the parser included."""
    try:
        return json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("nested too deep") from None


def read_record(path: Path, kind: str) -> dict:
    """The body of a record write_record wrote; RunDirError on anything else (missing, damaged, edited)."""
    try:
        record = strict_json(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunDirError(f"{path}: unreadable ({(str(exc).splitlines() or [''])[0][:80]})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("file") != kind:
        raise RunDirError(f"{path}: not a lenetlab {kind} file of format {FORMAT}")
    claimed = record.pop("sha256", None)
    if claimed != _digest(record):
        raise RunDirError(f"{path}: damaged or edited (its checksum does not match its content)")
    del record["format"], record["file"]
    return record


T = TypeVar("T")


def read_typed(path: Path, kind: str, parse: Callable[[dict], T], what: str) -> T:
    """The record at path (read_record) made a typed record by parse, a from_dict: a field that
    does not fit is one RunDirError naming the file, as damage is."""
    body = read_record(path, kind)
    try:
        return parse(body)
    except (KeyError, TypeError, ValueError, AttributeError, SpecError) as exc:
        raise RunDirError(f"{path}: not a {what} this lenetlab reads ({exc})") from None


def read_toml(path: str | Path) -> dict:
    """A TOML file a user wrote (a spec): its table, or one SpecError naming the file."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: unreadable ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML ({exc})") from None
