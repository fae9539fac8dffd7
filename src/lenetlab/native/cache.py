"""The native library's build cache: one compile per source, compiler, flags and CPU, checksummed, locked.

Each library sits in the cache folder under a hash of what it was built from, with its SHA-256
beside it, written by the build: a library is loaded only if it still has that checksum, and
anything else (a truncated or replaced file) is rebuilt, never called. Builds of one library
take a lock in the cache folder, so concurrent builders wait for one build instead of racing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

BUILD_TIMEOUT_S = 180


class NativeBuildError(RuntimeError):
    """The C compiler is missing or failed, or what it built is not usable by this module."""


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lenetlab" / "native"
    return Path(os.environ.get("LENETLAB_NATIVE_CACHE") or default)


def cpu_identity() -> str:
    """What -march=native depends on: the CPU's feature flags, else the machine name."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    return f"{platform.machine()} {platform.processor()}"


def checksum_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def verified(library: Path) -> str | None:
    """The library's SHA-256 if it is the one the build wrote (the checksum beside it), else None."""
    try:
        want = checksum_path(library).read_text().strip()
        got = hashlib.sha256(library.read_bytes()).hexdigest()
    except OSError:
        return None
    return got if got == want else None


@contextlib.contextmanager
def build_lock(path: Path):
    """An exclusive lock (flock) on path while one library is built: a second builder of it
    waits, then finds it built. Without fcntl, or past the build timeout (a stuck holder), the
    builders go on unlocked: each renames a complete file into place, so none loads a partial one."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(path, "a") as f:
        deadline = time.monotonic() + BUILD_TIMEOUT_S + 30
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        yield  # closing f releases the lock


def build_exact(source_text: str, name: str, flags: tuple[str, ...], stale: str | None = None,
                cc: str | None = None) -> tuple[Path, str]:
    """toolchain.build() with these flags and cc (None: no compiler, an error), returning the
    library's checksum too; a library whose checksum is stale (it was loaded and refused) is
    rebuilt unless another process has rebuilt it meanwhile. The build runs in a temp folder
    under the lock; the checksum and then the library are renamed into place, so that a reader
    sees a matching pair or rebuilds."""
    folder = cache_dir()
    if cc is None:
        raise NativeBuildError("no C compiler (set CC, or install cc/gcc)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout.splitlines()[:1]
        key = hashlib.sha256("\0".join([source_text, cc, *version, *flags, cpu_identity()])
                             .encode()).hexdigest()[:20]
        target = folder / f"{name}-{key}.so"
        digest = verified(target)
        if digest is not None and digest != stale:
            return target, digest
        folder.mkdir(parents=True, exist_ok=True)
        with build_lock(folder / f"{name}-{key}.lock"):
            digest = verified(target)
            if digest is not None and digest != stale:  # built by another process while this one waited
                return target, digest
            with tempfile.TemporaryDirectory(dir=folder, prefix=f".{name}-") as tmp:
                source, library = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
                source.write_text(source_text)
                done = subprocess.run([cc, *flags, "-o", str(library), str(source), "-lm"],
                                      capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
                if done.returncode != 0:
                    tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
                    raise NativeBuildError(f"{cc} failed ({' '.join(flags)}): " + " | ".join(tail))
                digest = hashlib.sha256(library.read_bytes()).hexdigest()
                checksum = Path(tmp) / "checksum"
                checksum.write_text(digest + "\n")
                os.replace(checksum, checksum_path(target))
                os.replace(library, target)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeBuildError(f"building in {folder} with {cc} failed: {exc}") from None
    return target, digest
