"""The training loop of one (recipe, seed) trial: fast, deterministic, resumable, and stopped by divergence.

Following airbench, the whole split lives as one tensor on the device and batches are
taken by index. On the CPU the whole step (forward, loss, backward, optimiser) runs in
native code where it builds (native.py); elsewhere, and with kernels="torch", it runs
through PyTorch with the faster forward pass of model.py.

All randomness comes from the seed: the initial weights from torch.manual_seed, each
epoch's data order and dropout masks from generators seeded by (seed, epoch), the same
streams on both paths. So a run resumed from the checkpoint of epoch k replays epochs
k+1... exactly.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import files, native
from .data import Splits
from .evaluation import Evaluation, evaluate
from .model import LeNet5V1, fast_forward
from .recipes import OPTIMIZERS, RECIPES, Recipe
from .records import Diverged, EpochMetrics


@dataclass(frozen=True)
class Phase:
    """A stretch of epochs trained with one optimiser (a warm start has two)."""

    recipe: Recipe
    first_epoch: int  # 1-based, global
    last_epoch: int


def phases(recipe: Recipe) -> list[Phase]:
    """The recipe's phases: its own epochs, preceded by its warm-start recipe's if any."""
    if recipe.warm_start_from is None:
        return [Phase(recipe, 1, recipe.epochs)]
    base = replace(RECIPES[recipe.warm_start_from], epochs=recipe.warm_start_epochs)
    return [Phase(base, 1, base.epochs),
            Phase(recipe, base.epochs + 1, base.epochs + recipe.epochs)]


def total_epochs(recipe: Recipe) -> int:
    return phases(recipe)[-1].last_epoch


def derived_seed(seed: int, epoch: int, stream: int) -> int:
    """A well-mixed 63-bit seed for one random stream (0: data order, 1: dropout) of one epoch."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(2, np.uint64)[0] >> 1)


def make_optimizer(recipe: Recipe, params) -> torch.optim.Optimizer:
    return OPTIMIZERS[recipe.optimizer](params, recipe)


def build_model(recipe: Recipe, seed: int) -> LeNet5V1:
    torch.manual_seed(seed)
    return LeNet5V1(recipe.use_dropout, recipe.use_batch_norm, recipe.dropout_rate)


def choose_kernels(kernels: str, device: torch.device, model: LeNet5V1, batch_size: int) -> str:
    """native or torch for this trial: native on the CPU where it builds and supports the recipe."""
    if kernels == "torch" or device.type != "cpu":
        return "torch"
    if native.load() is None or native.NativeTrainer.supports(model, batch_size) is not None:
        return "torch"
    return "native"


@dataclass
class TrialOutput:
    model: LeNet5V1
    history: list[EpochMetrics]
    test: Evaluation  # the final model on the test set
    kernels: str  # native or torch


def _load_checkpoint(path: Path, recipe: Recipe, seed: int) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None  # a damaged checkpoint only costs the epochs since the last good one: restart
    if not isinstance(state, dict) or state.get("recipe") != asdict(recipe) or state.get("seed") != seed:
        return None
    return state


class _TorchSteps:
    """The PyTorch step: fast_forward, cross-entropy, backward, the torch optimiser.

    Loss and accuracy are summed on the device; on a GPU the host never waits inside the
    step, and the first non-finite loss's step is remembered on the device too.
    """

    def __init__(self, model: LeNet5V1, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.model, self.optimizer, self.device = model, optimizer, device
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def step(self, i: int, train_x: torch.Tensor, train_y: torch.Tensor, idx: torch.Tensor,
             keep: torch.Tensor | None) -> None:
        x, y = train_x[idx], train_y[idx]
        logits = fast_forward(self.model, x, keep)
        loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.loss_sum += loss.detach() * len(y)
        self.correct += (logits.detach().argmax(1) == y).sum()
        if self.device.type == "cpu":  # reading a CPU scalar costs nothing: stop at once
            if not math.isfinite(loss.item()):
                self.first_bad.fill_(i)
                raise _NonFinite
        else:
            bad = ~torch.isfinite(loss) & (self.first_bad < 0)
            self.first_bad = torch.where(bad, torch.tensor(i, device=self.device), self.first_bad)

    def totals(self) -> tuple[float, int, int | None]:
        bad = int(self.first_bad.item())
        return self.loss_sum.item(), int(self.correct.item()), (bad if bad >= 0 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_forward(self.model, x)


class _NativeSteps:
    """The native whole step (native.py); the same interface as _TorchSteps."""

    def __init__(self, model: LeNet5V1, optimizer: torch.optim.Optimizer, dropout_p: float) -> None:
        self.model, self.dropout_p = model, dropout_p
        self.trainer = native.NativeTrainer(model, optimizer)
        self.loss_sum, self.correct, self.first_bad = 0.0, 0, None

    def step(self, i: int, train_x: torch.Tensor, train_y: torch.Tensor, idx: torch.Tensor,
             keep: torch.Tensor | None) -> None:
        scale = None if keep is None else keep.float().div_(1.0 - self.dropout_p)
        self.trainer.train_step_indexed(train_x, train_y, idx, scale)  # gathers the batch in C
        loss, correct = self.trainer.take_totals()
        self.loss_sum += loss
        self.correct += correct
        if not math.isfinite(loss):
            self.first_bad = i
            raise _NonFinite

    def totals(self) -> tuple[float, int, int | None]:
        self.trainer.sync()
        return self.loss_sum, self.correct, self.first_bad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return native.forward(self.model, x)


class _NonFinite(Exception):
    """Raised inside an epoch at the first non-finite loss (CPU paths)."""


def train_trial(
    recipe: Recipe,
    seed: int,
    splits: Splits,
    checkpoint: Path | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    stop_after_epoch: int | None = None,
    kernels: str = "auto",
) -> TrialOutput:
    """Train one recipe from one seed; evaluate train/val/test every epoch.

    With checkpoint set, the state after every epoch is saved there (atomically) and a
    matching checkpoint found there is resumed from. stop_after_epoch ends early (tests
    use it to simulate an interruption). Raises Diverged at the first non-finite loss.
    """
    device = splits.train_x.device
    if device.type == "cuda":  # same seed, same numbers: no nondeterministic cuDNN algorithms
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    model = build_model(recipe, seed).to(device)
    kernels = choose_kernels(kernels, device, model, recipe.batch_size)
    history: list[EpochMetrics] = []
    start_epoch = 1
    saved = _load_checkpoint(checkpoint, recipe, seed) if checkpoint else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        history = [EpochMetrics(**row) for row in saved["history"]]
        start_epoch = saved["epoch"] + 1

    train_x, train_y = splits.train_x, splits.train_y
    n, batch = len(train_x), recipe.batch_size
    dropout_p = recipe.dropout_rate if recipe.use_dropout else 0.0
    test = None
    for phase in phases(recipe):
        if phase.last_epoch < start_epoch:
            continue
        optimizer = make_optimizer(phase.recipe, model.parameters())
        if saved is not None and phase.first_epoch < start_epoch:
            optimizer.load_state_dict(saved["optimizer"])  # resuming inside this phase
        for epoch in range(max(start_epoch, phase.first_epoch), phase.last_epoch + 1):
            model.train()
            steps_impl = (_NativeSteps(model, optimizer, dropout_p) if kernels == "native"
                          else _TorchSteps(model, optimizer, device))
            order = torch.randperm(n, generator=torch.Generator().manual_seed(
                derived_seed(seed, epoch, 0))).to(device)
            dropout_gen = torch.Generator(device=device).manual_seed(derived_seed(seed, epoch, 1))
            steps = range(0, n, batch)
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(steps, desc=f"{recipe.name} s{seed} e{epoch}/{total_epochs(recipe)}",
                           leave=False, file=sys.stderr, dynamic_ncols=True)
                steps = bar
            try:
                for i, start in enumerate(steps):
                    idx = order[start:start + batch]
                    keep = None
                    if dropout_p > 0:  # drawn here for both paths, as fast_forward expects it
                        keep = torch.rand((len(idx), 120), generator=dropout_gen, device=device) >= dropout_p
                    steps_impl.step(i, train_x, train_y, idx, keep)
            except _NonFinite:
                pass
            finally:
                if bar is not None:
                    bar.close()
            loss_sum, correct, bad_step = steps_impl.totals()
            if bad_step is not None:
                raise Diverged(epoch, bad_step + 1)
            rows = [EpochMetrics(epoch, "train", loss_sum / n, correct / n)]
            for split in ("val", "test"):
                result = evaluate(model, *splits.split(split), forward=steps_impl.forward)
                if not math.isfinite(result.loss):
                    raise Diverged(epoch, None)
                rows.append(EpochMetrics(epoch, split, result.loss, result.accuracy))
                test = result
            history += rows
            if log is not None:
                log(format_epoch(recipe.name, seed, epoch, total_epochs(recipe), rows))
            if checkpoint is not None:
                files.torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                  "epoch": epoch, "history": [asdict(r) for r in history],
                                  "recipe": asdict(recipe), "seed": seed}, checkpoint)
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                return TrialOutput(model.eval(), history, test, kernels)
    if test is None:  # resumed from the last epoch's checkpoint: nothing was left to train
        test = evaluate(model, *splits.split("test"))
    return TrialOutput(model.eval(), history, test, kernels)


def format_epoch(name: str, seed: int, epoch: int, epochs: int, rows: list[EpochMetrics]) -> str:
    parts = [f"{r.split} loss {r.loss:.4f} acc {r.accuracy:.4f}" for r in rows]
    return f"{name} seed {seed} epoch {epoch:>2}/{epochs}: " + " | ".join(parts)
