"""The original study's Python API: its snippets run unchanged on top of lenetlab.

    from lenetlab import LeNet5V1, train_model, make_dataloaders, MODEL_PATH, MODEL_SAVE_PATHS
    train_dataloader, val_dataloader, test_dataloader = make_dataloaders()

This path is the conventional loop (DataLoaders, nn.Module forward), kept for
compatibility; `lenetlab train` and `lenetlab study` use the fast loop in training.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from .data import load_fashion_mnist, make_splits


def make_dataloaders(batch_size: int = 64, data_dir: str | Path | None = None,
                     split_seed: int = 0, shuffle_seed: int | None = None,
                     ) -> tuple[DataLoader, DataLoader, DataLoader]:
    """train_dataloader, val_dataloader, test_dataloader over the local (or downloaded) data."""
    splits = make_splits(load_fashion_mnist(data_dir), split_seed)
    generator = None if shuffle_seed is None else torch.Generator().manual_seed(shuffle_seed)
    return (
        DataLoader(TensorDataset(splits.train_x, splits.train_y), batch_size=batch_size,
                   shuffle=True, generator=generator),
        DataLoader(TensorDataset(splits.val_x, splits.val_y), batch_size=batch_size),
        DataLoader(TensorDataset(splits.test_x, splits.test_y), batch_size=batch_size),
    )


def _epoch_accuracy(metric, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Accuracy over an epoch, counted per sample (the original averaged per batch)."""
    if hasattr(metric, "update") and hasattr(metric, "compute") and hasattr(metric, "reset"):
        return float(metric.compute())
    total = sum(len(target) for _, target in batches)
    return sum(float(metric(preds, target)) * len(target) for preds, target in batches) / total


def train_model(model: torch.nn.Module, train_loader: DataLoader, val_loader: DataLoader,
                epochs: int, optimizer, accuracy: Callable, weight_decay: float = 0.0,
                lr: float = 1e-3) -> tuple[list[float], list[float]]:
    """Train with the given optimiser class (the original ignored it and always used Adam).

    optimizer: an optimiser class such as torch.optim.Adam (built with lr and
    weight_decay), or an already-built optimiser instance (used as it is).
    accuracy: a torchmetrics metric such as Accuracy(task='multiclass', num_classes=10),
    or any callable (preds, target) -> accuracy of the batch.
    Returns per-epoch (train_accs, val_accs); training accuracy is taken in training
    mode, as the original did.
    """
    device = next(model.parameters()).device
    if isinstance(optimizer, torch.optim.Optimizer):
        opt = optimizer
    else:
        opt = optimizer(model.parameters(), lr=lr, weight_decay=weight_decay)
    if hasattr(accuracy, "to"):
        accuracy = accuracy.to(device)
    is_metric = hasattr(accuracy, "update") and hasattr(accuracy, "reset")
    train_accs, val_accs = [], []
    for _ in range(epochs):
        for loader, training, accs in ((train_loader, True, train_accs), (val_loader, False, val_accs)):
            model.train(training)
            if is_metric:
                accuracy.reset()
            seen = []
            with torch.set_grad_enabled(training):
                for x, y in loader:
                    x, y = x.to(device), y.to(device)
                    logits = model(x)
                    if training:
                        loss = F.cross_entropy(logits, y)
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                    preds = logits.detach().argmax(1)
                    if is_metric:
                        accuracy.update(preds, y)
                    else:
                        seen.append((preds, y))
            accs.append(_epoch_accuracy(accuracy, seen))
    model.eval()
    return train_accs, val_accs
