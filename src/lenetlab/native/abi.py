"""The argument record Python and the C library exchange (StepArgs), and its stamp, checked before any call.

The library reports its record's version, size, field names and offsets (record.c), and the
constants it was built with (constants.h, which this module reads for Python's values too); a
library whose record or constants differ from these is refused (rebuilt, never called).
"""

from __future__ import annotations

import contextlib
import ctypes
import re
from pathlib import Path

ABI = 1  # record.c's LN_ABI: the version of the argument record below


def read_constants(path: Path | None = None) -> dict[str, int]:
    """constants.h's table (X(NAME, value) entries), in its order."""
    path = path or Path(__file__).with_name("constants.h")
    return {name: int(value) for name, value in re.findall(r"X\((\w+), (-?\d+)\)", path.read_text())}


CONSTANTS = read_constants()
MAX_THREADS = CONSTANTS["LN_MAX_THREADS"]  # more threads run as this many

_P, _I64, _D, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int32


class StepArgs(ctypes.Structure):
    """record.c's ln_args: every argument of ln_train_step and ln_forward in one record.

    The order, names and types of the fields must match LN_ARGS in record.c one for one.
    load_build() compares the names, byte offsets and size with the library's own and refuses
    (rebuilds, never calls) a library whose record differs."""

    _fields_ = [("params", _P), ("run", _P), ("nbt", _P), ("s1", _P), ("s2", _P), ("steps", _P),
                ("x", _P), ("y", _P), ("idx", _P), ("drop", _P), ("totals", _P), ("out", _P),
                ("move", _P), ("erase_rows", _P), ("erase_cols", _P),
                ("mix_with", _P), ("mix_lam", _P), ("mix_box", _P), ("targets", _P),
                ("rows", _I64), ("batch", _I64),
                ("bn_eps", _D), ("bn_momentum", _D), ("lr", _D), ("beta1", _D), ("beta2", _D),
                ("eps", _D), ("weight_decay", _D), ("momentum", _D), ("smoothing", _D),
                ("background", _D),
                ("optimizer", _I32), ("relu", _I32), ("maxpool", _I32), ("pad", _I32), ("threads", _I32)]


def stamp_problem(lib: ctypes.CDLL) -> tuple[str, str] | None:
    """None if the library's argument record is StepArgs (its ABI, field names and offsets and
    size) and its constants are CONSTANTS, else (kind, what differs): kind "none" for a library
    without the stamp (a source from before the record), "constants" for one that reports no
    constants (a source from before constants.h), "differs" for another version of either.
    Calls only the stamp's own functions, which read constants."""
    return _record_problem(lib) or _constants_problem(lib)


def _constants_problem(lib: ctypes.CDLL) -> tuple[str, str] | None:
    if not hasattr(lib, "ln_constants"):
        return "constants", "it reports no constants (built from a source older than constants.h)"
    lib.ln_constants.restype, lib.ln_constants.argtypes = ctypes.c_char_p, []
    theirs = (lib.ln_constants() or b"").decode()
    ours = "".join(f"{name}={value}," for name, value in CONSTANTS.items())
    if theirs != ours:
        diff = next((f"{a} against {b}" for a, b in zip(theirs.split(","), ours.split(",")) if a != b),
                    f"{theirs.count(',')} constants against {ours.count(',')}")
        return "differs", f"its constants differ from constants.h's ({diff})"
    return None


def _record_problem(lib: ctypes.CDLL) -> tuple[str, str] | None:
    try:
        for fn, restype in (("ln_abi", ctypes.c_int), ("ln_args_size", ctypes.c_int64),
                            ("ln_args_names", ctypes.c_char_p)):
            getattr(lib, fn).restype, getattr(lib, fn).argtypes = restype, []
        offsets_fn = lib.ln_args_offsets
        offsets_fn.restype, offsets_fn.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]
    except AttributeError:
        return "none", "it has no ABI stamp (built from a source older than the argument record)"
    if lib.ln_abi() != ABI:
        return "differs", f"its argument record is version {lib.ln_abi()}, this lenetlab's is {ABI}"
    offsets = (ctypes.c_int64 * 256)()
    count = lib.ln_args_offsets(offsets, len(offsets))
    names = (lib.ln_args_names() or b"").decode().rstrip(",").split(",")
    theirs = [*zip(names, offsets[:min(count, len(offsets))]), ("sizeof", lib.ln_args_size())]
    ours = [*((name, getattr(StepArgs, name).offset) for name, _ in StepArgs._fields_),
            ("sizeof", ctypes.sizeof(StepArgs))]
    if len(names) != count or theirs != ours:
        diff = next((f"{a} against {b}" for a, b in zip(theirs, ours) if a != b),
                    f"{len(theirs) - 1} fields against {len(ours) - 1}")
        return "differs", f"its argument record differs from StepArgs (name and offset: {diff})"
    return None


def unload(lib: ctypes.CDLL) -> None:
    """Close a refused library, so that loading its rebuilt file maps the new one rather than
    returning this handle again (the loader matches libraries by path)."""
    with contextlib.suppress(Exception):
        import _ctypes

        _ctypes.dlclose(lib._handle)


def declare(lib: ctypes.CDLL) -> None:
    p, i, i64, args = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.POINTER(StepArgs)
    signatures = {"ln_vector_bytes": (i, []), "ln_ws_new": (p, []), "ln_ws_free": (None, [p]),
                  "ln_train_step": (i, [p, args]), "ln_forward": (i, [p, args]),
                  "ln_tanh": (None, [p, p, i64]), "ln_profile": (i, [p]),
                  "ln_profile_names": (ctypes.c_char_p, [])}
    if hasattr(lib, "ln_profile_busy"):  # per-thread profile: not in every source of this record
        signatures["ln_profile_busy"] = (i, [p, i])
    if hasattr(lib, "ln_constants"):  # not in a source before constants.h (a benchmark's baseline)
        signatures["ln_constants"] = (ctypes.c_char_p, [])
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
