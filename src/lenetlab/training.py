"""The training loop of one (recipe, seed) trial: fast, deterministic, resumable, and stopped by divergence.

Following airbench, the whole split lives as one tensor on the device and batches are
taken by index. On the CPU the whole step (forward, loss, backward, optimiser) runs in
native code where it builds (native.py); elsewhere, and with kernels="torch", it runs
through PyTorch with the faster forward pass of model.py.

All randomness comes from the seed: the initial weights from torch.manual_seed, each
epoch's data order, dropout masks and augmentation from generators seeded by (seed, epoch),
the same streams on both paths. The learning rate is a function of the step alone
(learning_rate). So a run resumed from the checkpoint of epoch k replays epochs k+1... exactly.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import files, native
from .augment import Augmentation, EpochDraws, draw
from .data import MEAN, STD, Splits
from .evaluation import Evaluation, evaluate, flip_averaged
from .model import LeNet5V1, fast_forward
from .recipes import OPTIMIZERS, RECIPES, Recipe, recipe_from_dict
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


BACKGROUND = (0.0 - MEAN) / STD  # a black pixel, normalised: what translation pads with


def derived_seed(seed: int, epoch: int, stream: int) -> int:
    """A well-mixed 63-bit seed for one random stream (0: data order, 1: dropout, 2:
    augmentation) of one epoch."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(2, np.uint64)[0] >> 1)


def make_optimizer(recipe: Recipe, params) -> torch.optim.Optimizer:
    return OPTIMIZERS[recipe.optimizer](params, recipe)


def learning_rate(recipe: Recipe, step: int, total: int, warmup: int) -> float:
    """The learning rate at step (0-based) of a phase of total steps, warmup of them warm-up.

    constant and cosine rise linearly over the warm-up, then stay or fall along a half cosine
    to 0. onecycle is PyTorch's OneCycleLR (cosine, div_factor 25, final_div_factor 1e4) with
    pct_start = warmup / total: a cosine rise from lr/25 to lr, then a fall to lr/2.5e5.
    """
    lr = recipe.lr
    if recipe.schedule == "onecycle":
        peak_step = warmup - 1.0  # OneCycleLR's end of the rise: pct_start * total - 1
        if step <= peak_step and peak_step > 0:
            return _cosine(lr / 25, lr, step / peak_step)
        return _cosine(lr, lr / 25 / 1e4, (step - peak_step) / max(total - 1 - peak_step, 1))
    if step < warmup:
        return lr * (step + 1) / warmup
    if recipe.schedule == "cosine":
        return _cosine(lr, 0.0, (step - warmup) / max(total - warmup, 1))
    return lr


def _cosine(start: float, end: float, progress: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * progress) + 1)


def build_model(recipe: Recipe, seed: int) -> LeNet5V1:
    torch.manual_seed(seed)
    return LeNet5V1(recipe.use_dropout, recipe.use_batch_norm, recipe.dropout_rate,
                    activation=recipe.activation, pool=recipe.pool)


class _Average:
    """An exponential moving average of a model's weights (and batch-norm statistics), updated
    after every step: the model a trial with ema > 0 evaluates, keeps and saves."""

    def __init__(self, model: LeNet5V1, decay: float) -> None:
        self.model, self.decay = copy.deepcopy(model), decay
        pairs = [(mine, theirs) for mine, theirs in zip(self.model.state_dict().values(),
                                                         model.state_dict().values())]
        self.floats = [p for p in pairs if p[0].is_floating_point()]
        self.others = [p for p in pairs if not p[0].is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_([m for m, _ in self.floats], [t for _, t in self.floats], 1.0 - self.decay)
        for mine, theirs in self.others:  # num_batches_tracked
            mine.copy_(theirs)


def choose_kernels(kernels: str, device: torch.device, model: LeNet5V1, batch_size: int) -> str:
    """native or torch for this trial: native on the CPU where it builds and supports the recipe."""
    if kernels == "torch" or device.type != "cpu":
        return "torch"
    if native.load() is None or native.NativeTrainer.supports(model, batch_size) is not None:
        return "torch"
    return "native"


@dataclass
class TrialOutput:
    model: LeNet5V1  # the kept model: the last epoch's, or the best on validation (checkpoint)
    history: list[EpochMetrics]
    test: Evaluation  # the kept model on the test set
    kernels: str  # native or torch
    kept_epoch: int  # the epoch whose model was kept
    test_flip: float | None = None  # test accuracy averaging each image with its mirror (flip)


def _load_checkpoint(path: Path, recipe: Recipe, seed: int) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None  # a damaged checkpoint only costs the epochs since the last good one: restart
    if not isinstance(state, dict) or state.get("seed") != seed or not isinstance(state.get("recipe"), dict):
        return None
    try:
        if recipe_from_dict(state["recipe"]) != recipe:  # fields a checkpoint predates: their defaults
            return None
    except TypeError:  # not a recipe lenetlab wrote
        return None
    return state


class _TorchSteps:
    """The PyTorch step: fast_forward, cross-entropy, backward, the torch optimiser.

    Loss and accuracy are summed on the device; on a GPU the host never waits inside the
    step, and the first non-finite loss's step is remembered on the device too.
    """

    def __init__(self, model: LeNet5V1, optimizer: torch.optim.Optimizer, device: torch.device,
                 label_smoothing: float) -> None:
        self.model, self.optimizer, self.device = model, optimizer, device
        self.label_smoothing = label_smoothing
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def step(self, i: int, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, keep: torch.Tensor | None,
             draws: EpochDraws | None, start: int) -> None:
        """One step on x[idx], y[idx], the images augmented by draws if any (the batch being
        images start, start + 1, ... of the epoch)."""
        x, y = x[idx], y[idx]
        if draws is not None:
            x = draws.apply(x, start)
        logits = fast_forward(self.model, x, keep)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
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


class _NativeSteps:
    """The native whole step (native.py); the same interface as _TorchSteps."""

    def __init__(self, model: LeNet5V1, optimizer: torch.optim.Optimizer, dropout_p: float,
                 label_smoothing: float) -> None:
        self.model, self.dropout_p = model, dropout_p
        self.trainer = native.NativeTrainer(model, optimizer, label_smoothing=label_smoothing)
        self.loss_sum, self.correct, self.first_bad = 0.0, 0, None

    def step(self, i: int, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, keep: torch.Tensor | None,
             draws: EpochDraws | None, start: int) -> None:
        scale = None if keep is None else keep.float().div_(1.0 - self.dropout_p)
        self.trainer.train_step_indexed(x, y, idx, scale, draws, start)  # gathers and augments in C
        loss, correct = self.trainer.take_totals()
        self.loss_sum += loss
        self.correct += correct
        if not math.isfinite(loss):
            self.first_bad = i
            raise _NonFinite

    def totals(self) -> tuple[float, int, int | None]:
        self.trainer.sync()
        return self.loss_sum, self.correct, self.first_bad


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
    threads: Callable[[], int] | None = None,
) -> TrialOutput:
    """Train one recipe from one seed; evaluate train/val/test every epoch.

    With checkpoint set, the state after every epoch is saved there (atomically) and a
    matching checkpoint found there is resumed from. stop_after_epoch ends early (tests
    use it to simulate an interruption). Raises Diverged at the first non-finite loss.
    The kept model is the last epoch's, or with checkpoint="best_val" the epoch's with the
    highest validation accuracy (the first such): the test set never chooses anything.
    threads, if given, is asked at the start of every epoch for the torch threads to train it with.
    """
    device = splits.train_x.device
    if device.type == "cuda":  # same seed, same numbers: no nondeterministic cuDNN algorithms
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    model = build_model(recipe, seed).to(device)
    kernels = choose_kernels(kernels, device, model, recipe.batch_size)
    forward = native.forward if kernels == "native" else fast_forward  # evaluation's forward pass
    average = _Average(model, recipe.ema) if recipe.ema > 0 else None
    evaluated = average.model if average else model  # the model whose epochs are recorded and kept
    history: list[EpochMetrics] = []
    best: dict | None = None  # best_val: {"epoch", "val", "model", "test"}
    start_epoch = 1
    saved = _load_checkpoint(checkpoint, recipe, seed) if checkpoint else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        if average:
            average.model.load_state_dict(saved["average"])
        history = [EpochMetrics(**row) for row in saved["history"]]
        best = saved.get("best")  # checkpoints before best_val existed have none
        start_epoch = saved["epoch"] + 1

    train_x, train_y = splits.train_x, splits.train_y
    n, batch = len(train_x), recipe.batch_size
    steps_per_epoch = math.ceil(n / batch)
    dropout_p = recipe.dropout_rate if recipe.use_dropout else 0.0
    test = None
    for phase in phases(recipe):
        if phase.last_epoch < start_epoch:
            continue
        optimizer = make_optimizer(phase.recipe, model.parameters())
        if saved is not None and phase.first_epoch < start_epoch:
            optimizer.load_state_dict(saved["optimizer"])  # resuming inside this phase
        aug = Augmentation(phase.recipe.translate, phase.recipe.flip, phase.recipe.erasing)
        phase_steps = (phase.last_epoch - phase.first_epoch + 1) * steps_per_epoch
        warmup_steps = phase.recipe.warmup_epochs * steps_per_epoch
        for epoch in range(max(start_epoch, phase.first_epoch), phase.last_epoch + 1):
            if threads is not None:
                torch.set_num_threads(threads())
            model.train()
            steps_impl = (_NativeSteps(model, optimizer, dropout_p, phase.recipe.label_smoothing)
                          if kernels == "native"
                          else _TorchSteps(model, optimizer, device, phase.recipe.label_smoothing))
            order = torch.randperm(n, generator=torch.Generator().manual_seed(
                derived_seed(seed, epoch, 0))).to(device)
            dropout_gen = torch.Generator(device=device).manual_seed(derived_seed(seed, epoch, 1))
            draws = None
            if aug.active:
                aug_gen = torch.Generator(device=device).manual_seed(derived_seed(seed, epoch, 2))
                draws = draw(aug, n, aug_gen, BACKGROUND, device)
            first_step = (epoch - phase.first_epoch) * steps_per_epoch
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
                    lr = learning_rate(phase.recipe, first_step + i, phase_steps, warmup_steps)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    steps_impl.step(i, train_x, train_y, idx, keep, draws, start)
                    if average:
                        average.update()
            except _NonFinite:
                pass
            finally:
                if bar is not None:
                    bar.close()
            loss_sum, correct, bad_step = steps_impl.totals()
            if bad_step is not None:
                raise Diverged(epoch, bad_step + 1)
            rows = [EpochMetrics(epoch, "train", loss_sum / n, correct / n)]
            results = {}
            for split in ("val", "test"):
                result = evaluate(evaluated, *splits.split(split), forward=lambda x: forward(evaluated, x))
                if not math.isfinite(result.loss):
                    raise Diverged(epoch, None)
                rows.append(EpochMetrics(epoch, split, result.loss, result.accuracy))
                results[split] = result
            test = results["test"]
            if recipe.checkpoint == "best_val" and (best is None or results["val"].accuracy > best["val"]):
                best = {"epoch": epoch, "val": results["val"].accuracy, "test": asdict(test),
                        "model": {k: v.detach().clone() for k, v in evaluated.state_dict().items()}}
            history += rows
            if log is not None:
                log(format_epoch(recipe.name, seed, epoch, total_epochs(recipe), rows))
            if checkpoint is not None:
                files.torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                  "average": average.model.state_dict() if average else None,
                                  "best": best, "epoch": epoch, "history": [asdict(r) for r in history],
                                  "recipe": asdict(recipe), "seed": seed}, checkpoint)
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                return TrialOutput(evaluated.eval(), history, test, kernels, epoch)
    kept_epoch = history[-1].epoch
    if best is not None:  # best_val: back to the chosen epoch's model and its test result
        evaluated.load_state_dict(best["model"])
        kept_epoch, test = best["epoch"], Evaluation(**best["test"])
    elif test is None:  # resumed from the last epoch's checkpoint: nothing was left to train
        test = evaluate(evaluated, *splits.split("test"), forward=lambda x: forward(evaluated, x))
    evaluated.eval()
    test_flip = None
    if recipe.flip:
        test_flip = evaluate(evaluated, *splits.split("test"),
                             forward=lambda x: flip_averaged(forward, evaluated, x)).accuracy
    return TrialOutput(evaluated, history, test, kernels, kept_epoch, test_flip)


def format_epoch(name: str, seed: int, epoch: int, epochs: int, rows: list[EpochMetrics]) -> str:
    parts = [f"{r.split} loss {r.loss:.4f} acc {r.accuracy:.4f}" for r in rows]
    return f"{name} seed {seed} epoch {epoch:>2}/{epochs}: " + " | ".join(parts)
