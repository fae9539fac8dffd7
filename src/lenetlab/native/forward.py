"""The native eval-mode forward: logits of a batch of images, on one workspace kept per library."""

from __future__ import annotations

import ctypes
import threading
import weakref

import torch

from ..model import LeNet5V1, _layers
from . import library
from .abi import CONSTANTS, StepArgs
from .binding import buffers, check_tensor, model_problem, pointers, slots, thread_count, variant

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
    lib = library.library_or_load(lib)
    count = thread_count(threads)
    problem = model_problem(model, lib)
    if problem is not None:
        raise ValueError(f"the native forward cannot run this: {problem}")
    x = x.detach().to(torch.float32).contiguous()
    check_tensor(x, torch.float32, (len(x), 1, 28, 28), "x")
    out = torch.empty((len(x), 10), dtype=torch.float32)
    bn = _layers(model).bn1
    params, run = pointers(slots(model)), pointers(buffers(model)[:4])
    relu, maxpool = variant(model)
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
    if rc != CONSTANTS["LN_OK"]:
        raise MemoryError("native forward: out of memory")
    return out
