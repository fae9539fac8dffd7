"""How long lenetlab takes to answer, side by side with a bare `python -c pass`.

    python benchmarks/startup.py                  # 5 rounds, the data from $LENETLAB_DATA
    python benchmarks/startup.py --rounds 9
    PYTHONPATH=/path/to/other/src python benchmarks/startup.py   # another checkout, same venv

Each round runs every command once, in turn (so a noisy neighbour's slow second does not fall on
one command alone); the table gives each command's median and minimum wall time, and the median
less `python -c pass`'s:

* `python -c pass`: the interpreter alone;
* `lenetlab --help` (as `python -m lenetlab --help`);
* `import lenetlab`;
* `lenetlab train baseline` for 1 epoch on 2,000 images, one thread: the command's whole life;
* before the first trial: a `lenetlab study` of one 1-epoch trial on 2,000 images, from the
  command's start to the trial's start in its worker (the trial's recorded result's time less
  its own wall_time_s: its epochs and their evaluation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = ["--train-subset", "2000", "--threads", "1", "--quiet"]


def run(command: list[str], cwd: str) -> float:
    """Wall time of command, from its start to its exit; a failure stops the benchmark."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"startup.py: {' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return elapsed


def before_first_trial(cwd: str, round_: int) -> float:
    """A one-trial study: seconds from the command's start to its trial's start in the worker."""
    name = f"startup-{round_}"
    started = time.time()
    run([sys.executable, "-m", "lenetlab", "study", "--variants", "baseline", "--seeds", "1",
         "--epochs-scale", "0.09", "--workers", "1", "--out", "runs", "--name", name, *TINY], cwd)
    (record,) = (Path(cwd) / "runs" / name / "trials").glob("*.json")
    return record.stat().st_mtime - json.loads(record.read_text())["wall_time_s"] - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    python = sys.executable
    commands = {
        "python -c pass": [python, "-c", "pass"],
        "lenetlab --help": [python, "-m", "lenetlab", "--help"],
        "import lenetlab": [python, "-c", "import lenetlab"],
        "train, 1 epoch, 2,000 images": [python, "-m", "lenetlab", "train", "baseline", "--epochs", "1",
                                         "--out", "models", *TINY],
    }
    times: dict[str, list[float]] = {name: [] for name in [*commands, "before the first trial"]}
    with tempfile.TemporaryDirectory() as cwd:
        run(commands["train, 1 epoch, 2,000 images"], cwd)  # untimed: builds the native step, warms caches
        for round_ in range(args.rounds):
            for name, command in commands.items():
                times[name].append(run(command, cwd))
            times["before the first trial"].append(before_first_trial(cwd, round_))
    import lenetlab

    bare = statistics.median(times["python -c pass"])
    print(f"lenetlab from {Path(lenetlab.__file__).parent}; Python {platform.python_version()}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.rounds} rounds")
    print(f"{'':<32} {'median s':>9} {'min s':>7} {'- python':>9}")
    for name, values in times.items():
        median = statistics.median(values)
        extra = "" if name == "python -c pass" else f"{median - bare:>+9.2f}"
        print(f"{name:<32} {median:>9.2f} {min(values):>7.2f} {extra}")


if __name__ == "__main__":
    main()
