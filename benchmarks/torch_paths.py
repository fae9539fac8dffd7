"""What fast_forward buys on PyTorch's path: one training step with the plain module's forward
(LeNet5V1.forward) against one with fast_forward, side by side, per recipe.

PyTorch's path trains every recipe the native step does not cover, and every recipe where no C
compiler builds the step. fast_forward computes the same logits through faster kernels on the
CPU (tanh as 2 sigmoid(2x) - 1, pooling and conv2 as matrix products); the parity tests hold it
to the plain module's float64 steps as they hold the native step. Both sides: batch 64 of the
real images, the recipe's layers, torch's own optimiser, one thread; the sides take turns in a
shuffled order each round and the median of each is compared.

    python benchmarks/torch_paths.py                # baseline, dropout + batch norm, tuned
    python benchmarks/torch_paths.py --rounds 9 --steps 100
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lenetlab.data import load_fashion_mnist, make_splits
from lenetlab.model import fast_forward
from lenetlab.optimizers import make_optimizer
from lenetlab.recipes import RECIPES
from lenetlab.training import build_model

RECIPE_NAMES = ("baseline", "dropout", "batch_norm", "tuned")


def plain(model, x):
    return model(x)


def fast(model, x):
    return fast_forward(model, x)


def seconds_per_step(forward, recipe, images, labels, steps: int) -> float:
    model = build_model(recipe, 0).train()
    optimizer = make_optimizer(recipe, model.parameters())
    batches = [(images[i:i + 64], labels[i:i + 64]) for i in range(0, 64 * steps, 64)]
    for x, y in batches[:3]:  # warm-up: the allocator and the optimiser's state
        _step(forward, model, optimizer, x, y)
    start = time.perf_counter()
    for x, y in batches:
        _step(forward, model, optimizer, x, y)
    return (time.perf_counter() - start) / steps


def _step(forward, model, optimizer, x, y) -> None:
    loss = F.cross_entropy(forward(model, x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of both sides (default 5)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per side and round (default 50)")
    parser.add_argument("--data-dir", type=Path, default=os.environ.get("LENETLAB_DATA"),
                        help="the Fashion-MNIST folder (default: $LENETLAB_DATA)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    splits = make_splits(load_fashion_mnist(args.data_dir, download=False), train_subset=64 * args.steps)
    images, labels = splits.train_x, splits.train_y
    order = random.Random(0)
    print(f"one training step, batch 64, one thread, median of {args.rounds} rounds of {args.steps} steps")
    print(f"{'recipe':<12}{'module forward':>16}{'fast_forward':>14}{'ratio':>8}")
    for name in RECIPE_NAMES:
        recipe = RECIPES[name]
        times = {"plain": [], "fast": []}
        for _ in range(args.rounds):
            sides = [("plain", plain), ("fast", fast)]
            order.shuffle(sides)
            for side, forward in sides:
                times[side].append(seconds_per_step(forward, recipe, images, labels, args.steps))
        a, b = statistics.median(times["plain"]), statistics.median(times["fast"])
        print(f"{name:<12}{a * 1e3:>13.2f} ms{b * 1e3:>11.2f} ms{a / b:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
