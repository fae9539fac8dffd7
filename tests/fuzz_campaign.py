"""A long fuzzing campaign over every reader of outside input (the targets of test_fuzz.py).

    python tests/fuzz_campaign.py --inputs 100000 [--seed 0] [--only image,spec] [--keep DIR]

Prints, per reader, the inputs tried, how many gave a result and how many lenetlab's typed
error, the failures (anything else, or over 5 s) and the slowest input, then the growth of
the process's peak memory (the limit is 512 MiB). Each failing input is written under --keep
with its traceback. Exit status 1 when anything failed. Needs the real data set for the
checkpoints' seeds ($LENETLAB_DATA or ../shared/data/fashion-mnist).
"""

from __future__ import annotations

import argparse
import pickle
import random
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from conftest import REPO, real_data_dir  # noqa: E402
from support.fuzzing import MEMORY_LIMIT_MIB, Failure, all_targets  # noqa: E402


def targets(work: Path) -> list:
    import torch

    from lenetlab.data import load_fashion_mnist, make_splits

    torch.set_num_threads(1)
    data = real_data_dir()
    if data is None:
        sys.exit("fuzz_campaign: the real Fashion-MNIST is not here: set LENETLAB_DATA")
    splits = make_splits(load_fashion_mnist(data, download=False), train_subset=3000)
    return all_targets(work, REPO, splits, data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=100_000, help="inputs in all (default 100000)")
    parser.add_argument("--seed", type=int, default=0, help="the campaign's seed (default 0)")
    parser.add_argument("--only", default="", help="comma-separated reader names (default: all)")
    parser.add_argument("--keep", type=Path, default=Path("fuzz-failures"),
                        help="folder for failing inputs (default fuzz-failures)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # torch's notes on odd tensors in forged checkpoints
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        chosen = [t for t in targets(work) if not args.only or t.name in args.only.split(",")]
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rng = random.Random(args.seed)
        stats = {t.name: dict.fromkeys(("inputs", "accepted", "refused", "failures", "slowest"), 0)
                 for t in chosen}
        started = time.perf_counter()
        for i in range(args.inputs):
            target = chosen[i % len(chosen)]
            row = stats[target.name]
            input_seed = rng.getrandbits(64)
            start = time.perf_counter()
            try:
                row[target.run_one(random.Random(input_seed))] += 1
            except Failure as failure:
                row["failures"] += 1
                args.keep.mkdir(parents=True, exist_ok=True)
                stem = args.keep / f"{target.name.replace(' ', '_')}-{input_seed}"
                stem.with_suffix(".txt").write_text(str(failure), encoding="utf-8")
                value = target.mutate(random.Random(input_seed))
                stem.with_suffix(".pickle").write_bytes(pickle.dumps(value))
                print(f"FAILURE {target.name} (input seed {input_seed}): {str(failure).splitlines()[0]}",
                      flush=True)
            row["inputs"] += 1
            row["slowest"] = max(row["slowest"], time.perf_counter() - start)
            if (i + 1) % 10_000 == 0:
                print(f"{i + 1:,} inputs in {time.perf_counter() - started:.0f} s", flush=True)
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024
    print(f"\n{'reader':<14}{'inputs':>9}{'result':>9}{'refused':>9}{'failures':>9}{'slowest':>10}")
    for name, row in stats.items():
        print(f"{name:<14}{row['inputs']:>9,}{row['accepted']:>9,}{row['refused']:>9,}{row['failures']:>9}"
              f"{row['slowest']:>9.2f}s")
    total = sum(r["inputs"] for r in stats.values())
    failures = sum(r["failures"] for r in stats.values())
    print(f"{total:,} inputs, {failures} failures, in {time.perf_counter() - started:.0f} s; "
          f"peak memory grew {grown:.0f} MiB (limit {MEMORY_LIMIT_MIB})")
    return 1 if failures or grown >= MEMORY_LIMIT_MIB else 0


if __name__ == "__main__":
    sys.exit(main())
