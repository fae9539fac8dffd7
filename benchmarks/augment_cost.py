"""What augmentation costs: one training epoch of the tuned recipe with and without it, side by side.

The issue's bound: augmentation may cost at most 10% of an epoch's time. Both sides train the
same recipe from the same seed on the whole 54,000-image split, one thread, with the kernels
train_trial picks (native on a CPU where it builds); the "without" side sets translate 0,
flip off and erasing 0, the "with" side uses the tuned recipe's augmentation and, as a second
row, adds random erasing (p 0.25). Rounds alternate the sides so that drift in the machine's
load falls on both; the median of each is compared. Each time is a whole epoch: training,
then evaluating validation and test.

    python benchmarks/augment_cost.py               # 3 rounds
    python benchmarks/augment_cost.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from lenetlab.data import load_fashion_mnist, make_splits
from lenetlab.recipes import RECIPES
from lenetlab.training import train_trial

LIMIT = 0.10  # the bound on augmentation's share of an epoch


def epoch_seconds(recipe, splits) -> tuple[float, str]:
    """Seconds from the start of a one-epoch trial to the end of its epoch's evaluation (its
    log line), so not the flip-averaged test that a trial with flips adds once at its end."""
    ends = []
    start = time.perf_counter()
    out = train_trial(replace(recipe, epochs=1, warmup_epochs=0), 0, splits,
                      log=lambda line: ends.append(time.perf_counter()))
    return ends[0] - start, out.kernels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get(
        "LENETLAB_DATA", Path(__file__).resolve().parents[2] / "shared/data/fashion-mnist")),
        help="folder with the Fashion-MNIST IDX files (default: $LENETLAB_DATA)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    splits = make_splits(load_fashion_mnist(args.data_dir, download=False))
    tuned = RECIPES["tuned"]
    sides = {"without augmentation": replace(tuned, translate=0, flip=False, erasing=0.0),
             f"tuned (translate {tuned.translate}, flip {tuned.flip}, erasing {tuned.erasing:g})": tuned,
             "tuned + erasing 0.25": replace(tuned, erasing=0.25)}
    times: dict[str, list[float]] = {name: [] for name in sides}
    kernels = set()
    epoch_seconds(sides["without augmentation"], splits)  # warm-up: native build, caches
    for _ in range(args.rounds):
        for name, recipe in sides.items():
            seconds, used = epoch_seconds(recipe, splits)
            times[name].append(seconds)
            kernels.add(used)
    base = statistics.median(times["without augmentation"])
    print(f"One epoch of the tuned recipe (train 54,000 + evaluate 16,000), {', '.join(sorted(kernels))} "
          f"kernels, one thread, median of {args.rounds} alternating rounds:")
    for name, values in times.items():
        share = statistics.median(values) / base - 1
        verdict = "" if name.startswith("without") else (
            f"  augmentation {share:+.1%} of the epoch ({'within' if share <= LIMIT else 'OVER'} "
            f"the {LIMIT:.0%} bound)")
        spread = f"(rounds {min(values):.2f}-{max(values):.2f})"
        print(f"  {name:44} {statistics.median(values):6.2f} s {spread}{verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
