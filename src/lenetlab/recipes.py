"""The recipe schema: how a variant is trained, the five published recipes, and every field's checks.

Change a published hyperparameter in RECIPES and nowhere else. Add a recipe field by adding
it to Recipe and to FIELDS (type, range, short name, help): `train` flags, sweep specs, run
plans and configuration names pick it up from there. Add an optimiser with one OPTIMIZERS entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from .errors import SpecError


@dataclass(frozen=True)
class Recipe:
    """Everything that defines how one variant is trained (the seed aside)."""

    name: str
    use_dropout: bool = False
    use_batch_norm: bool = False
    dropout_rate: float = 0.5
    epochs: int = 12
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    # Continue from a model first trained for warm_start_epochs with the recipe named
    # here, instead of starting from scratch (the original's "optimised L2" continued
    # its trained L2 model). Both phases belong to this one trial.
    warm_start_from: str | None = None
    warm_start_epochs: int = 0


RECIPES: dict[str, Recipe] = {
    "baseline": Recipe("baseline"),
    "dropout": Recipe("dropout", use_dropout=True),
    "l2_regularization": Recipe("l2_regularization", weight_decay=0.01),
    "batch_norm": Recipe("batch_norm", use_batch_norm=True),
    "l2_optimized": Recipe("l2_optimized", epochs=20, weight_decay=0.001),
}

# name -> constructor. Weight decay is Adam's coupled L2, as in the original.
OPTIMIZERS: dict[str, Callable[[object, Recipe], torch.optim.Optimizer]] = {
    "adam": lambda params, r: torch.optim.Adam(params, lr=r.lr, weight_decay=r.weight_decay, fused=True),
    "adamw": lambda params, r: torch.optim.AdamW(params, lr=r.lr, weight_decay=r.weight_decay, fused=True),
    "sgd": lambda params, r: torch.optim.SGD(params, lr=r.lr, momentum=0.9, weight_decay=r.weight_decay),
}


@dataclass(frozen=True)
class Field:
    """A recipe field a user may set: its type, its valid range, its short name in
    configuration names (baseline-wd0.001) and the help text that states the range."""

    kind: type
    valid: Callable[[object], bool]
    short: str
    help: str


FIELDS: dict[str, Field] = {
    "weight_decay": Field(float, lambda v: 0 <= v <= 10, "wd", "L2 weight decay, 0 to 10"),
    "dropout_rate": Field(float, lambda v: 0 <= v < 1, "p", "dropout probability, 0 to <1 "
                          "(variants with dropout)"),
    "epochs": Field(int, lambda v: 1 <= v <= 1000, "ep", "epochs, 1 to 1000"),
    "batch_size": Field(int, lambda v: 1 <= v <= 54_000, "bs", "batch size, 1 to 54000"),
    "lr": Field(float, lambda v: 0 < v < math.inf, "lr", "learning rate, a finite number > 0"),
    "optimizer": Field(str, lambda v: v in OPTIMIZERS, "opt", f"one of {', '.join(OPTIMIZERS)} "
                       "(sgd: momentum 0.9)"),
}


def check_field(key: str, value, where: str = ""):
    """Check one recipe field's value (flags, sweep specs and run plans); an int passes as a float."""
    field = FIELDS[key]
    if field.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, field.kind) or isinstance(value, bool):
        raise SpecError(f"{where}{key}: expected {field.kind.__name__}, got {type(value).__name__} {value!r}")
    if not field.valid(value):
        raise SpecError(f"{where}{key}: invalid value {value!r} (expected {field.help})")
    return value


def get_recipe(name: str, warm_start: bool = False) -> Recipe:
    """The recipe of a variant; warm_start makes l2_optimized continue the trained L2 model."""
    if name not in RECIPES:
        raise SpecError(f"unknown variant {name!r} (choose from {', '.join(RECIPES)})")
    recipe = RECIPES[name]
    if warm_start and name == "l2_optimized":
        base = RECIPES["l2_regularization"]
        recipe = replace(recipe, warm_start_from=base.name, warm_start_epochs=base.epochs)
    return recipe


def with_fields(base: Recipe, changes: dict, where: str = "") -> Recipe:
    """base with checked field changes; dropout_rate only where there is a dropout layer."""
    checked = {key: check_field(key, value, where) for key, value in changes.items()}
    if "dropout_rate" in checked and not base.use_dropout:
        raise SpecError(f"{where}dropout_rate: variant {base.name!r} has no dropout layer")
    return replace(base, **checked)


def recipe_from_dict(entry: dict) -> Recipe:
    """A Recipe from its recorded fields (run plans, trial results, checkpoints lenetlab wrote)."""
    return Recipe(**{f.name: entry[f.name] for f in fields(Recipe) if f.name in entry})


def scale_epochs(recipe: Recipe, scale: float) -> Recipe:
    """Multiply the epochs (warm-start ones too) for quick runs; at least one epoch each."""
    if scale == 1.0:
        return recipe
    warm = max(1, round(recipe.warm_start_epochs * scale)) if recipe.warm_start_from else 0
    return replace(recipe, epochs=max(1, round(recipe.epochs * scale)), warm_start_epochs=warm)


def describe_start(recipe: Recipe) -> str:
    """Say how the weights were initialised, for sidecars and reports."""
    if recipe.warm_start_from is None:
        return "trained from scratch"
    return (f"warm start: {recipe.warm_start_epochs} epochs of {recipe.warm_start_from} "
            f"first, then {recipe.epochs} epochs of this recipe")


# The original study's names, kept so its snippets run unchanged.
MODEL_PATH = Path("models")
FILE_NAMES = {
    "baseline": "lenet5_baseline_fashionmnist.pth",
    "dropout": "lenet5_dropout_fashionmnist.pth",
    "l2_regularization": "lenet5_l2_fashionmnist.pth",
    "batch_norm": "lenet5_batchnorm_fashionmnist.pth",
    "l2_optimized": "lenet5v1_l2_optimized.pth",
}
MODEL_SAVE_PATHS = {name: MODEL_PATH / file for name, file in FILE_NAMES.items()}

# The original's published single-run figures (validation accuracy, not test), after
# 12 epochs (20 for l2_optimized) on the whole training split.
PUBLISHED = {
    "baseline": (0.932076, 0.892121),
    "dropout": (0.889422, 0.897108),
    "l2_regularization": (0.843269, 0.850731),
    "l2_optimized": (0.907638, 0.887467),
    "batch_norm": (0.944757, 0.902427),
}


def file_name(config: str) -> str:
    """The original file name for a variant; other configurations get a derived one."""
    return FILE_NAMES.get(config, f"lenet5_{config}_fashionmnist.pth")
