"""A search's cost beyond its epochs on the local pool: the overhead per trial and the cores' busy share.

Runs one search (lenetlab.tuning's Search, as `lenetlab tune` runs it, with Optuna's journal in a
temporary run folder) of N trials on the local pool, one single-threaded worker per core, and
prints, measured in that run:

- the overhead per trial: (wall time x workers - the seconds of every trial's epochs, its steps
  and evaluations as each trial recorded them) / trials. It holds everything a trial costs beyond
  its epochs: the worker's start, the ask and the tell, each epoch's report to the pruner, the
  checkpoints and the records, and the idle core while the last trial runs alone;
- the busy share: the CPU seconds of this process and of every worker (read from the forkserver,
  which reaps them) over wall time x usable cores.

The search stops here, before the confirmation, which is a plain sweep.

    python benchmarks/tune_overhead.py                  # 16 trials of 2 epochs on 6,000 images
    python benchmarks/tune_overhead.py --trials 30 --epochs 3 --train-subset 12000
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
from pathlib import Path


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of pid and of its children it has reaped, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-subset", type=int, default=6000)
    parser.add_argument("--data-dir", default=os.environ.get("LENETLAB_DATA"))
    args = parser.parse_args()

    import multiprocessing.forkserver

    from lenetlab.data import load_fashion_mnist
    from lenetlab.engines import usable_cores
    from lenetlab.localpool import start_local_pool, stop_local_pool
    from lenetlab.options import run_options
    from lenetlab.rundir import hold
    from lenetlab.tunerecords import read_search_results, write_tune_plan
    from lenetlab.tunespec import parse
    from lenetlab.tuning.run import new_plan
    from lenetlab.tuning.search import Search
    from lenetlab.tuning.study import open_study

    start_local_pool(["lenetlab.tuning.referee"])
    data = load_fashion_mnist(args.data_dir, quiet=True, test=False)
    spec = parse({"variant": "baseline", "epochs": args.epochs, "trials": args.trials, "pruner": "hyperband",
                  "search": {"lr": {"low": 3e-4, "high": 1e-2, "log": True}, "batch_size": [64, 128]}})
    options = run_options("cpu", None, 0, args.train_subset, None)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "search"
        plan = new_plan("search", spec, options)
        with hold(run_dir):
            write_tune_plan(run_dir, plan)
            search = Search(run_dir, plan, open_study(run_dir, spec), None)
            server = multiprocessing.forkserver._forkserver._forkserver_pid
            time.sleep(1.0)  # the forkserver's own imports are done before the clock starts
            tree_before, self_before = tree_cpu_seconds(server), resource.getrusage(resource.RUSAGE_SELF)
            started = time.perf_counter()
            search.run(data, None, plan.workers)
            wall = time.perf_counter() - started
            time.sleep(0.2)  # the forkserver reaps the last worker
            self_after = resource.getrusage(resource.RUSAGE_SELF)
            tree = tree_cpu_seconds(server) - tree_before
            own = (self_after.ru_utime + self_after.ru_stime) - (self_before.ru_utime + self_before.ru_stime)
            results = read_search_results(run_dir, plan.run_id)
    stop_local_pool()
    epochs = sum(sum(r.epoch_seconds) for r in results)
    pruned = sum(r.pruned for r in results)
    cores = usable_cores()
    overhead = (wall * plan.workers - epochs) / len(results)
    print(f"CPU: {cpu_model()}, {cores} usable core(s); {plan.workers} worker(s) x {plan.options.threads} "
          f"thread(s), {plan.options.kernels} kernels")
    print(f"search: {len(results)} trials ({pruned} pruned) of up to {args.epochs} epoch(s) on "
          f"{args.train_subset:,} images in {wall:.1f} s; epochs {epochs:.1f} s in all")
    print(f"overhead per trial beyond its epochs: {overhead:.3f} s")
    print(f"cores busy: {(own + tree) / (wall * cores):.1%} of {cores} x {wall:.1f} s "
          f"(this process {own:.1f} s, workers {tree:.1f} s of CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
