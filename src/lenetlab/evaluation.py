"""Accuracy, loss, per-class accuracy and the confusion matrix of a model on one split."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .model import LeNet5V1, fast_forward
from .records import Evaluation  # the record, without torch: run folders read it too


@contextlib.contextmanager
def _one_torch_thread():
    """torch on one thread for a few tiny ops: on several, a tiny op (log_softmax on 500 x 10)
    wakes torch's OpenMP team, whose spinning workers take the cores that the native forward's
    threads need for the next batch. These ops' results do not depend on the thread count."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def flip_averaged(forward: Callable, model: LeNet5V1, x: torch.Tensor) -> torch.Tensor:
    """Log-probabilities averaged over each image and its left-right mirror (test-time flip
    averaging, for models trained with flips): forward(model, x) gives logits."""
    probs = forward(model, x).softmax(1) + forward(model, x.flip(3).contiguous()).softmax(1)
    return (probs / 2).log()


@torch.inference_mode()
def evaluate(model: LeNet5V1, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500,
             forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Evaluation:
    """Evaluate in eval mode (dropout off, batch-norm running statistics) in large batches.

    forward(x) -> logits defaults to fast_forward; training passes the native one where it trains.
    """
    was_training = model.training
    model.eval()
    forward = forward or (lambda batch: fast_forward(model, batch))
    loss_sum = torch.zeros((), device=x.device)
    confusion = torch.zeros(100, dtype=torch.long, device=x.device)
    for start in range(0, len(x), batch_size):
        logits = forward(x[start:start + batch_size])
        target = y[start:start + batch_size]
        with _one_torch_thread():  # the forward keeps every thread; these ops need none
            loss_sum += F.cross_entropy(logits, target, reduction="sum")
            confusion += torch.bincount(target * 10 + logits.argmax(1), minlength=100)
    model.train(was_training)
    matrix = confusion.view(10, 10).cpu()
    per_class = (matrix.diag().double() / matrix.sum(1).clamp(min=1).double()).tolist()
    return Evaluation(
        loss=loss_sum.item() / max(len(x), 1),
        accuracy=matrix.diag().sum().item() / max(len(x), 1),
        per_class_accuracy=per_class,
        confusion_matrix=matrix.tolist(),
    )
