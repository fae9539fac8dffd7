"""What a teacher costs to train: a larger CNN's PyTorch training step against LeNet-5's, side by side.

Distillation needs a teacher trained on the same CPU. One candidate is an ensemble of `tuned`
models on the native step; the other a larger network that only PyTorch trains. This times one
AdamW training step on a batch of 64 random 28x28 images, one thread, for LeNet-5 as `tuned`
builds it (61,750 parameters) and for a 459,000-parameter CNN (3x3 convolutions of 32, 64 and
64 channels with batch norm, two poolings, a 128-unit layer: the size of the best published
small Fashion-MNIST networks). Rounds alternate the two; medians are compared.

    python benchmarks/teacher_cost.py             # 3 rounds of 60 steps each
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from lenetlab.model import LeNet5V1
from lenetlab.recipes import RECIPES, architecture

STEPS_PER_EPOCH = 54_000 // 64


def larger_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


def step_seconds(model: nn.Module, steps: int) -> float:
    """Seconds per training step, after 10 steps of warm-up."""
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    optimizer = torch.optim.AdamW(model.parameters(), 3e-3)
    for i in range(steps + 10):
        if i == 10:
            started = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per side and round (default 60)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lenet, larger = LeNet5V1(**architecture(RECIPES["tuned"])), larger_cnn()
    for name, model in (("LeNet-5 (tuned)", lenet), ("larger CNN", larger)):
        print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters")
    times = {"lenet": [], "larger": []}
    for _ in range(args.rounds):
        times["lenet"].append(step_seconds(lenet, args.steps))
        times["larger"].append(step_seconds(larger, args.steps))
    small, big = statistics.median(times["lenet"]), statistics.median(times["larger"])
    print(f"one PyTorch step, one thread (median of {args.rounds}): LeNet-5 {small * 1e3:.1f} ms, "
          f"larger CNN {big * 1e3:.1f} ms: {big / small:.1f}x")
    print(f"larger CNN: {big * STEPS_PER_EPOCH:.0f} s an epoch of 54,000 images, "
          f"{big * STEPS_PER_EPOCH * 100 / 3600:.1f} h for 100 epochs")


if __name__ == "__main__":
    main()
