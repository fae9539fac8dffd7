"""What the C step reads from a model and optimiser: slots, buffers, variant flags, and whether it can."""

from __future__ import annotations

import ctypes

import torch

from ..model import LeNet5V1, _layers
from .abi import CONSTANTS, MAX_THREADS

C = CONSTANTS
OPTIMIZERS = {torch.optim.Adam: C["OPT_ADAM"], torch.optim.AdamW: C["OPT_ADAMW"],
              torch.optim.SGD: C["OPT_SGD"]}
ACTIVATIONS = {"tanh": 0, "relu": 1}  # ln_args' relu flag
POOLS = {"avg": 0, "max": 1}  # its maxpool flag
UNSUPPORTED = ("maximize", "differentiable", "capturable", "amsgrad", "nesterov", "dampening")
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def slots(model: LeNet5V1) -> list[torch.Tensor | None]:
    """The parameter slots of ln_args.params, each at its index of constants.h (None: no batch norm)."""
    L = _layers(model)
    bn1, bn2 = ((bn.weight, bn.bias) if bn is not None else (None, None) for bn in (L.bn1, L.bn2))
    by_name = {"P_C1W": L.conv1.weight, "P_C1B": L.conv1.bias, "P_BN1W": bn1[0], "P_BN1B": bn1[1],
               "P_C2W": L.conv2.weight, "P_C2B": L.conv2.bias, "P_BN2W": bn2[0], "P_BN2B": bn2[1],
               "P_F1W": L.fc1.weight, "P_F1B": L.fc1.bias, "P_F2W": L.fc2.weight, "P_F2B": L.fc2.bias,
               "P_F3W": L.fc3.weight, "P_F3B": L.fc3.bias}
    out: list[torch.Tensor | None] = [None] * C["NPARAM"]
    for name, tensor in by_name.items():
        out[C[name]] = tensor
    return out


def buffers(model: LeNet5V1) -> list[torch.Tensor | None]:
    """ln_args.run's running_mean/var of both batch norms, each at its index of constants.h, then
    their num_batches_tracked (None without)."""
    L = _layers(model)
    if L.bn1 is None:
        return [None] * 6
    run: list[torch.Tensor] = [None] * 4  # type: ignore[list-item]
    for name, tensor in (("R_MEAN1", L.bn1.running_mean), ("R_VAR1", L.bn1.running_var),
                         ("R_MEAN2", L.bn2.running_mean), ("R_VAR2", L.bn2.running_var)):
        run[C[name]] = tensor
    return [*run, L.bn1.num_batches_tracked, L.bn2.num_batches_tracked]


def variant(model: LeNet5V1) -> tuple[int, int]:
    """The (relu, maxpool) flags of ln_args for the model's activation and pooling."""
    activation, pool = getattr(model, "activation", None), getattr(model, "pool", None)
    if activation not in ACTIVATIONS or pool not in POOLS:
        raise ValueError(f"activation {activation!r} and pool {pool!r} (the native step has "
                         f"{', '.join(ACTIVATIONS)} and {', '.join(POOLS)})")
    return ACTIVATIONS[activation], POOLS[pool]


def pointers(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() if t is not None else None for t in tensors])


def thread_count(threads: int | None) -> int:
    """The thread count of one call: threads, or torch's own count at this moment when None (so
    torch.set_num_threads, as each trial calls it, reaches the native step too)."""
    n = torch.get_num_threads() if threads is None else threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    return min(n, MAX_THREADS)


def misaligned(tensors, vector_bytes: int) -> str | None:
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


def model_problem(model, lib: ctypes.CDLL) -> str | None:
    if not isinstance(model, LeNet5V1):
        return f"not a LeNet5V1 ({type(model).__name__})"
    try:
        variant(model)
    except ValueError as exc:
        return str(exc)
    tensors = [*slots(model), *buffers(model)]
    dtypes = [torch.float32] * (len(tensors) - 2) + [torch.int64] * 2  # num_batches_tracked last
    if any(t is not None and (t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous())
           for t, dtype in zip(tensors, dtypes)):
        return "parameters and buffers must be contiguous float32 (num_batches_tracked int64) CPU tensors"
    return misaligned(tensors, lib.ln_vector_bytes())


def check_tensor(t: torch.Tensor, dtype: torch.dtype, shape: tuple, name: str) -> None:
    if t.dtype is not dtype or not t.is_cpu or not t.is_contiguous() or t.shape != shape:
        raise ValueError(f"{name} must be a contiguous {dtype} CPU tensor of shape {shape}, "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device}")
