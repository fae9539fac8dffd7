"""The study's five recipes, in one table, with the original file names.

Change a published hyperparameter here and nowhere else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

OPTIMIZERS = ("adam", "adamw", "sgd")


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

    def with_changes(self, **changes) -> Recipe:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


RECIPES: dict[str, Recipe] = {
    "baseline": Recipe("baseline"),
    "dropout": Recipe("dropout", use_dropout=True),
    "l2_regularization": Recipe("l2_regularization", weight_decay=0.01),
    "batch_norm": Recipe("batch_norm", use_batch_norm=True),
    "l2_optimized": Recipe("l2_optimized", epochs=20, weight_decay=0.001),
}

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

# The original's published single-run figures (validation accuracy, not test).
PUBLISHED = {
    "baseline": (0.932076, 0.892121),
    "dropout": (0.889422, 0.897108),
    "l2_regularization": (0.843269, 0.850731),
    "l2_optimized": (0.907638, 0.887467),
    "batch_norm": (0.944757, 0.902427),
}


def get_recipe(name: str, warm_start: bool = False) -> Recipe:
    """The recipe of a variant; warm_start makes l2_optimized continue the trained L2 model."""
    from .errors import SpecError

    if name not in RECIPES:
        raise SpecError(f"unknown variant {name!r} (choose from {', '.join(RECIPES)})")
    recipe = RECIPES[name]
    if warm_start and name == "l2_optimized":
        base = RECIPES["l2_regularization"]
        recipe = recipe.with_changes(warm_start_from=base.name, warm_start_epochs=base.epochs)
    return recipe


def scale_epochs(recipe: Recipe, scale: float) -> Recipe:
    """Multiply the epochs (warm-start ones too) for quick runs; at least one epoch each."""
    if scale == 1.0:
        return recipe
    warm = max(1, round(recipe.warm_start_epochs * scale)) if recipe.warm_start_from else 0
    return recipe.with_changes(epochs=max(1, round(recipe.epochs * scale)), warm_start_epochs=warm)


def describe_start(recipe: Recipe) -> str:
    """Say how the weights were initialised, for sidecars and reports."""
    if recipe.warm_start_from is None:
        return "trained from scratch"
    return (f"warm start: {recipe.warm_start_epochs} epochs of {recipe.warm_start_from} "
            f"first, then {recipe.epochs} epochs of this recipe")


def file_name(recipe_name: str) -> str:
    """The original file name for a variant; other configurations get a derived one."""
    return FILE_NAMES.get(recipe_name, f"lenet5_{recipe_name}_fashionmnist.pth")
