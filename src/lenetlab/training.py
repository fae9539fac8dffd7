"""The training loop of one (recipe, seed) trial: fast, deterministic and resumable.

Following airbench, the whole split lives as one tensor on the device and batches
are taken by index; the step itself never waits for the host. Loss and accuracy
are summed on the device and read once per epoch (or every few hundred steps when
a progress bar is shown).

All randomness comes from the seed: the initial weights from torch.manual_seed,
each epoch's data order and dropout masks from generators seeded by (seed, epoch).
So a run resumed from the checkpoint of epoch k replays epochs k+1... exactly.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import files
from .data import Splits
from .evaluation import evaluate
from .model import LeNet5V1, fast_forward
from .recipes import RECIPES, Recipe


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
    base = RECIPES[recipe.warm_start_from].with_changes(epochs=recipe.warm_start_epochs)
    return [Phase(base, 1, base.epochs),
            Phase(recipe, base.epochs + 1, base.epochs + recipe.epochs)]


def total_epochs(recipe: Recipe) -> int:
    return phases(recipe)[-1].last_epoch


def derived_seed(seed: int, epoch: int, stream: int) -> int:
    """A well-mixed 63-bit seed for one random stream (0: data order, 1: dropout) of one epoch."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(2, np.uint64)[0] >> 1)


def make_optimizer(recipe: Recipe, params) -> torch.optim.Optimizer:
    """The recipe's optimiser. Weight decay is Adam's coupled L2, as in the original."""
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay, fused=True)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, fused=True)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=0.9, weight_decay=recipe.weight_decay)
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}")


def build_model(recipe: Recipe, seed: int) -> LeNet5V1:
    torch.manual_seed(seed)
    return LeNet5V1(recipe.use_dropout, recipe.use_batch_norm, recipe.dropout_rate)


@dataclass
class TrialOutput:
    model: LeNet5V1
    history: list[dict]  # rows: epoch, split, loss, accuracy


def _load_checkpoint(path: Path, recipe: Recipe, seed: int) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None  # a damaged checkpoint only costs the epochs since the last good one: restart
    if state.get("recipe") != recipe.to_dict() or state.get("seed") != seed:
        return None
    return state


def train_trial(
    recipe: Recipe,
    seed: int,
    splits: Splits,
    checkpoint: Path | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    stop_after_epoch: int | None = None,
) -> TrialOutput:
    """Train one recipe from one seed; evaluate train/val/test every epoch.

    With checkpoint set, the state after every epoch is saved there (atomically)
    and a matching checkpoint found there is resumed from.
    stop_after_epoch ends early (used by tests to simulate an interruption).
    """
    device = splits.train_x.device
    if device.type == "cuda":  # same seed, same numbers: no nondeterministic cuDNN algorithms
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    model = build_model(recipe, seed).to(device)
    history: list[dict] = []
    start_epoch = 1
    saved = _load_checkpoint(checkpoint, recipe, seed) if checkpoint else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        history = list(saved["history"])
        start_epoch = saved["epoch"] + 1

    train_x, train_y = splits.train_x, splits.train_y
    n = len(train_x)
    batch = recipe.batch_size
    optimizer = None
    for phase in phases(recipe):
        if phase.last_epoch < start_epoch:
            continue
        optimizer = make_optimizer(phase.recipe, model.parameters())
        if saved is not None and phase.first_epoch < start_epoch:
            optimizer.load_state_dict(saved["optimizer"])  # resuming inside this phase
        for epoch in range(max(start_epoch, phase.first_epoch), phase.last_epoch + 1):
            model.train()
            order = torch.randperm(n, generator=torch.Generator().manual_seed(
                derived_seed(seed, epoch, 0))).to(device)
            dropout_gen = torch.Generator(device=device).manual_seed(derived_seed(seed, epoch, 1))
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.long, device=device)
            steps = range(0, n, batch)
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(steps, desc=f"{recipe.name} s{seed} e{epoch}/{phase.last_epoch}",
                           leave=False, file=sys.stderr, dynamic_ncols=True)
                steps = bar
            for i, start in enumerate(steps):
                idx = order[start:start + batch]
                x, y = train_x[idx], train_y[idx]
                logits = fast_forward(model, x, dropout_gen)
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach() * len(idx)
                correct += (logits.detach().argmax(1) == y).sum()
                if bar is not None and i % 100 == 99:  # the only host syncs, and only with a bar
                    seen = min(start + batch, n)
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}",
                                    acc=f"{correct.item() / seen:.4f}")
            if bar is not None:
                bar.close()
            rows = [{"epoch": epoch, "split": "train",
                     "loss": loss_sum.item() / n, "accuracy": correct.item() / n}]
            for split in ("val", "test"):
                result = evaluate(model, *splits.split(split))
                rows.append({"epoch": epoch, "split": split,
                             "loss": result.loss, "accuracy": result.accuracy})
            history += rows
            if log is not None:
                log(format_epoch(recipe.name, seed, epoch, total_epochs(recipe), rows))
            if checkpoint is not None:
                files.torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                   "epoch": epoch, "history": history,
                                   "recipe": recipe.to_dict(), "seed": seed}, checkpoint)
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                return TrialOutput(model.eval(), history)
    return TrialOutput(model.eval(), history)


def format_epoch(name: str, seed: int, epoch: int, epochs: int, rows: list[dict]) -> str:
    parts = [f"{r['split']} loss {r['loss']:.4f} acc {r['accuracy']:.4f}" for r in rows]
    return f"{name} seed {seed} epoch {epoch:>2}/{epochs}: " + " | ".join(parts)
