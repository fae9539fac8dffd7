"""Cache misses per training step of the 256-bit native step, simulated by cachegrind, before and after.

Host-independent: valgrind's cachegrind simulates a 32 KB 8-way L1 (data and instructions) and
a 512 KB 8-way last level (Zen 2/3's L2) whatever this machine has, and counts each miss. Both
versions of the step's source are built with -march=x86-64-v3 -mtune=generic (AVX2 and FMA:
valgrind has no AVX-512) into benchmarks/cache_driver.c, a plain C process that runs STEPS
batch-64 baseline steps on one thread. A step's misses are the difference between a run of
1 + STEPS steps and a run of 1 (the set-up and the first, cold step), divided by STEPS.

BEFORE is main e056921's native_step.c (before the argument record and the threads), checked
in as tests/fixtures/native_step_e056921.c and driven through its own positional entry point
(or --before FILE). AFTER is this checkout's src/lenetlab/native/ (its files as one text,
lenetlab.native.source_text()). --reference FILE adds another version (one C file) between
them. The last line is

    LL misses per step: BEFORE -> AFTER (ratio R)

    python benchmarks/cache_sim.py                   # ~1 minute
    python benchmarks/cache_sim.py --reference old_native_step.c --annotate 12

Needs valgrind (Debian: apt-get install valgrind) and a C compiler on an x86-64 host; where one
is missing it says so in one line and exits 2.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "benchmarks" / "cache_driver.c"
AFTER = ROOT / "src" / "lenetlab" / "native"
BEFORE = ROOT / "tests" / "fixtures" / "native_step_e056921.c"
# native.COMMON_FLAGS with a fixed 256-bit target in place of -march=native (and -g, which does
# not change GCC's code, for --annotate's line numbers); an executable, not a shared library
FLAGS = ("-O3", "-march=x86-64-v3", "-mtune=generic", "-std=gnu11", "-fno-math-errno", "-fno-trapping-math",
         "-ffp-contract=fast", "-pthread", "-g")
L1, LL = "32768,8", "524288,8"  # bytes,ways: Zen 2/3's L1 data cache and L2


class Unavailable(Exception):
    """Something the simulation needs is missing: one line, exit status 2."""


@dataclass
class Counts:
    """cachegrind's totals for one run (events Ir, I1mr, ILmr, Dr, D1mr, DLmr, Dw, D1mw, DLmw)."""

    instructions: float
    d1_misses: float
    ll_misses: float

    def __sub__(self, other: Counts) -> Counts:
        return Counts(self.instructions - other.instructions, self.d1_misses - other.d1_misses,
                      self.ll_misses - other.ll_misses)

    def per(self, steps: int) -> Counts:
        return Counts(self.instructions / steps, self.d1_misses / steps, self.ll_misses / steps)


def read_source(path: Path) -> str:
    """One C file's text, or a split source folder's files as one text (its lenet5.c root expanded)."""
    if path.is_dir():
        sys.path.insert(0, str(ROOT / "src"))
        from lenetlab.native.source import source_text

        return source_text(path)
    if not path.is_file():
        raise Unavailable(f"{path} is not a file")
    return path.read_text()


def compile_driver(cc: str, source: str, out: Path) -> Path:
    """The driver built around source; a source without the argument record is driven by position."""
    step = out.with_suffix(".c")
    step.write_text(source)
    legacy = ("-DLN_LEGACY",) if "LN_ARGS" not in source else ()
    command = [cc, *FLAGS, *legacy, f'-DSTEP_SOURCE="{step}"', "-o", str(out), str(DRIVER), "-lm"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise Unavailable(f"{cc} could not build {out.name}: {tail(done.stderr)}")
    return out


def tail(text: str) -> str:
    return " | ".join(text.strip().splitlines()[-3:])


def caches(l1: str, ll: str) -> tuple[str, ...]:
    return (f"--I1={L1},64", f"--D1={l1},64", f"--LL={ll},64")


def cachegrind(exe: Path, steps: int, out: Path, geometry: tuple[str, ...]) -> Counts:
    done = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=yes", *geometry,
                           f"--cachegrind-out-file={out}", str(exe), str(steps), "1"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise Unavailable(f"valgrind failed on {exe.name}: {tail(done.stderr)}")
    text = out.read_text()
    events = re.search(r"^events: (.*)$", text, re.M).group(1).split()
    totals = dict(zip(events, map(float, re.search(r"^summary: (.*)$", text, re.M).group(1).split())))
    return Counts(totals["Ir"], totals["D1mr"] + totals["D1mw"],
                  totals["ILmr"] + totals["DLmr"] + totals["DLmw"])


def by_line(out: Path) -> Counter:
    """LL misses by (function, file, line) in a cachegrind output file (code inlined from
    elsewhere counts at its own source line, under the function it was inlined into)."""
    table: Counter = Counter()
    events, fn, fl = [], "", ""
    for line in out.read_text().splitlines():
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith(("fl=", "fi=", "fe=")):
            fl = line[3:]
        elif line.startswith("fn="):
            fn = line[3:]
        elif line[:1].isdigit():
            number, *values = line.split()
            counts = dict(zip(events, map(int, values)))
            table[fn, fl, int(number)] += sum(counts.get(e, 0) for e in ("ILmr", "DLmr", "DLmw"))
    return table


def annotate(warm: Path, full: Path, steps: int, lines: int) -> None:
    """The `lines` source lines with the most LL misses per step (a run of 1 + steps less a run of 1)."""
    table = by_line(full)
    table.subtract(by_line(warm))
    for (fn, fl, number), misses in table.most_common(lines):
        text = Path(fl).read_text().splitlines()[number - 1].strip() if Path(fl).is_file() else ""
        print(f"    {misses / steps:9,.0f}  {fn[:28]:28s} {Path(fl).name}:{number}  {text[:70]}")


def check_host() -> str:
    if shutil.which("valgrind") is None:
        raise Unavailable("valgrind is not installed (Debian: apt-get install valgrind)")
    if platform.machine() not in ("x86_64", "AMD64"):
        raise Unavailable(f"the 256-bit x86-64 build cannot run on this {platform.machine()} host")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None or shutil.which(cc) is None:
        raise Unavailable("no C compiler (set CC, or install cc/gcc)")
    return cc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="steps measured after the first (default 10)")
    ap.add_argument("--before", type=Path, metavar="SOURCE",
                    help=f"BEFORE's source (default: {BEFORE.relative_to(ROOT)})")
    ap.add_argument("--reference", action="append", default=[], metavar="SOURCE",
                    help="also measure this version (a C file or a split source folder; repeatable)")
    ap.add_argument("--l1", default=L1, metavar="BYTES,WAYS",
                    help=f"the simulated L1 data cache (default {L1}; Zen 5's is 49152,12)")
    ap.add_argument("--ll", default=LL, metavar="BYTES,WAYS",
                    help=f"the simulated last level (default {LL}; Zen 5's L2 is 1048576,16)")
    ap.add_argument("--annotate", type=int, default=0, metavar="N",
                    help="print the N source lines with the most LL misses per step in each version")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    for option, value in (("--l1", args.l1), ("--ll", args.ll)):
        if not re.fullmatch(r"\d+,\d+", value):
            ap.error(f"{option} must be BYTES,WAYS, got {value!r}")
    try:
        cc = check_host()
        sources = {"BEFORE": read_source(args.before or BEFORE),
                   **{str(ref): read_source(Path(ref)) for ref in args.reference},
                   "AFTER": read_source(AFTER)}
        results = {}
        with tempfile.TemporaryDirectory(prefix="cache_sim-") as tmp:
            geometry = caches(args.l1, args.ll)
            print(f"cachegrind, {' '.join(geometry)}; {cc} {' '.join(FLAGS)}; one thread, batch-64 baseline "
                  f"steps (tanh, average pooling, Adam); per step over {args.steps} steps after the first")
            for name, source in sources.items():
                exe = compile_driver(cc, source, Path(tmp) / re.sub(r"\W", "_", name))
                warm_out, full_out = Path(tmp) / f"{exe.name}.1.out", Path(tmp) / f"{exe.name}.n.out"
                warm = cachegrind(exe, 1, warm_out, geometry)
                results[name] = (cachegrind(exe, 1 + args.steps, full_out, geometry) - warm).per(args.steps)
                r = results[name]
                label = f"{name} ({args.before or BEFORE.name})" if name == "BEFORE" else name
                print(f"  {label:24s} LL misses {r.ll_misses:10,.0f}   D1 misses {r.d1_misses:10,.0f}   "
                      f"instructions {r.instructions:12,.0f}")
                if args.annotate:
                    annotate(warm_out, full_out, args.steps, args.annotate)
    except Unavailable as exc:
        print(f"cache_sim.py: {exc}", file=sys.stderr)
        return 2
    before, after = results["BEFORE"].ll_misses, results["AFTER"].ll_misses
    print(f"LL misses per step: {before:,.0f} -> {after:,.0f} (ratio {after / before:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
