"""Per-step time of the native training step against the PyTorch step, and of the eval forward.

One process, A/B interleaved (blocks of steps alternate between the paths, so a noisy
neighbour slows all alike); medians over the blocks. The PyTorch step runs on one thread, the
native step on each thread count of --threads (default 1). Also measures this core's
FMA peak with a register-only loop built by the same helper and flags as the native step,
and the share of it the native step sustains (145 MFLOP per batch-64 step: 2.26 MFLOP per
image forward and backward).

    python benchmarks/step_time.py                 # the build -march=native gives
    python benchmarks/step_time.py --no-avx512     # the 256-bit build (-mno-avx512f)
    python benchmarks/step_time.py --variant batch_norm --optimizer sgd
    python benchmarks/step_time.py --baseline old_native_step.c --no-torch   # A/B two versions
    git show 4af1912:src/lenetlab/native_step.c > /tmp/old.c   # a version from before the split
    python benchmarks/step_time.py --threads 1,2 --no-torch   # the native step on 1 and 2 threads

Then a per-stage breakdown (microseconds per step, as thread 0 sees it: a stage's time on
several threads includes its wait for the slowest; for several threads also the busiest
thread's own work in the stage, its waits left out) from builds with -DLN_PROFILE, the
versions and thread counts again interleaved block by block. On a busy machine
--profile-stat min shows what each stage takes when nothing interrupts it. A baseline from
before the argument record (e056921 and older) runs through its old positional interface
(tests/support/legacy.py), on one thread. --baseline takes one C file or a split source's folder.
"""

from __future__ import annotations

import argparse
import ctypes
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

FLOP_PER_STEP = 145e6  # batch 64, forward and backward

FMA_LOOP = r"""
#if defined(__AVX512F__)
#define VBYTES 64
#elif defined(__AVX__)
#define VBYTES 32
#else
#define VBYTES 16
#endif
typedef float vf __attribute__((vector_size(VBYTES)));
#define NACC 12 /* independent chains: more than FMA latency x FMA pipes on current cores */
int fma_vector_bytes(void) { return VBYTES; }
/* iters x NACC vector FMAs on registers only; returns a value so nothing is optimised away */
float fma_loop(long iters)
{
    vf acc[NACC], m = (vf){} + 0.999999f, a = (vf){} + 1e-7f;
    for (int i = 0; i < NACC; i++) acc[i] = (vf){} + (float)i;
    for (long k = 0; k < iters; k++)
        _Pragma("GCC unroll 12") for (int i = 0; i < NACC; i++) acc[i] = acc[i] * m + a;
    float s = 0.f;
    for (int i = 0; i < NACC; i++) s += acc[i][0];
    return s;
}
"""


def fma_loop(flags: tuple[str, ...] | None = None):
    """The register-only FMA loop (a function of its iteration count) and its vector lanes."""
    from lenetlab import native

    lib = ctypes.CDLL(str(native.build(FMA_LOOP, "fma_peak", flags)))
    lib.fma_loop.restype = ctypes.c_float
    lib.fma_loop.argtypes = [ctypes.c_long]
    return lib.fma_loop, lib.fma_vector_bytes() // 4


def legacy_driver(source: str):
    """The driver of an older source (tests/support/legacy.py: before the argument record, or
    before constants.h), else None."""
    if "LN_ARGS" in source and "ln_constants" in source:
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support.legacy import driver

    return driver(source)


def fma_gflop(lanes: int, iters: int) -> float:
    return 2 * lanes * 12 * iters / 1e9  # NACC = 12 vector FMAs per iteration


def fma_peak_gflops(flags: tuple[str, ...] | None = None, seconds: float = 0.5,
                    threads: int = 1) -> tuple[float, int]:
    """The FMA loop's best rate over `seconds` (GFLOP/s; on `threads` threads at once, their
    total: what the host gives when every core works, not always threads x one) and its vector bits."""
    run, lanes = fma_loop(flags)
    iters = 1_000_000 * (5 if threads > 1 else 1)  # calls of 2-10 ms: thread starts are noise
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        workers = [threading.Thread(target=run, args=(iters,)) for _ in range(threads - 1)]
        t = time.perf_counter()
        for w in workers:
            w.start()
        run(iters)  # ctypes lets go of the GIL: the threads run at once
        for w in workers:
            w.join()
        best = max(best, threads * fma_gflop(lanes, iters) / (time.perf_counter() - t))
    return best, lanes * 32


def torch_step(model, optimizer, x, y, keep):
    from lenetlab.model import fast_forward

    logits = fast_forward(model, x, keep) if keep is not None else fast_forward(model, x)
    loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def native_flags(args) -> tuple[str, ...]:
    from lenetlab import native

    extra = tuple(args.extra_flags.split()) if args.extra_flags is not None else native.extra_flags()
    extra = (*(("-mno-avx512f",) if args.no_avx512 else ()), *extra)
    return native.library_flags(native.target_flags(extra=extra) or (), extra)


def turns(paths: dict, rounds: int):
    """Each round's (name, path) pairs in a shuffled order (seeded): in a fixed order the second
    of two copies of one library ran 1% faster than the first (an Intel Xeon VM, 2026-12-04: one
    source against itself 0.99x, in both builds)."""
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        order = list(paths.items())
        shuffle(order)
        yield order


def interleaved(paths: dict, batch, rounds: int, block: int) -> dict[str, list[float]]:
    """ms per step of each path, per block; the paths take turns block by block (turns())."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    step = 0
    for this_round in turns(paths, rounds):
        for name, run in this_round:
            t = time.perf_counter()
            for _ in range(block):
                run(*batch(step))
                step += 1
            times[name].append((time.perf_counter() - t) / block * 1e3)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-avx512", action="store_true", help="build the native step with -mno-avx512f")
    ap.add_argument("--extra-flags", default=None,
                    help="extra C flags, e.g. --extra-flags='-mno-avx' (default: the env variable)")
    ap.add_argument("--baseline", metavar="SOURCE",
                    help="also time this version of the step: one C file or a split source's folder (A/B)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch step")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-stage breakdown")
    ap.add_argument("--threads", default="1", help="native thread counts to compare, e.g. 1,2 (default 1)")
    ap.add_argument("--profile-stat", choices=["median", "min"], default="median",
                    help="the per-stage statistic over blocks (default median)")
    ap.add_argument("--variant", default="baseline", choices=["baseline", "dropout", "batch_norm", "both"])
    ap.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--block", type=int, default=20, help="steps per A or B block")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--eval-images", type=int, default=10_000)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from lenetlab import native
    from lenetlab.model import LeNet5V1, fast_forward

    flags = native_flags(args)
    sources = {"native": native.source_text()}
    if args.baseline:
        base = Path(args.baseline)
        sources["baseline"] = native.source_text(base) if base.is_dir() else base.read_text()
    t = time.perf_counter()
    libs = {name: native.load_build(flags, src, legacy=legacy_driver(src)) for name, src in sources.items()}
    counts = [int(n) for n in args.threads.split(",")]
    print(f"native library: {libs['native'].ln_vector_bytes() * 8}-bit vectors, loaded/built in "
          f"{time.perf_counter() - t:.2f} s, flags {' '.join(flags)}")

    dropout = args.variant in ("dropout", "both")
    bn = args.variant in ("batch_norm", "both")
    make = {"adam": lambda p: torch.optim.Adam(p, lr=1e-3, fused=True),
            "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, fused=True),
            "sgd": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)}[args.optimizer]
    n = 60_000
    data_x = torch.randn(n, 1, 28, 28)
    data_y = torch.randint(0, 10, (n,))
    order = torch.randperm(n)

    def batch(i):
        start = (i * args.batch) % (n - args.batch)
        idx = order[start:start + args.batch]  # a slice, as training passes it
        keep = torch.rand(args.batch, 120) >= 0.5 if dropout else None
        return idx, keep

    def model():
        torch.manual_seed(0)
        return LeNet5V1(dropout, bn)

    def native_path(lib, threads=1):
        m = model()
        trainer = native.NativeTrainer(m, make(m.parameters()), lib=lib, threads=threads)

        def run(idx, keep):
            trainer.train_step_indexed(data_x, data_y, idx, keep / 0.5 if keep is not None else None)
        return run

    def label(name: str, threads: int) -> str:
        return name if len(counts) == 1 or name == "baseline" else f"{name} x{threads}"

    versions = {label(name, count): (name, count) for name in libs
                for count in (counts if name == "native" else [1])}
    paths = {key: native_path(libs[name], count) for key, (name, count) in versions.items()}
    if not args.no_torch:
        m_torch = model()
        opt_torch = make(m_torch.parameters())
        paths["torch"] = lambda idx, keep: torch_step(m_torch, opt_torch, data_x[idx], data_y[idx], keep)
    # The FMA loop also takes its turn between the blocks: on a shared VM the peak the host gives
    # varies from second to second (on a Zen 3 VM, 2026-12-02: calls of 2 ms from 36 to 93
    # GFLOP/s, median 87), so each block's share is also taken against the loop's rate beside it.
    fma, lanes = fma_loop(flags)
    fma_iters = 1_000_000  # about 2 ms a call
    paths["fma loop"] = lambda idx, keep: fma(fma_iters)
    times = interleaved(paths, batch, args.rounds, args.block)
    fma_rates = [fma_gflop(lanes, fma_iters) / (ms / 1e3) for ms in times.pop("fma loop")]
    peak, bits = fma_peak_gflops(flags)
    print(f"FMA peak (register-only loop, {bits}-bit vectors): {peak:.1f} GFLOP/s; beside the blocks: "
          f"median {statistics.median(fma_rates):.1f} (min {min(fma_rates):.1f})")
    print(f"per batch-{args.batch} step, {args.variant} + {args.optimizer}, median of {args.rounds} blocks "
          f"of {args.block} (includes the batch gather and, for dropout, the mask draw):")
    for name, ms in times.items():
        share = FLOP_PER_STEP * args.batch / 64 / (statistics.median(ms) / 1e3) / 1e9 / peak
        beside = statistics.median(FLOP_PER_STEP * args.batch / 64 / (t / 1e3) / 1e9 / rate
                                   for t, rate in zip(ms, fma_rates))
        print(f"  {name:10s} {statistics.median(ms):7.3f} ms  (min {min(ms):.3f})  {share:6.1%} of FMA peak, "
              f"{beside:6.1%} of the loop's rate beside each block (median)")
    ref = label("native", counts[0])
    median = {name: statistics.median(ms) for name, ms in times.items()}
    for name in times:
        if name.startswith("native x") and name != ref:  # another thread count: its gain over the first
            print(f"  speed-up {name} over {ref}: {median[ref] / median[name]:.2f}x")
        elif name != ref:
            print(f"  speed-up {ref} over {name}: {median[name] / median[ref]:.2f}x")

    if not args.no_profile:
        prof_libs = {name: native.load_build((*flags, "-DLN_PROFILE"), src, f"{name}_prof",
                                             legacy=legacy_driver(src)) for name, src in sources.items()}
        prof_libs = {name: lib for name, lib in prof_libs.items() if hasattr(lib, "ln_profile")}
        prof_versions = {key: v for key, v in versions.items() if v[0] in prof_libs}
        # each version's own stage names (a baseline's may differ): rows by name, "-" where absent
        names = {key: prof_libs[name].ln_profile_names().decode().split(",")
                 for key, (name, _) in prof_versions.items()}
        stages = list(dict.fromkeys(stage for key in names for stage in names[key]))
        # the columns: each version's stage times, and for several threads its busiest thread's work
        columns = [*prof_versions, *(f"{key} busy" for key, (name, count) in prof_versions.items()
                                     if count > 1 and hasattr(prof_libs[name], "ln_profile_busy"))]
        per_block: dict[str, list[dict[str, float]]] = {key: [] for key in columns}
        prof_paths = {key: native_path(prof_libs[name], count)
                      for key, (name, count) in prof_versions.items()}
        out, busy = (ctypes.c_double * 64)(), (ctypes.c_double * (64 * 64))()
        for this_round in turns(prof_paths, args.rounds):  # not `order`: batch() reads that
            for key, run in this_round:
                lib, count = prof_libs[prof_versions[key][0]], prof_versions[key][1]
                lib.ln_profile(out)  # reset
                if f"{key} busy" in per_block:
                    lib.ln_profile_busy(busy, count)
                for s in range(args.block):
                    run(*batch(s))
                lib.ln_profile(out)
                per_block[key].append({stage: out[i] / args.block for i, stage in enumerate(names[key])})
                if f"{key} busy" in per_block:
                    stride = lib.ln_profile_busy(busy, count)
                    threads = min(count, 8)  # native_step.c's PROF_THREADS
                    per_block[f"{key} busy"].append(
                        {stage: max(busy[t * stride + i] for t in range(threads)) / args.block
                         for i, stage in enumerate(names[key])})
        stat = statistics.median if args.profile_stat == "median" else min
        width = max(22, *(len(stage) + 1 for stage in stages))
        print(f"per stage, us per step ({args.profile_stat} of {args.rounds} blocks, -DLN_PROFILE builds, "
              "thread 0's view; busy: the busiest thread's own work):")
        print("  " + f"{'stage':{width}s}" + "".join(f"{key:>16s}" for key in per_block))
        for stage in [*stages, "total", *(["sum of the stage minima"] if stat is min else [])]:
            row = []
            for blocks in per_block.values():
                if stage not in ("total", "sum of the stage minima") and stage not in blocks[0]:
                    row.append("-")
                    continue
                if stage == "sum of the stage minima":  # what a step takes with no stage interrupted
                    row.append(f"{sum(min(b[k] for b in blocks) for k in blocks[0]):.1f}")
                    continue
                vals = [sum(b.values()) if stage == "total" else b[stage] for b in blocks]
                row.append(f"{stat(vals):.1f}")
            print("  " + f"{stage:{width}s}" + "".join(f"{v:>16s}" for v in row))

    x = torch.randn(args.eval_images, 1, 28, 28)
    m_eval = model().eval()
    ev: dict[str, list[float]] = {**{f"native forward x{count}": [] for count in counts}, "fast_forward": []}
    with torch.inference_mode():
        for _ in range(5):
            for count in counts:
                t = time.perf_counter()
                a = native.forward(m_eval, x, threads=count)
                ev[f"native forward x{count}"].append(time.perf_counter() - t)
            t = time.perf_counter()
            b = fast_forward(m_eval, x)
            ev["fast_forward"].append(time.perf_counter() - t)
    print(f"eval forward of {args.eval_images} images (max |diff| {(a - b).abs().max().item():.2e}):")
    for name, s in ev.items():
        print(f"  {name:20s} {statistics.median(s) * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
