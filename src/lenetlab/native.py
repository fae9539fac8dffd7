"""The native (C) training step and eval forward of LeNet5V1 on CPU: build, cache, load, drive.

native_step.c holds the kernels (see its header for the layout and why). load() compiles it on
first use into a per-user cache and loads it with ctypes, or returns None where it cannot
(unavailable_reason() says why). NativeTrainer steps on the model's own parameter tensors and
the optimiser's own state tensors, so their state_dicts stay what torch would hold and
checkpoints move freely between the native and PyTorch paths; forward() gives eval-mode
logits. Both run on torch.get_num_threads() threads unless told otherwise (threads=), with the
same results for any count. load_build() builds with other flags, for tests and benchmarks that
compare builds in one process (passed as lib= to NativeTrainer, supports and forward).

Python and C exchange one argument record (StepArgs, native_step.c's ln_args), whose layout
the library reports and load() checks before any other call. The cache holds each library
with its SHA-256 beside it, written by the build: a library is loaded only if it still has that
checksum, and anything else (a truncated or replaced file, one whose record differs) is
rebuilt, never called. Builds of one library take a lock in the cache folder, so concurrent
builders wait for one build instead of racing.

The target flag is found by trying (target_flags): on x86-64 -march=native, on aarch64
-mcpu=native then -march=native, then none (the architecture's baseline vectors); load()
builds with the first one the compiler takes and builds the source with, and build_target()
says which (build_flags() all its flags). Only where none builds does load() return None
(the PyTorch path).

Environment: CC picks the compiler; LENETLAB_NATIVE_CFLAGS_EXTRA is appended to the flags
(for example -mno-avx512f for the 256-bit build, -DLN_WIDE_TILES for the 512-bit blocking at
any width, -DLN_PROFILE for per-stage times from ln_profile); LENETLAB_NATIVE_CACHE overrides
the cache folder ($XDG_CACHE_HOME/lenetlab/native or ~/.cache/lenetlab/native).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path

import torch

from .augment import EpochDraws
from .model import LeNet5V1, _layers

SOURCE = Path(__file__).with_name("native_step.c")

# -O3, and a target flag below: the vector width and register count of this CPU (the C source
# picks its blocking from them). -fno-math-errno: without it GCC keeps sqrtf scalar (errno) and
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
BUILD_TIMEOUT_S = 180

_OPTIMIZERS = {torch.optim.Adam: 0, torch.optim.AdamW: 1, torch.optim.SGD: 2}
_ACTIVATIONS = {"tanh": 0, "relu": 1}  # native_step.c's relu flag
_POOLS = {"avg": 0, "max": 1}  # its maxpool flag
_UNSUPPORTED = ("maximize", "differentiable", "capturable", "amsgrad", "nesterov", "dampening")
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

_loaded: dict[tuple[str, str], tuple[ctypes.CDLL | None, str | None, tuple[str, ...] | None]] = {}
_probes: dict[tuple[str, tuple[str, ...]], str | None] = {}

ABI = 1  # native_step.c's LN_ABI: the version of the argument record below
MAX_THREADS = 64  # native_step.c's LN_MAX_THREADS: more run as this many

_P, _I64, _D, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int32


class StepArgs(ctypes.Structure):
    """native_step.c's ln_args: every argument of ln_train_step and ln_forward in one record.

    The order, names and types of the fields must match LN_ARGS in native_step.c one for one.
    load_build() compares the names, byte offsets and size with the library's own and refuses
    (rebuilds, never calls) a library whose record differs."""

    _fields_ = [("params", _P), ("run", _P), ("nbt", _P), ("s1", _P), ("s2", _P), ("steps", _P),
                ("x", _P), ("y", _P), ("idx", _P), ("drop", _P), ("totals", _P), ("out", _P),
                ("move", _P), ("erase_rows", _P), ("erase_cols", _P),
                ("rows", _I64), ("batch", _I64),
                ("bn_eps", _D), ("bn_momentum", _D), ("lr", _D), ("beta1", _D), ("beta2", _D),
                ("eps", _D), ("weight_decay", _D), ("momentum", _D), ("smoothing", _D),
                ("background", _D),
                ("optimizer", _I32), ("relu", _I32), ("maxpool", _I32), ("pad", _I32), ("threads", _I32)]


class NativeBuildError(RuntimeError):
    """The C compiler is missing or failed, or what it built is not usable by this module."""


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lenetlab" / "native"
    return Path(os.environ.get("LENETLAB_NATIVE_CACHE") or default)


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


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's feature flags, else the machine name."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    return f"{platform.machine()} {platform.processor()}"


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


def _refusal(cc: str, flags: tuple[str, ...]) -> str | None:
    """None if cc builds a tiny library with these flags, else what it said (cached per process;
    a probe that builds is cached on disk too, by build)."""
    key = (cc, flags)
    if key not in _probes:
        try:
            _build(PROBE_SOURCE, "probe", flags, cc=cc)
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
                 if _refusal(cc, library_flags(target, extra)) is None), None)


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
    return _build(source_text, name, flags, cc=cc)[0]


def _checksum_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _verified(library: Path) -> str | None:
    """The library's SHA-256 if it is the one the build wrote (the checksum beside it), else None."""
    try:
        want = _checksum_path(library).read_text().strip()
        got = hashlib.sha256(library.read_bytes()).hexdigest()
    except OSError:
        return None
    return got if got == want else None


@contextlib.contextmanager
def _build_lock(path: Path):
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


def _build(source_text: str, name: str, flags: tuple[str, ...], stale: str | None = None,
           cc: str | None = None) -> tuple[Path, str]:
    """build() with these flags, returning the library's checksum too; a library whose checksum
    is stale (it was loaded and refused) is rebuilt unless another process has rebuilt it
    meanwhile. The build runs in a temp folder under the lock; the checksum and then the library
    are renamed into place, so that a reader sees a matching pair or rebuilds."""
    cc, folder = cc or compiler(), cache_dir()
    if cc is None:
        raise NativeBuildError("no C compiler (set CC, or install cc/gcc)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout.splitlines()[:1]
        key = hashlib.sha256("\0".join([source_text, cc, *version, *flags, _cpu_identity()])
                             .encode()).hexdigest()[:20]
        target = folder / f"{name}-{key}.so"
        digest = _verified(target)
        if digest is not None and digest != stale:
            return target, digest
        folder.mkdir(parents=True, exist_ok=True)
        with _build_lock(folder / f"{name}-{key}.lock"):
            digest = _verified(target)
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
                os.replace(checksum, _checksum_path(target))
                os.replace(library, target)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeBuildError(f"building in {folder} with {cc} failed: {exc}") from None
    return target, digest


def _stamp_problem(lib: ctypes.CDLL) -> tuple[str, str] | None:
    """None if the library's argument record is StepArgs (its ABI, field names and offsets and
    size), else (kind, what differs): kind "none" for a library without the stamp (a source
    from before the record), "differs" for another version of it. Calls only the stamp's own
    functions, which read constants."""
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


def _unload(lib: ctypes.CDLL) -> None:
    """Close a refused library, so that loading its rebuilt file maps the new one rather than
    returning this handle again (the loader matches libraries by path)."""
    with contextlib.suppress(Exception):
        import _ctypes

        _ctypes.dlclose(lib._handle)


def _declare(lib: ctypes.CDLL) -> None:
    p, i, i64, args = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.POINTER(StepArgs)
    signatures = {"ln_vector_bytes": (i, []), "ln_ws_new": (p, []), "ln_ws_free": (None, [p]),
                  "ln_train_step": (i, [p, args]), "ln_forward": (i, [p, args]),
                  "ln_tanh": (None, [p, p, i64]), "ln_profile": (i, [p]),
                  "ln_profile_names": (ctypes.c_char_p, [])}
    if hasattr(lib, "ln_profile_busy"):  # per-thread profile: not in every source of this record
        signatures["ln_profile_busy"] = (i, [p, i])
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes


class _Legacy:
    """A library from a source before the argument record (e056921 and older: no ABI stamp),
    for a benchmark's or a test's baseline only: ln_train_step and ln_forward take a StepArgs
    and call the old positional interface, declared here and never changed again (older
    sources ignore the trailing arguments they lack); single-threaded. load() never returns one."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        p, i, d, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_double, ctypes.c_int64
        signatures = {"ln_vector_bytes": (i, []), "ln_ws_new": (p, []), "ln_ws_free": (None, [p]),
                      "ln_train_step": (i, [*[p] * 10, i64, i, p, d, d, i, d, d, d, d, d, d, p, i, i, d,
                                            p, i, p, p, d]),
                      "ln_forward": (i, [p, p, d, p, i64, p, i, i]), "ln_tanh": (None, [p, p, i64])}
        if hasattr(lib, "ln_profile"):
            signatures.update(ln_profile=(i, [p]), ln_profile_names=(ctypes.c_char_p, []))
        for name, (restype, argtypes) in signatures.items():
            function = getattr(lib, name)
            function.restype, function.argtypes = restype, argtypes
        self._lib = lib

    def __getattr__(self, name: str):
        return getattr(self._lib, name)

    def ln_train_step(self, ws, a: StepArgs) -> int:
        return self._lib.ln_train_step(
            ws, a.params, a.run, a.nbt, a.s1, a.s2, a.steps, a.x, a.y, a.idx, a.rows, a.batch, a.drop,
            a.bn_eps, a.bn_momentum, a.optimizer, a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.momentum,
            a.totals, a.relu, a.maxpool, a.smoothing, a.move, a.pad, a.erase_rows, a.erase_cols, a.background)

    def ln_forward(self, ws, a: StepArgs) -> int:
        return self._lib.ln_forward(a.params, a.run, a.bn_eps, a.x, a.rows, a.out, a.relu, a.maxpool)


def load_build(flags: tuple[str, ...], source_text: str | None = None, name: str = "native_step", *,
               legacy: bool = False) -> ctypes.CDLL:
    """A library built from source_text (default native_step.c) with exactly these flags,
    verified, loaded and declared, bypassing load()'s memo. One whose argument record is not
    StepArgs is closed uncalled and rebuilt once; if the rebuilt one still differs, this raises
    NativeBuildError. With legacy=True, a library without the stamp (an old source: a baseline)
    is driven through its old positional interface instead (_Legacy). Raises NativeBuildError
    or OSError."""
    text = SOURCE.read_text() if source_text is None else source_text
    stale = None
    for _ in range(2):
        path, digest = _build(text, name, flags, stale)
        lib = ctypes.CDLL(str(path))
        problem = _stamp_problem(lib)
        if problem is None:
            _declare(lib)
            return lib
        if legacy and problem[0] == "none":
            return _Legacy(lib)
        _unload(lib)
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
        refused = _refusal(cc, flags)
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


def _library(lib: ctypes.CDLL | None) -> ctypes.CDLL:
    """lib if given (a load_build library: tests, benchmarks), else load()'s, else RuntimeError."""
    lib = lib or load()
    if lib is None:
        raise RuntimeError(f"the native library is unavailable: {unavailable_reason()}")
    return lib


def _slots(model: LeNet5V1) -> list[torch.Tensor | None]:
    """The 14 parameter slots of native_step.c, in model.parameters() order (None: no batch norm)."""
    L = _layers(model)
    bn1, bn2 = ((bn.weight, bn.bias) if bn is not None else (None, None) for bn in (L.bn1, L.bn2))
    return [L.conv1.weight, L.conv1.bias, *bn1, L.conv2.weight, L.conv2.bias, *bn2,
            L.fc1.weight, L.fc1.bias, L.fc2.weight, L.fc2.bias, L.fc3.weight, L.fc3.bias]


def _buffers(model: LeNet5V1) -> list[torch.Tensor | None]:
    """running_mean/var of both batch norms, then their num_batches_tracked (None without)."""
    L = _layers(model)
    if L.bn1 is None:
        return [None] * 6
    return [L.bn1.running_mean, L.bn1.running_var, L.bn2.running_mean, L.bn2.running_var,
            L.bn1.num_batches_tracked, L.bn2.num_batches_tracked]


def _variant(model: LeNet5V1) -> tuple[int, int]:
    """The (relu, maxpool) flags of native_step.c for the model's activation and pooling."""
    activation, pool = getattr(model, "activation", None), getattr(model, "pool", None)
    if activation not in _ACTIVATIONS or pool not in _POOLS:
        raise ValueError(f"activation {activation!r} and pool {pool!r} (the native step has "
                         f"{', '.join(_ACTIVATIONS)} and {', '.join(_POOLS)})")
    return _ACTIVATIONS[activation], _POOLS[pool]


def _pointers(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() if t is not None else None for t in tensors])


def _threads(threads: int | None) -> int:
    """The thread count of one call: threads, or torch's own count at this moment when None (so
    torch.set_num_threads, as each trial calls it, reaches the native step too)."""
    n = torch.get_num_threads() if threads is None else threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    return min(n, MAX_THREADS)


def _misaligned(tensors, vector_bytes: int) -> str | None:
    """The first tensor whose storage does not start on a vector_bytes boundary, as a message.

    Parameters, batch-norm buffers and optimiser state are bound once (NativeTrainer._bind) and
    must start on a vector boundary (torch's CPU allocator gives 64 bytes; a view into a flat
    buffer may not): a misaligned vector load is a crash, not an exception. The C step copies
    the per-step inputs before any vector load, so slices such as order[start:start + batch] do."""
    for t in tensors:
        if t is not None and t.data_ptr() % vector_bytes:
            return (f"a {tuple(t.shape)} {t.dtype} tensor at {t.data_ptr():#x} is not aligned to the "
                    f"{vector_bytes}-byte vectors of the native step")
    return None


def _model_problem(model, lib: ctypes.CDLL) -> str | None:
    if not isinstance(model, LeNet5V1):
        return f"not a LeNet5V1 ({type(model).__name__})"
    try:
        _variant(model)
    except ValueError as exc:
        return str(exc)
    tensors = [*_slots(model), *_buffers(model)]
    dtypes = [torch.float32] * (len(tensors) - 2) + [torch.int64] * 2  # num_batches_tracked last
    if any(t is not None and (t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous())
           for t, dtype in zip(tensors, dtypes)):
        return "parameters and buffers must be contiguous float32 (num_batches_tracked int64) CPU tensors"
    return _misaligned(tensors, lib.ln_vector_bytes())


class NativeTrainer:
    """Trains one LeNet5V1 in place with the native step, the optimiser's state kept in torch.

    Each train_step is one torch-equivalent step: fast_forward in training mode (the model's
    activation and pooling; batch norm on batch statistics, updating running_mean/var with the
    unbiased variance and num_batches_tracked; dropout by the given scale),
    F.cross_entropy(logits, y, label_smoothing=label_smoothing) (mean), backward, and
    optimizer.step() with the hyperparameters read from optimizer.param_groups at each step.
    model.activation, model.pool and self.label_smoothing are read at each step too. Nothing is
    cached between steps except pointers, so sync() has nothing to write back.

    Each step runs on self.threads threads (None: torch.get_num_threads() at that step; it may
    be reassigned between steps). The results are the same bits for any thread count.
    """

    def __init__(self, model: LeNet5V1, optimizer: torch.optim.Optimizer, *,
                 label_smoothing: float = 0.0, lib: ctypes.CDLL | None = None,
                 threads: int | None = None) -> None:
        if not 0.0 <= label_smoothing <= 1.0:  # F.cross_entropy's range; also refuses NaN
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        lib = _library(lib)
        reason = self.supports(model, 1, optimizer, lib=lib)
        if reason is not None:
            raise ValueError(f"the native step cannot train this: {reason}")
        self._lib, self.model, self.optimizer = lib, model, optimizer
        self.label_smoothing = float(label_smoothing)
        _threads(threads)  # refused here rather than at the first step
        self.threads = threads
        self._kind = _OPTIMIZERS[type(optimizer)]
        self._params = _slots(model)
        self._live = [t for t in self._params if t is not None]
        L = _layers(model)
        self._bn = L.bn1
        # the batch norms' buffer dicts: plain dict reads per step, not nn.Module.__getattr__
        bn_buffers = [bn._buffers for bn in (L.bn1, L.bn2) if bn is not None]
        self._bn_dicts = [d for d in bn_buffers for _ in _BN_BUFFERS]
        self._bn_keys = [k for _ in bn_buffers for k in _BN_BUFFERS]
        self._totals = (ctypes.c_double * 2)()
        self._args = StepArgs(totals=ctypes.addressof(self._totals), optimizer=self._kind)
        self._state_dict: dict | None = None  # the optimizer.state last bound (see _bind)
        self._ws = lib.ln_ws_new()
        if not self._ws:
            raise MemoryError("native workspace")
        weakref.finalize(self, lib.ln_ws_free, self._ws)

    @staticmethod
    def supports(model, batch_size: int, optimizer: torch.optim.Optimizer | None = None, *,
                 lib: ctypes.CDLL | None = None) -> str | None:
        """None if the native step can train this model (and optimizer) at this batch size,
        else the reason it cannot (the caller then keeps the PyTorch path)."""
        lib = lib or load()
        if lib is None:
            return f"the native library is unavailable: {unavailable_reason()}"
        if batch_size < 1:
            return f"batch size {batch_size}"
        problem = _model_problem(model, lib)
        if problem is not None or optimizer is None:
            return problem
        if type(optimizer) not in _OPTIMIZERS:
            return f"optimizer {type(optimizer).__name__} (only Adam, AdamW and SGD are native)"
        return next((f"{flag} is set" for flag in _UNSUPPORTED if optimizer.param_groups[0].get(flag)), None)

    def _state_tensors(self) -> tuple[list, list, list]:
        """The optimiser's state tensors per slot (None: none), created as torch's first step would."""
        momentum = self.optimizer.param_groups[0].get("momentum", 0) != 0
        s1, s2, steps = [], [], []
        for p in self._params:
            state = {} if p is None else self.optimizer.state[p]
            if p is not None and self._kind == 2:
                if momentum and state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif p is not None and not state:
                state.update(step=torch.zeros((), dtype=torch.float32),
                             exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                             exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
            s1.append(state.get("momentum_buffer" if self._kind == 2 else "exp_avg"))
            s2.append(state.get("exp_avg_sq"))
            steps.append(state.get("step"))
        for t, p in zip(s1 + s2, self._params * 2):
            if t is not None:
                _check(t, torch.float32, tuple(p.shape), "optimizer state")
        for t in steps:
            if t is not None:
                _check(t, torch.float32, (), "optimizer step")
        return s1, s2, steps

    def _identity(self) -> tuple:
        """What the bound pointers rest on: every tensor behind them and the state entries
        (map() rather than comprehensions: 7 us against 10 per step for tuned's 60 lookups)."""
        data_ptr = torch.Tensor.data_ptr
        return (len(self.optimizer.state), *map(data_ptr, self._live),
                *map(data_ptr, map(dict.__getitem__, self._bn_dicts, self._bn_keys)),
                *map(id, map(dict.get, self._entry_dicts, self._entry_keys)))

    def _bind(self) -> None:
        """The argument record's pointer arrays; rebuilt whenever a tensor behind them was replaced:
        optimizer.load_state_dict swaps the state dict, an entry of it may be assigned a new
        tensor, a buffer may be reassigned (a few us per step to check)."""
        state = self.optimizer.state
        if state is not self._state_dict or self._identity() != self._bound:
            # once per binding, not per step: everything the C step keeps a pointer to must
            # still be contiguous, of its dtype and on a vector boundary
            s1, s2, steps = self._state_tensors()
            problem = (_model_problem(self.model, self._lib)
                       or _misaligned([*s1, *s2], self._lib.ln_vector_bytes()))
            if problem is not None:
                raise ValueError(f"the native step cannot train this: {problem}")
            buffers = _buffers(self.model)
            arrays = (_pointers(self._params), _pointers(buffers[:4]), _pointers(buffers[4:]),
                      _pointers(s1), _pointers(s2), _pointers(steps))
            for field, array in zip(("params", "run", "nbt", "s1", "s2", "steps"), arrays):
                setattr(self._args, field, ctypes.addressof(array))
            self._arrays = arrays  # held: the record points into them
            # state may have been created just now: the identity after creation is the one to keep
            self._state_dict = state
            entries = [(state[p], k) for p in self._live for k, t in state[p].items()
                       if isinstance(t, torch.Tensor)]
            self._entry_dicts, self._entry_keys = [d for d, _ in entries], [k for _, k in entries]
            self._bound = self._identity()
            self._keep = (s1, s2, steps)  # held, so that no new tensor takes a bound one's id

    def train_step(self, x: torch.Tensor, y: torch.Tensor, dropout_scale: torch.Tensor | None = None) -> None:
        """One step on the batch (x: (B, 1, 28, 28) float32, y: (B,) int64); dropout_scale is
        keep / (1 - p) of shape (B, 120), or None for no dropout."""
        self._step(x, y, None, len(x), dropout_scale)

    def train_step_indexed(self, train_x: torch.Tensor, train_y: torch.Tensor, idx: torch.Tensor,
                           dropout_scale: torch.Tensor | None = None, draws: EpochDraws | None = None,
                           start: int = 0) -> None:
        """train_step(train_x[idx], train_y[idx], dropout_scale) with the gather done in C; with
        draws, the images are draws.apply(train_x[idx], start), augmented in the same copy (the
        batch being images start, start + 1, ... of the epoch's draws)."""
        _check(idx, torch.int64, (len(idx),), "idx")
        self._step(train_x, train_y, idx, len(idx), dropout_scale, draws, start)

    def _step(self, x, y, idx, batch: int, dropout_scale, draws: EpochDraws | None = None,
              start: int = 0) -> None:
        _check(x, torch.float32, (len(x), 1, 28, 28), "x")
        _check(y, torch.int64, (len(x),), "y")
        if batch < 1:
            raise ValueError("empty batch")
        if dropout_scale is not None:
            _check(dropout_scale, torch.float32, (batch, 120), "dropout_scale")  # 120: fc1's outputs
        self._bind()
        a, group = self._args, self.optimizer.param_groups[0]
        a.relu, a.maxpool = _variant(self.model)
        a.threads = _threads(self.threads)
        a.x, a.y, a.rows, a.batch = x.data_ptr(), y.data_ptr(), len(x), batch
        a.idx = idx.data_ptr() if idx is not None else None
        a.drop = dropout_scale.data_ptr() if dropout_scale is not None else None
        a.bn_eps, a.bn_momentum = (self._bn.eps, self._bn.momentum) if self._bn is not None else (0.0, 0.0)
        a.lr, (a.beta1, a.beta2) = float(group["lr"]), group.get("betas", (0.0, 0.0))
        a.eps, a.momentum = group.get("eps", 0.0), group.get("momentum", 0.0)
        a.weight_decay = group["weight_decay"]
        a.smoothing = self.label_smoothing
        a.move, a.pad, a.erase_rows, a.erase_cols, a.background = _augment_args(draws, start, batch)
        rc = self._lib.ln_train_step(self._ws, a)
        if rc == -1:
            raise IndexError("an index of the batch is out of range")
        if rc == -2:
            raise ValueError("a label is outside 0..9")
        if rc == -4:
            raise ValueError(f"the native step refused a batch of {batch}")
        if rc != 0:
            raise MemoryError("native step: out of memory")

    def take_totals(self) -> tuple[float, int]:
        """(summed loss, correct predictions) over the steps since the last call; resets them."""
        loss, correct = self._totals[0], int(self._totals[1])
        self._totals[0] = self._totals[1] = 0.0
        return loss, correct

    def sync(self) -> None:
        """Nothing to write back: the step updates the model's and the optimiser's own tensors."""


def _check(t: torch.Tensor, dtype: torch.dtype, shape: tuple, name: str) -> None:
    if t.dtype is not dtype or not t.is_cpu or not t.is_contiguous() or t.shape != shape:
        raise ValueError(f"{name} must be a contiguous {dtype} CPU tensor of shape {shape}, "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device}")


def _augment_args(draws: EpochDraws | None, start: int, batch: int) -> tuple:
    """The record's augmentation fields (move, pad, erase_rows, erase_cols, background): the
    batch's own slice of the epoch's moves (a pointer
    to its first element), the largest shift, the slices of the erasing rows and columns, and the
    background value."""
    if draws is None or (draws.move is None and draws.rows is None):
        return None, 0, None, None, 0.0
    n = len(draws.move) if draws.move is not None else len(draws.rows)
    if draws.move is not None:
        _check(draws.move, torch.int64, (n,), "draws.move")
        if not 0 <= draws.aug.translate < 28:  # native_step.c's rows assume a shift inside the image
            raise ValueError(f"translate must be 0 to 27, got {draws.aug.translate}")
    if draws.rows is not None:
        _check(draws.rows, torch.float32, (n, 28), "draws.rows")
        _check(draws.cols, torch.float32, (n, 28), "draws.cols")
    if not 0 <= start <= n - batch:
        raise IndexError(f"the draws have no images {start}..{start + batch - 1}")
    move, rows, cols = (None if t is None else t.data_ptr() + start * t.stride(0) * t.element_size()
                        for t in (draws.move, draws.rows, draws.cols))
    return move, draws.aug.translate, rows, cols, draws.background


_forward_workspaces: dict[int, tuple] = {}  # id(lib) -> (lib, its workspace, the workspace's lock)


def _forward_workspace(lib) -> tuple[int, threading.Lock]:
    """The library's workspace for forward(), made once and freed at exit: its buffers and
    threads stay for the next call (evaluation calls forward per 500 images). The entry holds
    lib, so that its id is never another library's."""
    key = id(lib)
    if key not in _forward_workspaces:
        ws = lib.ln_ws_new()
        if not ws:
            raise MemoryError("native workspace")
        _forward_workspaces[key] = (lib, ws, threading.Lock())
        weakref.finalize(lib, lib.ln_ws_free, ws)  # at exit: lib lives as long as the entry
    return _forward_workspaces[key][1:]


def forward(model: LeNet5V1, x: torch.Tensor, *, lib: ctypes.CDLL | None = None,
            threads: int | None = None) -> torch.Tensor:
    """Eval-mode logits (N, 10) of x (N, 1, 28, 28): the model's activation and pooling, batch
    norm on running statistics, no dropout, whatever model.training says; on threads threads
    (None: torch.get_num_threads()), each on its own 64-image chunks (the same logits for any
    count)."""
    lib = _library(lib)
    count = _threads(threads)
    problem = _model_problem(model, lib)
    if problem is not None:
        raise ValueError(f"the native forward cannot run this: {problem}")
    x = x.detach().to(torch.float32).contiguous()
    _check(x, torch.float32, (len(x), 1, 28, 28), "x")
    out = torch.empty((len(x), 10), dtype=torch.float32)
    bn = _layers(model).bn1
    params, run = _pointers(_slots(model)), _pointers(_buffers(model)[:4])
    relu, maxpool = _variant(model)
    a = StepArgs(params=ctypes.addressof(params), run=ctypes.addressof(run), x=x.data_ptr(), rows=len(x),
                 out=out.data_ptr(), bn_eps=bn.eps if bn is not None else 0.0, relu=relu, maxpool=maxpool,
                 threads=count)
    ws, lock = _forward_workspace(lib)
    with torch.no_grad():
        if lock.acquire(blocking=False):  # another Python thread in a forward: a workspace of its own
            try:
                rc = lib.ln_forward(ws, a)
            finally:
                lock.release()
        else:
            rc = lib.ln_forward(None, a)
    if rc != 0:
        raise MemoryError("native forward: out of memory")
    return out
