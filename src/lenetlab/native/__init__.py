"""The native (C) training step and eval forward of LeNet5V1 on CPU: build, cache, load, drive.

The C files beside this one hold the kernels (docs/native.md maps them). load() compiles it on
first use into a per-user cache and loads it with ctypes, or returns None where it cannot
(unavailable_reason() says why). NativeTrainer steps on the model's own parameter tensors and
the optimiser's own state tensors, so their state_dicts stay what torch would hold and
checkpoints move freely between the native and PyTorch paths; forward() gives eval-mode
logits. Both run on torch.get_num_threads() threads unless told otherwise (threads=), with the
same results for any count. load_build() builds with other flags, for tests and benchmarks that
compare builds in one process (passed as lib= to NativeTrainer, supports and forward).

Python and C exchange one argument record (StepArgs, record.c's ln_args), whose layout
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

from .abi import ABI, MAX_THREADS, StepArgs
from .cache import NativeBuildError, cache_dir
from .forward import forward
from .gate import NATIVE_FIELDS, announce, choose, native_gap
from .library import build_flags, build_target, load, load_build, unavailable_reason
from .source import FOLDER, ROOT, source_text
from .toolchain import (
                        COMMON_FLAGS,
                        EXTRA_FLAGS_ENV,
                        LIBRARY_FLAGS,
                        TARGET_FLAGS,
                        build,
                        compiler,
                        extra_flags,
                        library_flags,
                        target_candidates,
                        target_flags,
)
from .trainer import NativeTrainer

__all__ = ["ABI", "COMMON_FLAGS", "EXTRA_FLAGS_ENV", "FOLDER", "LIBRARY_FLAGS", "MAX_THREADS",
           "NATIVE_FIELDS", "ROOT", "TARGET_FLAGS", "NativeBuildError", "NativeTrainer", "StepArgs",
           "announce", "build", "build_flags", "build_target", "cache_dir", "choose", "compiler",
           "extra_flags", "forward", "library_flags", "load", "load_build", "native_gap", "source_text",
           "target_candidates", "target_flags", "unavailable_reason"]
