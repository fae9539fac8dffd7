"""The compiler and its flags for the native library: which compiler, which target flag this CPU takes.

The target flag is found by trying (target_flags): on x86-64 -march=native, on aarch64
-mcpu=native then -march=native, then none (the architecture's baseline vectors), each by a
probe compile of a tiny file. CC picks the compiler; LENETLAB_NATIVE_CFLAGS_EXTRA is appended to
the flags (for example -mno-avx512f for the 256-bit build, -DLN_WIDE_TILES for the 512-bit
blocking at any width, -DLN_PROFILE for per-stage times from ln_profile).
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

from .cache import NativeBuildError, build_exact

# the optimiser loop does not vectorise. -fno-trapping-math: no FP exceptions to preserve.
# -ffp-contract=fast: a*b+c fused into one FMA under Clang as under GCC. Not -ffast-math: it
# would let the compiler reassociate the exp range reduction and the sums, which the tanh
# accuracy bound (1.8e-7) and the parity tests rest on. -pthread: the step's thread pool.
COMMON_FLAGS = ("-O3", "-std=gnu11", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast",
                "-pthread")
LIBRARY_FLAGS = ("-fPIC", "-shared")
# The flag that names this CPU, per machine, in the order tried; () is the baseline, the
# architecture's own vectors (x86-64: SSE2, aarch64: NEON, 16 bytes either way). The first one
# the compiler takes, by a probe compile of a tiny file (as torch inductor probes a vector ISA),
# builds the library. -mcpu=native names the host CPU on arm64; Apple clang up to 14 refuses
# -march=native there, and a cross compiler refuses both.
TARGET_FLAGS = {"x86_64": (("-march=native",), ()),
                "aarch64": (("-mcpu=native",), ("-march=native",), ())}
OTHER_TARGET_FLAGS = (("-march=native",), ("-mcpu=native",), ())
_MACHINE_NAMES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}  # Windows' and macOS' names
PROBE_SOURCE = "int ln_probe(int x) { return x + 1; }\n"
EXTRA_FLAGS_ENV = "LENETLAB_NATIVE_CFLAGS_EXTRA"


_probes: dict[tuple[str, tuple[str, ...]], str | None] = {}


def compiler() -> str | None:
    """$CC, else cc or gcc on PATH (on Windows clang: MSVC's cl has no vector extensions),
    resolved to a full path, else None."""
    cc = os.environ.get("CC")
    if cc:
        found = shutil.which(cc)
    elif os.name == "nt":
        found = shutil.which("clang")
    else:
        found = shutil.which("cc") or shutil.which("gcc")
    return os.path.realpath(found) if found else None


def extra_flags() -> tuple[str, ...]:
    return tuple(os.environ.get(EXTRA_FLAGS_ENV, "").split())


def library_flags(target: tuple[str, ...], extra: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The library's flags for a target flag of TARGET_FLAGS: COMMON_FLAGS, target,
    LIBRARY_FLAGS, then extra ($LENETLAB_NATIVE_CFLAGS_EXTRA by default), which can override it."""
    return (*COMMON_FLAGS, *target, *LIBRARY_FLAGS, *(extra_flags() if extra is None else extra))


def target_candidates(machine: str | None = None) -> tuple[tuple[str, ...], ...]:
    """The target flags tried on machine (default: this one's, platform.machine()), in order."""
    name = (machine or platform.machine()).lower()
    return TARGET_FLAGS.get(_MACHINE_NAMES.get(name, name), OTHER_TARGET_FLAGS)


def refusal(cc: str, flags: tuple[str, ...]) -> str | None:
    """None if cc builds a tiny library with these flags, else what it said (cached per process;
    a probe that builds is cached on disk too, by build)."""
    key = (cc, flags)
    if key not in _probes:
        try:
            build_exact(PROBE_SOURCE, "probe", flags, cc=cc)
            _probes[key] = None
        except NativeBuildError as exc:
            _probes[key] = str(exc)
    return _probes[key]


def target_flags(machine: str | None = None, cc: str | None = None,
                 extra: tuple[str, ...] | None = None) -> tuple[str, ...] | None:
    """The first of machine's target_candidates that cc (default: compiler()) takes with extra
    (default: $LENETLAB_NATIVE_CFLAGS_EXTRA), by a probe compile; None if it takes none, not
    even the baseline."""
    cc = cc or compiler()
    if cc is None:
        return None
    return next((target for target in target_candidates(machine)
                 if refusal(cc, library_flags(target, extra)) is None), None)


def build(source_text: str, name: str, flags: tuple[str, ...] | None = None, cc: str | None = None) -> Path:
    """The path of source_text compiled into the cache folder by cc (default: compiler()) with
    flags (default: library_flags of this machine's target_flags), under a hash of the source,
    the compiler's path and version, the flags and the CPU (a change to any builds afresh), with
    its SHA-256 beside it. A cached library whose checksum does not match is rebuilt. Raises
    NativeBuildError."""
    if flags is None:
        target = target_flags(cc=cc)
        if target is None:
            raise NativeBuildError(f"{cc or compiler()} takes none of the target flags "
                                   f"{target_candidates()} here")
        flags = library_flags(target)
    return build_exact(source_text, name, flags, cc=cc or compiler())[0]
