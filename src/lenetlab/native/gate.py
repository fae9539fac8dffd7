"""The capability gate: the native step trains a recipe where it covers all of it, else PyTorch's step does.

PyTorch's path (training.py's _TorchSteps, model.fast_forward) is the reference for every
behaviour; the native step (this package) is an accelerator for the recipes it trains exactly.
native_gap() is the one place that decides which those are: every kernel choice goes
through it, so a recipe field or an optimiser the native step does not know trains on
PyTorch's path (with one notice) instead of failing there.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable

import torch

from ..errors import OptionError
from ..model import LeNet5V1
from ..optimizers import OPTIMIZERS
from ..recipes import RECIPES, Recipe
from . import library
from .trainer import NativeTrainer

# The recipe fields whose every valid value the native path trains exactly: the step itself
# (layers, loss, optimiser hyperparameters, batch, mixing) or the Python loop around it, shared
# by both paths (epochs, schedules, augmentation and mixing draws, EMA, the kept epoch, the warm
# start). Fields
# that pick a kind (activation, pool, optimizer) are checked on the model and optimiser the
# recipe builds, below. A field missing here, such as a new one, keeps the native step only at
# its default value: adding a field cannot silently change what the native step computes.
NATIVE_FIELDS = frozenset({
    "name", "use_dropout", "use_batch_norm", "dropout_rate", "epochs", "batch_size", "lr",
    "weight_decay", "optimizer", "warm_start_from", "warm_start_epochs", "activation", "pool",
    "translate", "flip", "erasing", "schedule", "warmup_epochs", "label_smoothing", "ema",
    "checkpoint", "mixup", "cutmix", "mix_prob", "teacher", "teacher_models", "teacher_epochs",
    "distill", "distill_temp",
})


def native_gap(recipe: Recipe, device: torch.device | str = "cpu") -> str | None:
    """None if the native step trains recipe on device exactly as PyTorch's path would, else
    why not, in words that finish 'the native step does not cover ...'."""
    if torch.device(device).type != "cpu":
        return f"device {device} (it runs on the CPU)"
    defaults = {f.name: f.default for f in dataclasses.fields(recipe)
                if f.default is not dataclasses.MISSING}
    for field in dataclasses.fields(recipe):
        value = getattr(recipe, field.name)
        if field.name not in NATIVE_FIELDS and value != defaults.get(field.name, value):
            return f"the recipe field {field.name} = {value!r}"
    if library.load() is None:
        return f"this machine: {library.unavailable_reason()}"
    for phase in _phase_recipes(recipe):
        if phase.optimizer not in OPTIMIZERS:
            return f"optimizer {phase.optimizer!r}"
        with torch.random.fork_rng(devices=[]):  # a throwaway model: the trial's draws stay as they were
            model = LeNet5V1(phase.use_dropout, phase.use_batch_norm, phase.dropout_rate,
                             activation=phase.activation, pool=phase.pool)
        optimizer = OPTIMIZERS[phase.optimizer](model.parameters(), phase)
        reason = NativeTrainer.supports(model, phase.batch_size, optimizer)
        if reason is not None:
            return reason
    return None


def _phase_recipes(recipe: Recipe) -> list[Recipe]:
    """The recipes a trial trains with: a warm start's first recipe, then its own."""
    if recipe.warm_start_from is None:
        return [recipe]
    return [RECIPES[recipe.warm_start_from], recipe]


def choose(kernels: str, recipe: Recipe, device: torch.device | str) -> str:
    """'native' or 'torch' for a trial: kernels is auto, native or torch (--kernels)."""
    if kernels == "torch":
        return "torch"
    gap = native_gap(recipe, device)
    if gap is None:
        return "native"
    if kernels == "native":
        raise OptionError("kernels", f"{{option}} native: the native step does not cover {gap}")
    return "torch"


def announce(kernels: str, device: str, configs: Iterable[tuple[str, Recipe]]) -> None:
    """Before a run starts: build the native step once (workers then find it in the cache), and
    say once per configuration that trains on PyTorch's path why; under --kernels native that
    is one line and exit 2 instead."""
    if kernels == "torch" or not device.startswith("cpu"):
        return
    if library.load() is None:
        if kernels == "native":
            raise OptionError("kernels", f"{{option}} native: the native step cannot be used here "
                            f"({library.unavailable_reason()})")
        print(f"lenetlab: note: training with PyTorch's kernels, the native step is unavailable here "
              f"({library.unavailable_reason()})", file=sys.stderr)
        return
    for name, recipe in configs:
        gap = native_gap(recipe, device)
        if gap is None:
            continue
        if kernels == "native":
            raise OptionError("kernels", f"{{option}} native: {name}: the native step does not cover {gap}")
        print(f"lenetlab: note: {name} trains with PyTorch's kernels: the native step does not "
              f"cover {gap}", file=sys.stderr)
