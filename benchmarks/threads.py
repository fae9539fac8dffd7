"""One trial on every core against one thread: `lenetlab train` with its default threads and
with --threads 1, side by side in one run, after one untimed warm-up command.

    python benchmarks/threads.py                      # baseline, 30 epochs, one run of each
    python benchmarks/threads.py --rounds 2 --epochs 10 --data-dir /path/to/fashion-mnist

Each round runs both commands one after the other (the order alternating between rounds, so a
noisy neighbour's slow minute does not always fall on the same side) and prints per command:

* the epochs, timed inside the trial's process: the trial's wall time as its sidecar records
  it (execute_trial's clock around the splits and train_trial) per epoch, and the intervals
  between the epoch lines the command prints as each epoch ends (train, validation and test;
  the first epoch is left out): their median and their minimum, the epoch that nothing else
  on the machine slowed down;
* the whole command's wall time (process start to exit: imports, data loading, training,
  saving);
* the ratios of one thread to the default, and whether the saved weight files are
  byte-identical (SHA-256) across every run, as the native step's fixed partition promises;
* before and after, what two threads of a register-only FMA loop get together against one:
  on a shared VM the host may run another tenant on the sibling hyperthreads of our cores,
  invisibly to this guest (no steal time), and then two threads get one core's FMA throughput.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "lenet5_{variant}_fashionmnist.pth"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def fma_scaling(seconds: float = 1.0) -> str:
    """Two threads of step_time.py's register-only FMA loop at once, against one: GFLOP/s."""
    sys.path.insert(0, str(REPO / "src"))
    sys.path.insert(0, str(REPO / "benchmarks"))
    from step_time import fma_peak_gflops

    one, two = (fma_peak_gflops(None, seconds / 2, threads)[0] for threads in (1, 2))
    return f"FMA loop: 1 thread {one:.0f} GFLOP/s, 2 threads {two:.0f} GFLOP/s ({two / one:.2f}x)"


def run(variant: str, epochs: int, threads: int | None, data_dir: str | None, out: Path,
        extra: tuple[str, ...] = ()) -> dict:
    """One `lenetlab train` in a subprocess: its wall time, epoch-line arrival times, sidecar."""
    cmd = [sys.executable, "-m", "lenetlab", "train", variant, "--epochs", str(epochs), "--out", str(out),
           *extra]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    arrivals = []
    start = time.perf_counter()
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            if " epoch " in line and "/" in line:
                arrivals.append(time.perf_counter())
        err = proc.stderr.read()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    weights = out / WEIGHTS.format(variant=variant)
    sidecar = json.loads(weights.with_suffix(".json").read_text())
    intervals = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return {"wall": wall, "trial": sidecar["wall_time_s"], "threads": sidecar["threads"],
            "kernels": sidecar["kernels"], "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "epoch_lines": statistics.median(intervals) if intervals else float("nan"),
            "epoch_min": min(intervals, default=float("nan")),
            "epoch_max": max(intervals, default=float("nan")),
            "metrics": sidecar["metrics"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--variant", default="baseline", help="the recipe to train (default baseline)")
    ap.add_argument("--epochs", type=int, default=30, help="epochs per run (default 30)")
    ap.add_argument("--rounds", type=int, default=1, help="runs of each command (default 1)")
    ap.add_argument("--data-dir", default=os.environ.get("LENETLAB_DATA"),
                    help="the Fashion-MNIST folder (default: $LENETLAB_DATA)")
    args = ap.parse_args()
    import torch

    print(f"host: {cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
          f"(default threads {torch.get_num_threads()}), {platform.python_implementation()} "
          f"{platform.python_version()}; load average {load()}")
    print(f"lenetlab train {args.variant} --epochs {args.epochs}: default threads against --threads 1, "
          f"{args.rounds} round(s); before: {fma_scaling()}", flush=True)
    sides = {"default": None, "--threads 1": 1}
    results: dict[str, list[dict]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory(prefix="lenetlab-threads-") as tmp:
        # Untimed, so that neither side pays for what only a first run does: after an idle hour
        # the first command on the Zen 5 VM took 3 s longer outside its trial than the second.
        run(args.variant, 1, None, args.data_dir, Path(tmp) / "warm-up", ("--train-subset", "2000"))
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in order:
                out = Path(tmp) / f"{r}-{name[-1]}"
                got = run(args.variant, args.epochs, sides[name], args.data_dir, out)
                results[name].append(got)
                print(f"  round {r + 1} {name:12s} ({got['threads']} threads, {got['kernels']} kernels): "
                      f"command {got['wall']:7.1f} s, trial {got['trial']:7.1f} s "
                      f"({got['trial'] / args.epochs:.2f} s/epoch), epoch lines median "
                      f"{got['epoch_lines']:.2f} min {got['epoch_min']:.2f} max {got['epoch_max']:.2f} s; "
                      f"load {load()}", flush=True)
    print(f"after: {fma_scaling()}; load {load()}")
    med = {name: {k: statistics.median(g[k] for g in runs) for k in ("wall", "trial", "epoch_lines")}
           for name, runs in results.items()}
    for name, runs in results.items():
        med[name]["epoch_min"] = min(g["epoch_min"] for g in runs)
    print("medians (s)              default   --threads 1   ratio")
    rows = [("epoch (trial / epochs)", "trial", 1 / args.epochs), ("epoch (lines, median)", "epoch_lines", 1),
            ("epoch (lines, fastest)", "epoch_min", 1), ("whole command", "wall", 1)]
    for label, key, scale in rows:
        a, b = med["default"][key] * scale, med["--threads 1"][key] * scale
        print(f"  {label:22s} {a:8.2f}   {b:11.2f}   {b / a:5.2f}x")
    digests = {g["sha256"] for runs in results.values() for g in runs}
    same_metrics = len({json.dumps(g["metrics"]) for runs in results.values() for g in runs}) == 1
    print(f"weight files byte-identical across all {sum(map(len, results.values()))} runs: "
          f"{'yes' if len(digests) == 1 else 'NO'} (sha256 {sorted(digests)[0][:16]}...)"
          f"; per-epoch metrics identical: {'yes' if same_metrics else 'NO'}")


if __name__ == "__main__":
    main()
