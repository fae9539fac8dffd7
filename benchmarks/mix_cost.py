"""What mixup and CutMix cost: one training epoch of the tuned recipe with and without them, side by side.

Each side trains the same recipe from the same seed on the whole 54,000-image split, one
thread, with the kernels train_trial picks (native on a CPU where it builds); validation and
test are cut to 500 images each, so that the epoch's time is its training. The sides: tuned
as it is, with mixup (0.4) and with CutMix (1.0), each mixing every batch. Rounds alternate
the sides so that drift in the machine's load falls on all; the medians are compared.

    python benchmarks/mix_cost.py               # 3 rounds
    python benchmarks/mix_cost.py --rounds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

from lenetlab.data import load_fashion_mnist, make_splits
from lenetlab.recipes import RECIPES
from lenetlab.training import train_trial


def epoch_seconds(recipe, splits) -> tuple[float, str]:
    """The seconds of a one-epoch trial's epoch, its steps and small evaluation, as the trial
    records them, and the kernels that trained it."""
    out = train_trial(replace(recipe, epochs=1, warmup_epochs=0), 0, splits)
    return out.epoch_seconds[0], out.kernels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get(
        "LENETLAB_DATA", Path(__file__).resolve().parents[2] / "shared/data/fashion-mnist")),
        help="folder with the Fashion-MNIST IDX files (default: $LENETLAB_DATA)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    splits = make_splits(load_fashion_mnist(args.data_dir, download=False))
    few = {name: getattr(splits, name)[:500] for name in ("val_x", "val_y", "test_x", "test_y")}
    splits = dataclasses.replace(splits, **few)
    tuned = RECIPES["tuned"]  # its shifts and flips: a mixed image's partner is augmented too
    sides = {"tuned": tuned, "tuned + mixup 0.4": replace(tuned, mixup=0.4),
             "tuned + cutmix 1.0": replace(tuned, cutmix=1.0)}
    times: dict[str, list[float]] = {name: [] for name in sides}
    kernels = set()
    epoch_seconds(tuned, splits)  # warm-up: native build, caches
    for _ in range(args.rounds):
        for name, recipe in sides.items():
            seconds, used = epoch_seconds(recipe, splits)
            times[name].append(seconds)
            kernels.add(used)
    base = statistics.median(times["tuned"])
    print(f"One training epoch of tuned (54,000 images; evaluating 1,000), "
          f"{', '.join(sorted(kernels))} kernels, one thread, median of {args.rounds} alternating rounds:")
    for name, values in times.items():
        ratio = statistics.median(values) / base
        print(f"  {name:22} {statistics.median(values):6.2f} s (rounds {min(values):.2f}-{max(values):.2f})"
              f"  {ratio:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
