"""Libraries from older sources of the native step, for a baseline: each driven as its source expects.

Legacy: a source before the argument record (e056921 and older), driven by its old positional
interface; tests/fixtures/native_step_e056921.c is one, checked in so that no test reads git
history. before_constants: a source with the record but before constants.h (4af1912, the
single native_step.c before the split), whose record the stamp still checks.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from lenetlab.native import StepArgs, abi

BEFORE_THREADS = Path(__file__).resolve().parents[1] / "fixtures" / "native_step_e056921.c"


class Legacy:
    """A library without the ABI stamp, for a test's or a benchmark's baseline only: ln_train_step
    and ln_forward take a StepArgs and call the old positional interface, declared here and never
    changed again (older sources ignore the trailing arguments they lack); single-threaded.
    Pass it as load_build(..., legacy=Legacy)."""

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


def before_constants(lib: ctypes.CDLL) -> ctypes.CDLL:
    """A library whose record is this StepArgs but which reports no constants (4af1912 and
    before): its record checked, then declared as a current one. Its constants are the ones
    constants.h has (they had not changed when it was written)."""
    problem = abi._record_problem(lib)
    if problem is not None:
        raise ValueError(f"not a library of this argument record: {problem[1]}")
    abi.declare(lib)
    return lib


def driver(source: str):
    """The driver load_build(legacy=) takes for a library built from source, None for a current one."""
    if "LN_ARGS" not in source:
        return Legacy
    if "ln_constants" not in source:
        return before_constants
    return None
