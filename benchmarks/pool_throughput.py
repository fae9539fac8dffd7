"""Throughput of the local process pool against running the same trials one after another.

Runs the same sweep (one recipe, N seeds, so N independent trials) twice through
`lenetlab sweep`: once with one worker using every core (trials one after another),
once with the default pool (one single-threaded worker per core). Prints both wall
times, the throughput ratio, and whether both runs gave identical accuracies per seed
(they should with the native kernels, which run one thread whatever --threads says;
PyTorch's kernels may round differently with another thread count).

    python benchmarks/pool_throughput.py                 # 4 trials of 1 epoch, full data
    python benchmarks/pool_throughput.py --trials 6 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_sweep(out: Path, name: str, trials: int, epochs: int, workers: int, threads: int,
              data_dir: str) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "lenetlab", "sweep", "--variant", "baseline", "--epochs", str(epochs),
           "--seeds", str(trials), "--workers", str(workers), "--threads", str(threads),
           "--out", str(out), "--name", name, "--data-dir", data_dir, "--quiet"]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    return seconds, json.loads((out / name / "summary.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4, help="independent trials (default 4)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per trial (default 1)")
    parser.add_argument("--data-dir", default=os.environ.get("LENETLAB_DATA")
                        or str(REPO_ROOT.parent / "shared/data/fashion-mnist"))
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        one_by_one, seq = run_sweep(out, "sequential", args.trials, args.epochs, 1, cores, args.data_dir)
        pooled, pool = run_sweep(out, "pool", args.trials, args.epochs, cores, 1, args.data_dir)
    seq_acc = seq["configs"][0]["final"]["test"]
    pool_acc = pool["configs"][0]["final"]["test"]
    print(f"machine: {cores} cores; {args.trials} trials of {args.epochs} epoch(s), baseline recipe")
    print(f"one after another (1 worker x {cores} threads): {one_by_one:7.1f} s   "
          f"test accuracy {seq_acc['mean']:.4f} ± {seq_acc['std']:.4f}")
    print(f"local pool ({cores} workers x 1 thread):        {pooled:7.1f} s   "
          f"test accuracy {pool_acc['mean']:.4f} ± {pool_acc['std']:.4f}")
    print(f"throughput ratio (pool / one after another): {one_by_one / pooled:.2f}x "
          f"(goal >= 1.4x)")
    same = seq_acc["values"] == pool_acc["values"]
    print(f"per-seed test accuracies identical: {'yes' if same else 'NO'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
