"""The training loop of one (recipe, seed) trial: fast, deterministic, resumable, and stopped by divergence.

Following airbench, the whole split lives as one tensor on the device and batches are
taken by index. On the CPU the whole step (forward, loss, backward, optimiser) runs in
native code where it builds (lenetlab.native); elsewhere, and with kernels="torch", it runs
through PyTorch with the faster forward pass of model.py.

All randomness comes from the seed: the initial weights from torch.manual_seed, each
epoch's data order, dropout masks, augmentation and mixing from generators seeded by (seed,
epoch), the same streams on both paths. The learning rate is a function of the step alone
(learning_rate). So a run resumed from the checkpoint of epoch k replays epochs k+1... exactly.
"""

from __future__ import annotations

import copy
import io
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from . import files, mixing, native
from .augment import Augmentation, EpochDraws, draw
from .checked import checked, require
from .data import MEAN, STD, Splits
from .evaluation import Evaluation, evaluate, flip_averaged
from .model import LeNet5V1, fast_forward
from .native.gate import choose as choose_kernels
from .optimizers import make_optimizer
from .recipes import RECIPES, Recipe, recipe_from_dict
from .records import Diverged, EpochMetrics


@dataclass(frozen=True)
class Phase:
    """A stretch of epochs trained with one optimiser (a warm start has two)."""

    recipe: Recipe
    first_epoch: int  # 1-based, global
    last_epoch: int

    @property
    def epochs(self) -> int:
        return self.last_epoch - self.first_epoch + 1


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
    augmentation, 3: mixup and CutMix) of one epoch."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(2, np.uint64)[0] >> 1)


# torch.optim.Optimizer's add_param_group (which every optimiser's __init__ calls), state_dict,
# load_state_dict and zero_grad are wrapped by torch._disable_dynamo, whose first call imports
# torch._dynamo (a second or more) only to mark the method as one compilation must not trace.
# The native step calls nothing else of torch.optim's. The wrapper runs what it caches on the
# function as its disabled form, and outside compilation that is the method itself.
_DYNAMO_WRAPPED = ("add_param_group", "state_dict", "load_state_dict", "zero_grad")


def skip_dynamo_import() -> None:
    """Let torch's optimisers be made, saved and restored without importing torch._dynamo.
    Only for lenetlab's own processes (the command's, the local pool's workers), which compile
    no optimiser: a user's torch.compile may trace these methods, and must still skip them.
    PyTorch's step still imports it (its own wrapper); a torch without these wrappers is left
    as it is."""
    for name in _DYNAMO_WRAPPED:
        method = getattr(vars(torch.optim.Optimizer).get(name), "__wrapped__", None)
        if callable(method) and not hasattr(method, "__dynamo_disable"):
            setattr(method, "__dynamo_disable", method)


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


class Kept:
    """The kept-model choice: which model a trial evaluates, keeps and saves.

    The trained weights, or with ema > 0 their moving average (`evaluated`); of the last epoch,
    or with checkpoint="best_val" of the epoch with the highest validation accuracy (the first
    such): the test set never chooses anything.
    """

    def __init__(self, model: LeNet5V1, recipe: Recipe) -> None:
        self.average = _Average(model, recipe.ema) if recipe.ema > 0 else None
        self.evaluated = self.average.model if self.average else model
        self.by_val = recipe.checkpoint == "best_val"
        self.best: dict | None = None  # best_val: {"epoch", "val", "model", "test"}

    def after_step(self) -> None:
        if self.average:
            self.average.update()

    def after_epoch(self, epoch: int, val: Evaluation, test: Evaluation | None) -> None:
        if self.by_val and (self.best is None or val.accuracy > self.best["val"]):
            self.best = {"epoch": epoch, "val": val.accuracy, "test": asdict(test) if test else None,
                         "model": {k: v.detach().clone() for k, v in self.evaluated.state_dict().items()}}

    def choose(self, last_epoch: int, test: Evaluation | None) -> tuple[int, Evaluation | None]:
        """(kept epoch, its test result), the evaluated model loaded with the kept weights;
        test is the last epoch's result (None if this run trained no epoch)."""
        if self.best is None:
            return last_epoch, test
        self.evaluated.load_state_dict(self.best["model"])
        return self.best["epoch"], Evaluation(**self.best["test"]) if self.best["test"] else None

    def state(self) -> dict:
        return {"average": self.average.model.state_dict() if self.average else None, "best": self.best}

    def restore(self, saved: dict) -> None:
        if self.average:
            self.average.model.load_state_dict(saved["average"])
        self.best = saved.get("best")  # checkpoints before best_val existed have none


@dataclass
class TrialOutput:
    model: LeNet5V1  # the kept model: the last epoch's, or the best on validation (checkpoint)
    history: list[EpochMetrics]
    test: Evaluation | None  # the kept model on the test set (None: trained without one)
    kernels: str  # native or torch
    kept_epoch: int  # the epoch whose model was kept
    test_flip: float | None = None  # test accuracy averaging each image with its mirror (flip)
    pruned: bool = False  # stopped early by on_epoch (a search's pruner)
    epoch_seconds: list[float] = field(default_factory=list)  # each epoch trained here: steps and evaluations


class Teacher(Protocol):
    """A teacher's soft targets for a batch (teaching.Outputs)."""

    def targets(self, idx: torch.Tensor, move: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        """(B, 10) float32 targets of the training images idx, moved by move (None: not moved)."""


# Told each epoch's number and the evaluated model's validation accuracy once the epoch is done;
# True stops the trial there (pruned). A search's pruner answers it (tuning/referee.py).
OnEpoch = Callable[[int, float], bool]


# ---- checkpoints: the state after every epoch, saved atomically, resumed when it matches ----

class CheckpointStore(Protocol):
    """Where one trial's checkpoint lives: a file (FileCheckpoint), or, for a Ray worker that does
    not reach the run folder, the run's checkpoint sink on the driver's host (engines.py)."""

    def load(self) -> bytes | None:
        """The last checkpoint saved, or None."""

    def save(self, data: bytes) -> None:
        """Replace the checkpoint with data, atomically (OutputError when it cannot be written)."""


class FileCheckpoint:
    """A checkpoint file, written atomically."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except OSError:  # none yet, or unreadable: train from the first epoch
            return None

    def save(self, data: bytes) -> None:
        files.atomic_write(self.path, data)


def _load_checkpoint(store: CheckpointStore, recipe: Recipe, seed: int) -> dict | None:
    data = store.load()
    if data is None:
        return None
    try:  # a damaged checkpoint, or another's, only costs the epochs since the start: restart
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if not (isinstance(state, dict) and type(state.get("seed")) is int and state["seed"] == seed):
            return None
        if recipe_from_dict(state["recipe"]) != recipe:  # fields a checkpoint predates: their defaults
            return None
        _restorable(state, recipe, seed)
    except Exception:
        return None
    return state


def _restorable(state: dict, recipe: Recipe, seed: int) -> None:
    """Raise unless train_trial's restore of state succeeds whole: tried on a scratch model and
    optimiser, so that a checkpoint from someone else cannot stop a trial halfway."""
    epoch = state["epoch"]
    require(type(epoch) is int and 1 <= epoch <= total_epochs(recipe), "epoch: out of range")
    require(all(checked(EpochMetrics(**row)).epoch <= epoch for row in state["history"]), "history")
    model = build_model(recipe, seed)
    model.load_state_dict(state["model"])
    kept = Kept(model, recipe)
    kept.restore(state)
    if kept.best is not None:
        require(type(kept.best["epoch"]) is int and type(kept.best["val"]) is float, "best")
        kept.choose(epoch, None)  # loads its weights and makes its Evaluation
        if kept.best["test"] is not None:  # None: trained without a test split (a search)
            checked(Evaluation(**kept.best["test"]))
    phase = next((p for p in phases(recipe) if p.first_epoch <= epoch < p.last_epoch), None)
    if phase is None:  # the last epoch was done: no optimiser to resume
        return
    optimizer = make_optimizer(phase.recipe, model.parameters())
    fresh = [dict(group) for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for group, made in zip(optimizer.param_groups, fresh, strict=True):
        require(all(type(group.get(key)) is type(value) for key, value in made.items() if key != "params"),
                "optimizer: settings of other types")
        for param in group["params"]:
            for value in optimizer.state.get(param, {}).values():
                require(value is None or (isinstance(value, torch.Tensor) and value.device.type == "cpu"
                                          and value.is_contiguous() and value.isfinite().all()
                                          and (value.shape == param.shape and value.dtype == param.dtype
                                               or value.dim() == 0)), "optimizer: a state of another shape")


def _save_checkpoint(store: CheckpointStore, model: LeNet5V1, optimizer: torch.optim.Optimizer, kept: Kept,
                     epoch: int, history: list[EpochMetrics], recipe: Recipe, seed: int) -> None:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), **kept.state(),
                "epoch": epoch, "history": [asdict(r) for r in history],
                "recipe": asdict(recipe), "seed": seed}, buffer)
    store.save(buffer.getvalue())


# ---- the step implementations, behind one interface ----

class Steps(Protocol):
    """One epoch's training steps, made as Steps(model, optimizer, device, label_smoothing,
    dropout_p): step() per batch, then totals() once."""

    def step(self, i: int, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, keep: torch.Tensor | None,
             draws: EpochDraws | None, start: int, mix: mixing.MixDraws | None = None,
             targets: torch.Tensor | None = None) -> None:
        """One step on x[idx], y[idx], the images augmented by draws if any (the batch being
        images start, start + 1, ... of the epoch), then mixed by mix if any (soft targets);
        keep: the dropout mask (B, 120) or None; targets: the batch's (B, 10) soft targets
        (a teacher's, mixed already), which replace the labels' in the loss. Raises _NonFinite
        at the first non-finite loss where that is known at once."""

    def totals(self) -> tuple[float, int, int | None]:
        """(summed loss, correct predictions, index of the first non-finite step or None)."""


class _TorchSteps:
    """The PyTorch step: fast_forward, cross-entropy, backward, the torch optimiser.

    Loss and accuracy are summed on the device; on a GPU the host never waits inside the
    step, and the first non-finite loss's step is remembered on the device too.
    """

    def __init__(self, model: LeNet5V1, optimizer: torch.optim.Optimizer, device: torch.device,
                 label_smoothing: float, dropout_p: float) -> None:
        self.model, self.optimizer, self.device = model, optimizer, device
        self.label_smoothing = label_smoothing
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def step(self, i, x, y, idx, keep, draws, start, mix=None, targets=None) -> None:
        x, y = x[idx], y[idx]
        if draws is not None:
            x = draws.apply(x, start)
        if targets is not None:  # a teacher's; a mixed image counts as correct for its own label y
            logits = fast_forward(self.model, mix.images(x, start) if mix is not None else x, keep)
            loss = F.cross_entropy(logits, targets.to(logits.dtype), label_smoothing=self.label_smoothing)
        elif mix is None:
            logits = fast_forward(self.model, x, keep)
            loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        else:  # soft targets; a mixed image counts as correct for its own label y
            logits = fast_forward(self.model, mix.images(x, start), keep)
            target = mix.targets(y, start).to(logits.dtype)  # float64 for a float64 model (tests)
            loss = F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)
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
    """The native whole step (lenetlab.native), gathering and augmenting the batch in C."""

    def __init__(self, model: LeNet5V1, optimizer: torch.optim.Optimizer, device: torch.device,
                 label_smoothing: float, dropout_p: float) -> None:
        self.dropout_p = dropout_p  # keep / (1 - p): the scale the C step multiplies by
        self.trainer = native.NativeTrainer(model, optimizer, label_smoothing=label_smoothing)
        self.loss_sum, self.correct, self.first_bad = 0.0, 0, None

    def step(self, i, x, y, idx, keep, draws, start, mix=None, targets=None) -> None:
        scale = None if keep is None else keep.float().div_(1.0 - self.dropout_p)
        self.trainer.train_step_indexed(x, y, idx, scale, draws, start, mix, targets)
        loss, correct = self.trainer.take_totals()
        self.loss_sum += loss
        self.correct += correct
        if not math.isfinite(loss):
            self.first_bad = i
            raise _NonFinite

    def totals(self) -> tuple[float, int, int | None]:
        self.trainer.sync()
        return self.loss_sum, self.correct, self.first_bad


STEPS: dict[str, type] = {"torch": _TorchSteps, "native": _NativeSteps}


class _NonFinite(Exception):
    """Raised inside an epoch at the first non-finite loss (CPU paths)."""


# ---- the epoch loop ----

@dataclass
class _Run:
    """What every epoch of one trial shares."""

    recipe: Recipe
    seed: int
    splits: Splits
    model: LeNet5V1
    kernels: str
    kept: Kept
    progress: bool
    teacher: Teacher | None = None  # distillation's soft targets (teaching.Outputs)
    epoch_seconds: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.splits.train_x)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n / self.recipe.batch_size)


def _train_epoch(run: _Run, phase: Phase, optimizer: torch.optim.Optimizer, epoch: int) -> EpochMetrics:
    """One epoch of training steps on the epoch's own data order, dropout masks,
    augmentation and mixing; the learning rate set before every step. Raises Diverged."""
    device, n, batch = run.splits.train_x.device, run.n, run.recipe.batch_size
    dropout_p = run.recipe.dropout_rate if run.recipe.use_dropout else 0.0
    steps = STEPS[run.kernels](run.model, optimizer, device, phase.recipe.label_smoothing, dropout_p)
    order_gen = torch.Generator().manual_seed(derived_seed(run.seed, epoch, 0))
    order = torch.randperm(n, generator=order_gen).to(device)
    dropout_gen = torch.Generator(device=device).manual_seed(derived_seed(run.seed, epoch, 1))
    aug = Augmentation(phase.recipe.translate, phase.recipe.flip, phase.recipe.erasing)
    draws = None
    if aug.active:
        aug_gen = torch.Generator(device=device).manual_seed(derived_seed(run.seed, epoch, 2))
        draws = draw(aug, n, aug_gen, BACKGROUND, device)
    mix = None
    mixes = mixing.Mixing(phase.recipe.mixup, phase.recipe.cutmix, phase.recipe.mix_prob)
    if mixes.active:
        mix = mixing.draw(mixes, n, batch, derived_seed(run.seed, epoch, 3), device)
    teacher = run.teacher if phase.recipe.teacher else None  # not a warm start's first recipe
    per_epoch = run.steps_per_epoch
    first_step, phase_steps = (epoch - phase.first_epoch) * per_epoch, phase.epochs * per_epoch
    warmup_steps = phase.recipe.warmup_epochs * per_epoch
    starts = _progress(range(0, n, batch), run, epoch) if run.progress else range(0, n, batch)
    try:
        for i, start in enumerate(starts):
            idx = order[start:start + batch]
            keep = None
            if dropout_p > 0:  # drawn here for both paths, as fast_forward expects it
                keep = torch.rand((len(idx), 120), generator=dropout_gen, device=device) >= dropout_p
            lr = learning_rate(phase.recipe, first_step + i, phase_steps, warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            targets = None
            if teacher is not None:
                moved = draws is not None and draws.move is not None
                move = draws.move[start:start + len(idx)] if moved else None
                targets = teacher.targets(idx, move, run.splits.train_y[idx])
                if mix is not None:
                    targets = mix.blend(targets, start).contiguous()
            steps.step(i, run.splits.train_x, run.splits.train_y, idx, keep, draws, start, mix, targets)
            run.kept.after_step()
    except _NonFinite:
        pass
    finally:
        if run.progress:
            starts.close()
    loss_sum, correct, bad_step = steps.totals()
    if bad_step is not None:
        raise Diverged(epoch, bad_step + 1)
    return EpochMetrics(epoch, "train", loss_sum / n, correct / n)


def _progress(starts: range, run: _Run, epoch: int):
    from tqdm import tqdm

    return tqdm(starts, desc=f"{run.recipe.name} s{run.seed} e{epoch}/{total_epochs(run.recipe)}",
                leave=False, file=sys.stderr, dynamic_ncols=True)


def _forward(run: _Run) -> Callable:
    """Evaluation's forward pass: the native one where the native step trains."""
    return native.forward if run.kernels == "native" else fast_forward


def _evaluate(run: _Run, split: str, epoch: int | None = None) -> Evaluation:
    model, forward = run.kept.evaluated, _forward(run)
    result = evaluate(model, *run.splits.split(split), forward=lambda x: forward(model, x))
    if epoch is not None and not math.isfinite(result.loss):
        raise Diverged(epoch, None)
    return result


def train_trial(
    recipe: Recipe,
    seed: int,
    splits: Splits,
    checkpoint: Path | CheckpointStore | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    stop_after_epoch: int | None = None,
    kernels: str = "auto",
    threads: Callable[[], int] | None = None,
    on_epoch: OnEpoch | None = None,
    teacher: Teacher | None = None,
) -> TrialOutput:
    """Train one recipe from one seed; evaluate train/val/test every epoch (train/val where the
    splits have no test split: then no test result is made at all).

    With checkpoint set (a file, or a CheckpointStore), the state after every epoch is saved
    there (atomically) and a matching checkpoint found there is resumed from. stop_after_epoch
    ends early (tests use it to simulate an interruption). threads, if given, is asked at the start of every
    epoch how many threads to train with (torch.set_num_threads; the native step follows it).
    on_epoch, if given, is told each epoch's validation accuracy before its checkpoint is saved
    (so every epoch a checkpoint holds has been told), and stops the trial when it answers True.
    teacher: a recipe with a teacher's soft targets for its batches (teaching.outputs_for).
    Raises Diverged at the first non-finite loss. The kept model: see Kept.
    """
    device = splits.train_x.device
    if device.type == "cuda":  # same seed, same numbers: no nondeterministic cuDNN algorithms
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    if bool(recipe.teacher) != (teacher is not None):
        raise ValueError(f"recipe {recipe.name!r}: " + ("its teacher's outputs are needed" if recipe.teacher
                                                         else "a teacher given, but it has none"))
    model = build_model(recipe, seed).to(device)
    run = _Run(recipe, seed, splits, model, choose_kernels(kernels, recipe, device), Kept(model, recipe),
               progress, teacher)
    history: list[EpochMetrics] = []
    if isinstance(checkpoint, (str, Path)):
        checkpoint = FileCheckpoint(Path(checkpoint))
    saved = _load_checkpoint(checkpoint, recipe, seed) if checkpoint is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        run.kept.restore(saved)
        history = [EpochMetrics(**row) for row in saved["history"]]
    start_epoch = saved["epoch"] + 1 if saved is not None else 1
    test = None
    for phase in phases(recipe):
        if phase.last_epoch < start_epoch:
            continue
        optimizer = make_optimizer(phase.recipe, model.parameters())
        if saved is not None and phase.first_epoch < start_epoch:
            optimizer.load_state_dict(saved["optimizer"])  # resuming inside this phase
        for epoch in range(max(start_epoch, phase.first_epoch), phase.last_epoch + 1):
            if threads is not None:
                torch.set_num_threads(threads())
            began = time.perf_counter()
            model.train()
            rows = [_train_epoch(run, phase, optimizer, epoch)]
            val = _evaluate(run, "val", epoch)
            test = _evaluate(run, "test", epoch) if splits.has_test else None
            rows.append(EpochMetrics(epoch, "val", val.loss, val.accuracy))
            if test is not None:
                rows.append(EpochMetrics(epoch, "test", test.loss, test.accuracy))
            run.kept.after_epoch(epoch, val, test)
            history += rows
            run.epoch_seconds.append(time.perf_counter() - began)
            if log is not None:
                log(format_epoch(recipe.name, seed, epoch, total_epochs(recipe), rows))
            if on_epoch is not None and on_epoch(epoch, val.accuracy):
                return _finish(run, history, test, pruned=True)
            if checkpoint is not None:
                _save_checkpoint(checkpoint, model, optimizer, run.kept, epoch, history, recipe, seed)
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                return TrialOutput(run.kept.evaluated.eval(), history, test, run.kernels, epoch)
    return _finish(run, history, test)


def _finish(run: _Run, history: list[EpochMetrics], test: Evaluation | None,
            pruned: bool = False) -> TrialOutput:
    """The kept model in eval mode, its test result and, for recipes that flip, the
    flip-averaged test accuracy (neither without a test split)."""
    kept_epoch, test = run.kept.choose(history[-1].epoch, test)
    if test is None and run.splits.has_test:  # resumed from the last epoch's checkpoint
        test = _evaluate(run, "test")
    model = run.kept.evaluated.eval()
    test_flip = None
    if run.recipe.flip and run.splits.has_test:
        forward = _forward(run)
        test_flip = evaluate(model, *run.splits.split("test"),
                             forward=lambda x: flip_averaged(forward, model, x)).accuracy
    return TrialOutput(model, history, test, run.kernels, kept_epoch, test_flip, pruned, run.epoch_seconds)


def format_epoch(name: str, seed: int, epoch: int, epochs: int, rows: list[EpochMetrics]) -> str:
    parts = [f"{r.split} loss {r.loss:.4f} acc {r.accuracy:.4f}" for r in rows]
    return f"{name} seed {seed} epoch {epoch:>2}/{epochs}: " + " | ".join(parts)
