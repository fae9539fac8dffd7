"""The optimisers a recipe names (recipes.OPTIMIZERS), each built for a model's parameters."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .recipes import Recipe

# name -> constructor. Weight decay is Adam's coupled L2, as in the original.
OPTIMIZERS: dict[str, Callable[[object, Recipe], torch.optim.Optimizer]] = {
    "adam": lambda params, r: torch.optim.Adam(params, lr=r.lr, weight_decay=r.weight_decay, fused=True),
    "adamw": lambda params, r: torch.optim.AdamW(params, lr=r.lr, weight_decay=r.weight_decay, fused=True),
    "sgd": lambda params, r: torch.optim.SGD(params, lr=r.lr, momentum=0.9, weight_decay=r.weight_decay),
}


def make_optimizer(recipe: Recipe, params) -> torch.optim.Optimizer:
    return OPTIMIZERS[recipe.optimizer](params, recipe)
