"""The native training step from Python: NativeTrainer steps on the model's and optimiser's own tensors.

Their state_dicts stay what torch would hold, so checkpoints move freely between the native
and PyTorch paths. Each step runs on torch.get_num_threads() threads unless told otherwise,
with the same results for any count.
"""

from __future__ import annotations

import ctypes
import weakref

import torch

from ..augment import EpochDraws
from ..mixing import MixDraws
from ..model import LeNet5V1, _layers
from . import library
from .abi import CONSTANTS, StepArgs
from .binding import (
    BN_BUFFERS,
    OPTIMIZERS,
    UNSUPPORTED,
    buffers,
    check_tensor,
    misaligned,
    model_problem,
    pointers,
    slots,
    thread_count,
    variant,
)


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
        lib = library.library_or_load(lib)
        reason = self.supports(model, 1, optimizer, lib=lib)
        if reason is not None:
            raise ValueError(f"the native step cannot train this: {reason}")
        self._lib, self.model, self.optimizer = lib, model, optimizer
        self.label_smoothing = float(label_smoothing)
        thread_count(threads)  # refused here rather than at the first step
        self.threads = threads
        self._kind = OPTIMIZERS[type(optimizer)]
        self._params = slots(model)
        self._live = [t for t in self._params if t is not None]
        L = _layers(model)
        self._bn = L.bn1
        # the batch norms' buffer dicts: plain dict reads per step, not nn.Module.__getattr__
        bn_buffers = [bn._buffers for bn in (L.bn1, L.bn2) if bn is not None]
        self._bn_dicts = [d for d in bn_buffers for _ in BN_BUFFERS]
        self._bn_keys = [k for _ in bn_buffers for k in BN_BUFFERS]
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
        lib = lib or library.load()
        if lib is None:
            return f"the native library is unavailable: {library.unavailable_reason()}"
        if batch_size < 1:
            return f"batch size {batch_size}"
        problem = model_problem(model, lib)
        if problem is not None or optimizer is None:
            return problem
        if type(optimizer) not in OPTIMIZERS:
            return f"optimizer {type(optimizer).__name__} (only Adam, AdamW and SGD are native)"
        return next((f"{flag} is set" for flag in UNSUPPORTED if optimizer.param_groups[0].get(flag)), None)

    def _state_tensors(self) -> tuple[list, list, list]:
        """The optimiser's state tensors per slot (None: none), created as torch's first step would."""
        momentum = self.optimizer.param_groups[0].get("momentum", 0) != 0
        s1, s2, steps = [], [], []
        for p in self._params:
            state = {} if p is None else self.optimizer.state[p]
            if p is not None and self._kind == CONSTANTS["OPT_SGD"]:
                if momentum and state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif p is not None and not state:
                state.update(step=torch.zeros((), dtype=torch.float32),
                             exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                             exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
            s1.append(state.get("momentum_buffer" if self._kind == CONSTANTS["OPT_SGD"] else "exp_avg"))
            s2.append(state.get("exp_avg_sq"))
            steps.append(state.get("step"))
        for t, p in zip(s1 + s2, self._params * 2):
            if t is not None:
                check_tensor(t, torch.float32, tuple(p.shape), "optimizer state")
        for t in steps:
            if t is not None:
                check_tensor(t, torch.float32, (), "optimizer step")
        return s1, s2, steps

    def _identity(self) -> tuple:
        """What the bound pointers rest on: every tensor behind them and the state entries
        (map() rather than comprehensions: faster, and it runs every step)."""
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
            problem = (model_problem(self.model, self._lib)
                       or misaligned([*s1, *s2], self._lib.ln_vector_bytes()))
            if problem is not None:
                raise ValueError(f"the native step cannot train this: {problem}")
            bufs = buffers(self.model)
            arrays = (pointers(self._params), pointers(bufs[:4]), pointers(bufs[4:]),
                      pointers(s1), pointers(s2), pointers(steps))
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

    def train_step(self, x: torch.Tensor, y: torch.Tensor, dropout_scale: torch.Tensor | None = None,
                   mix: MixDraws | None = None, premixed: bool = False,
                   targets: torch.Tensor | None = None) -> None:
        """One step on the batch (x: (B, 1, 28, 28) float32, y: (B,) int64); dropout_scale is
        keep / (1 - p) of shape (B, 120), or None for no dropout; mix: the batch's mixing (its
        first B draws): the images mix.images(x, 0) (x itself if premixed: mixed already) and
        the soft targets mix.targets(y, 0); targets: (B, 10) float32 soft targets, each in
        [0, 1], which replace the labels' (and mixing's) in the loss (distillation)."""
        self._step(x, y, None, len(x), dropout_scale, None, 0, mix, premixed, targets)

    def train_step_indexed(self, train_x: torch.Tensor, train_y: torch.Tensor, idx: torch.Tensor,
                           dropout_scale: torch.Tensor | None = None, draws: EpochDraws | None = None,
                           start: int = 0, mix: MixDraws | None = None,
                           targets: torch.Tensor | None = None) -> None:
        """train_step(train_x[idx], train_y[idx], dropout_scale) with the gather done in C; with
        draws, the images are draws.apply(train_x[idx], start), augmented in the same copy (the
        batch being images start, start + 1, ... of the epoch's draws); with mix, then
        mix.images(..., start), trained on the soft targets mix.targets(train_y[idx], start);
        targets: the batch's own (B, 10) soft targets, as train_step's."""
        check_tensor(idx, torch.int64, (len(idx),), "idx")
        self._step(train_x, train_y, idx, len(idx), dropout_scale, draws, start, mix, False, targets)

    def _step(self, x, y, idx, batch: int, dropout_scale, draws: EpochDraws | None = None,
              start: int = 0, mix: MixDraws | None = None, premixed: bool = False,
              targets: torch.Tensor | None = None) -> None:
        check_tensor(x, torch.float32, (len(x), 1, 28, 28), "x")
        check_tensor(y, torch.int64, (len(x),), "y")
        if batch < 1:
            raise ValueError("empty batch")
        if dropout_scale is not None:
            check_tensor(dropout_scale, torch.float32, (batch, 120), "dropout_scale")  # 120: fc1's outputs
        if targets is not None:
            check_tensor(targets, torch.float32, (batch, 10), "targets")
        self._bind()
        a, group = self._args, self.optimizer.param_groups[0]
        a.relu, a.maxpool = variant(self.model)
        a.threads = thread_count(self.threads)
        a.x, a.y, a.rows, a.batch = x.data_ptr(), y.data_ptr(), len(x), batch
        a.idx = idx.data_ptr() if idx is not None else None
        a.drop = dropout_scale.data_ptr() if dropout_scale is not None else None
        a.bn_eps, a.bn_momentum = (self._bn.eps, self._bn.momentum) if self._bn is not None else (0.0, 0.0)
        a.lr, (a.beta1, a.beta2) = float(group["lr"]), group.get("betas", (0.0, 0.0))
        a.eps, a.momentum = group.get("eps", 0.0), group.get("momentum", 0.0)
        a.weight_decay = group["weight_decay"]
        a.smoothing = self.label_smoothing
        a.move, a.pad, a.erase_rows, a.erase_cols, a.background = augment_args(draws, start, batch)
        a.mix_with, a.mix_lam, a.mix_box = mix_args(mix, start, batch)
        if premixed:
            a.mix_box = None  # the soft targets only
        a.targets = targets.data_ptr() if targets is not None else None
        rc = self._lib.ln_train_step(self._ws, a)
        if rc == CONSTANTS["LN_BAD_INDEX"]:
            raise IndexError("an index of the batch is out of range")
        if rc == CONSTANTS["LN_BAD_LABEL"]:
            raise ValueError("a label is outside 0..9")
        if rc == CONSTANTS["LN_BAD_MIX"]:
            raise ValueError("the mixing draws reach outside the batch or the image, or a weight is "
                             "outside [0, 1]")
        if rc == CONSTANTS["LN_BAD_TARGET"]:
            raise ValueError("a soft target is outside [0, 1]")
        if rc == CONSTANTS["LN_BAD_BATCH"]:
            raise ValueError(f"the native step refused a batch of {batch}")
        if rc != CONSTANTS["LN_OK"]:
            raise MemoryError("native step: out of memory")

    def take_totals(self) -> tuple[float, int]:
        """(summed loss, correct predictions) over the steps since the last call; resets them."""
        loss, correct = self._totals[0], int(self._totals[1])
        self._totals[0] = self._totals[1] = 0.0
        return loss, correct

    def sync(self) -> None:
        """Nothing to write back: the step updates the model's and the optimiser's own tensors."""


def augment_args(draws: EpochDraws | None, start: int, batch: int) -> tuple:
    """The record's augmentation fields (move, pad, erase_rows, erase_cols, background): the
    batch's own slice of the epoch's moves (a pointer
    to its first element), the largest shift, the slices of the erasing rows and columns, and the
    background value."""
    if draws is None or (draws.move is None and draws.rows is None):
        return None, 0, None, None, 0.0
    n = len(draws.move) if draws.move is not None else len(draws.rows)
    if draws.move is not None:
        check_tensor(draws.move, torch.int64, (n,), "draws.move")
        if not 0 <= draws.aug.translate < 28:  # augment_pack.c's rows assume a shift inside the image
            raise ValueError(f"translate must be 0 to 27, got {draws.aug.translate}")
    if draws.rows is not None:
        check_tensor(draws.rows, torch.float32, (n, 28), "draws.rows")
        check_tensor(draws.cols, torch.float32, (n, 28), "draws.cols")
    if not 0 <= start <= n - batch:
        raise IndexError(f"the draws have no images {start}..{start + batch - 1}")
    move, rows, cols = (None if t is None else t.data_ptr() + start * t.stride(0) * t.element_size()
                        for t in (draws.move, draws.rows, draws.cols))
    return move, draws.aug.translate, rows, cols, draws.background


def mix_args(mix: MixDraws | None, start: int, batch: int) -> tuple:
    """The record's mixing fields (mix_with, mix_lam, mix_box): pointers to the batch's own
    slices of the epoch's draws (the C step checks their values), or NULLs."""
    if mix is None:
        return None, None, None
    n = len(mix.partner)
    check_tensor(mix.partner, torch.int64, (n,), "mix.partner")
    check_tensor(mix.lam, torch.float32, (n,), "mix.lam")
    check_tensor(mix.box, torch.int64, (n, 4), "mix.box")
    if not 0 <= start <= n - batch:
        raise IndexError(f"the mixing draws have no images {start}..{start + batch - 1}")
    return tuple(t.data_ptr() + start * t.stride(0) * t.element_size()
                 for t in (mix.partner, mix.lam, mix.box))
