"""The native (C) training step and eval forward of LeNet5V1 on CPU: what the rest of lenetlab uses of it.

The C files beside this one hold the kernels, compiled as one translation unit from lenet5.c;
docs/native.md maps them and the modules here, one job each:
    source     the C files, and the one text that is compiled and keyed on
    toolchain  the compiler and its flags (CC, the target flag by probe, extra flags), build()
    cache      the per-user build cache: key, checksum, lock
    abi        the argument record (StepArgs), constants.h's table, the stamp check
    library    load() (built on first use, None and unavailable_reason() where it cannot)
               and load_build() (other flags, for tests and benchmarks: pass it as lib=)
    binding    what the step reads from a model and optimiser, and whether it can
    trainer    NativeTrainer: steps on the model's and the optimiser's own tensors, so their
               state_dicts stay what torch would hold
    forward    forward(): eval-mode logits
    gate       which step trains a recipe: native_gap, choose, announce
Both the step and the forward run on torch.get_num_threads() threads unless told otherwise
(threads=), with the same results for any count.

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
