"""This process's native library: built on first use, verified, loaded and declared, or None and why.

load() builds with the first target flag the compiler takes and builds the source with,
memoised per CC and extra flags; load_build() builds with given flags, for tests and
benchmarks that compare builds in one process (passed as lib= to NativeTrainer and forward).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

from .abi import declare, stamp_problem, unload
from .cache import NativeBuildError, build_exact
from .source import source_text as step_source
from .toolchain import EXTRA_FLAGS_ENV, compiler, library_flags, refusal, target_candidates

_loaded: dict[tuple[str, str], tuple[ctypes.CDLL | None, str | None, tuple[str, ...] | None]] = {}


def load_build(flags: tuple[str, ...], source_text: str | None = None, name: str = "native_step", *,
               legacy: Callable[[ctypes.CDLL], object] | None = None) -> ctypes.CDLL:
    """A library built from source_text (default: source_text(), this package's C files) with
    exactly these flags,
    verified, loaded and declared, bypassing load()'s memo. One whose argument record is not
    StepArgs is closed uncalled and rebuilt once; if the rebuilt one still differs, this raises
    NativeBuildError. With legacy, a library from an old source (a test's or a benchmark's
    baseline) without the stamp, or without constants, is returned as legacy(lib) instead: a
    driver the caller chose for that source (tests/support/legacy.py). Raises NativeBuildError or OSError."""
    text = step_source() if source_text is None else source_text
    stale = None
    for _ in range(2):
        path, digest = build_exact(text, name, flags, stale, cc=compiler())
        lib = ctypes.CDLL(str(path))
        problem = stamp_problem(lib)
        if problem is None:
            declare(lib)
            return lib
        if legacy is not None and problem[0] in ("none", "constants"):
            return legacy(lib)
        unload(lib)
        stale = digest
    raise NativeBuildError(f"{path} was rebuilt and still cannot be used: {problem[1]}")


def _settings() -> tuple[str, str]:
    return os.environ.get("CC", ""), os.environ.get(EXTRA_FLAGS_ENV, "")


def load() -> ctypes.CDLL | None:
    """The native library for the current CC and extra flags, built on first use; None if it
    cannot be built or loaded here (see unavailable_reason). Never raises."""
    key = _settings()
    if key not in _loaded:
        _loaded[key] = _load_first()
    return _loaded[key][0]


def _load_first() -> tuple[ctypes.CDLL | None, str | None, tuple[str, ...] | None]:
    """(library, None, its target flag) built with the first of this machine's target flags that
    the compiler takes and builds the source with, else (None, why: each candidate's
    refusal, in one line, None)."""
    cc = compiler()
    if cc is None:
        return None, "no C compiler (set CC, or install cc/gcc)", None
    problems = []
    for target in target_candidates():
        flags = library_flags(target)
        refused = refusal(cc, flags)
        if refused is None:
            try:
                return load_build(flags), None, target
            except (NativeBuildError, OSError, AttributeError) as exc:
                refused = str(exc)
        problems.append(f"{' '.join(target) or 'no target flag'}: {refused}")
    return None, "; ".join(problems), None


def unavailable_reason() -> str | None:
    """Why load() returns None for the current settings, or None when it does not."""
    load()
    return _loaded[_settings()][1]


def build_target() -> tuple[str, ...] | None:
    """The target flag load()'s library was built with (one of target_candidates(); () for
    none), None without a library."""
    load()
    return _loaded[_settings()][2]


def build_flags() -> tuple[str, ...] | None:
    """All the flags load()'s library was built with, None without one."""
    target = build_target()
    return None if target is None else library_flags(target)


def library_or_load(lib: ctypes.CDLL | None) -> ctypes.CDLL:
    """lib if given (a load_build library: tests, benchmarks), else load()'s, else RuntimeError."""
    lib = lib or load()
    if lib is None:
        raise RuntimeError(f"the native library is unavailable: {unavailable_reason()}")
    return lib
