"""Do test_native's rounding bounds still catch real bugs? Runs it against mutants of the native C source.

    python tests/native/mutants.py                      # every mutant, all of test_native.py each
    python tests/native/mutants.py dropout-unscaled     # one (or a few) by name
    python tests/native/mutants.py -k one_step          # only the tests pytest -k selects

Each mutant is one text substitution in one C file of src/lenetlab/native/, a bug of the kind
the parity tests exist for. The package is copied to a temporary folder with the mutant source
and test_native.py runs on it (PYTHONPATH; the build cache keys builds by their source, so
mutants never mix with the real one). A mutant must fail at least one test; the script prints,
per mutant, each test function that failed, how many of its cases, and the first one's assertion
(the tensor, |diff| and bound); it exits 1 if any mutant passes every test. About a minute per
mutant.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "src" / "lenetlab"
FOLDER = PACKAGE / "native"

# name: (the C file, text in it, its replacement, the bug)
MUTANTS = {
    "conv1-channel-sign": (  # ic is 1 in conv1 only: conv_wgrad_sum is conv2's too
        "conv.c", "dw[i] += hsum(pw[i]);",
        "dw[i] += ic == 1 && o == 1 ? -hsum(pw[i]) : hsum(pw[i]);",
        "the weight gradient of conv1's output channel 1 with its sign flipped"),
    "bn-mean-padded-lanes": (
        "batchnorm.c", "a[q] += d;",
        "a[q] += LD(row + (size_t)(x * NV + v + q) * VW) - k;",
        "batch norm's mean summed over the padding lanes of a short batch too (the variance still masked)"),
    "bn-variance-unshifted": (
        "batchnorm.c", "K[o] = (float)s;",
        "K[o] = 0.f * (float)s;",
        "batch norm's variances from unshifted sums, which cancel where a map's mean is large"),
    "adam-bias-correction-step": (
        "optim.c", "const double bc1 = 1.0 - pow(b1, step), bc2_sqrt = sqrt(1.0 - pow(b2, step));",
        "const double bc1 = 1.0 - pow(b1, step + 1), bc2_sqrt = sqrt(1.0 - pow(b2, step + 1));",
        "Adam's bias corrections computed for the step after this one"),
    "dropout-unscaled": (
        "step.c", "c->drop[o * BATCH + b] = b < c->n ? A->drop[((int64_t)k * BATCH + b) * F1 + o] : 0.f;",
        "c->drop[o * BATCH + b] = b < c->n\n"
        "                    ? (float)(A->drop[((int64_t)k * BATCH + b) * F1 + o] != 0.f) : 0.f;",
        "dropout's mask applied without the 1 / (1 - p) scale, forward and backward"),
    "mix-fused": (
        "mix.c", '__asm__("" : "+m"(p));', "",
        "mixup's blend with its products fused into FMAs (rounded once, where torch rounds each product)"),
    "mix-partner-unaugmented": (
        "augment_pack.c", "load_image(aug, p, src + (idx ? idx[p] : p) * IMGPIX, other);",
        "load_image(NULL, p, src + (idx ? idx[p] : p) * IMGPIX, other);",
        "the partner's pixels mixed in as they are, not augmented as its own image is"),
    "cutmix-box-narrow": (
        "mix.c", "sizeof(float) * (size_t)(b[3] - b[2])", "sizeof(float) * (size_t)(b[3] - b[2] - 1)",
        "CutMix's box pasted one column short"),
    "soft-target-partner-label": (
        "step.c", "partners[b] = A->y[A->idx ? A->idx[p] : p];", "partners[b] = labels[b];",
        "the soft target's second label the image's own, not its partner's"),
    "soft-target-weights-swapped": (
        "loss.c", "w2 = (1.0 - smoothing) * (1.0 - lam[b]);", "w2 = (1.0 - smoothing) * lam[b];",
        "the partner's label weighted lam, not 1 - lam, in the loss and its gradient"),
    "given-targets-ignored": (
        "step.c", "A->targets ? A->targets + (int64_t)k * BATCH * F3 : NULL", "NULL",
        "the given soft targets ignored: the loss on the labels' (or mixing's) targets"),
    "given-targets-first-chunk": (
        "step.c", "A->targets + (int64_t)k * BATCH * F3 : NULL", "A->targets : NULL",
        "every chunk's loss on the first chunk's rows of the given targets"),
    "given-targets-unsmoothed": (
        "loss.c", "const double w = (1.0 - smoothing) * targets[b * F3 + k];",
        "const double w = targets[b * F3 + k];",
        "the given targets not scaled by 1 - eps under label smoothing (eps / 10 still added)"),
    "given-targets-sum-one": (
        "loss.c", "const double more = (1.0 - smoothing) * (tsum - 1.0) * inv_b;", "const double more = 0.0;",
        "the gradient on given targets taking each row's sum as 1, where torch multiplies softmax by it"),
    "given-targets-unchecked": (
        "step.c", "return LN_BAD_TARGET;", "break;",
        "a given target outside [0, 1] or NaN not refused: the step trains on it"),
    "given-targets-nan-accepted": (
        "step.c", "if (!(a->targets[i] >= 0.f && a->targets[i] <= 1.f)) /* NaN fails too */",
        "if (a->targets[i] < 0.f || a->targets[i] > 1.f)",
        "a NaN given target not refused (the range test written so that NaN passes it)"),
}


def mutant_source(name: str) -> str:
    """The text of the mutant's C file with its bug planted."""
    file, old, new, _ = MUTANTS[name]
    text = (FOLDER / file).read_text()
    if text.count(old) != 1:
        raise SystemExit(f"{name}: the text to mutate occurs {text.count(old)} times in {FOLDER / file} "
                         "(the source changed: update MUTANTS)")
    return text.replace(old, new)


def run(name: str, select: str | None) -> tuple[int, dict[str, list[str]], str]:
    """test_native.py on the mutant: (pytest's exit status, {test function: its failures, each
    "[id] message"}, pytest's closing line)."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{name}-") as tmp:
        package = Path(tmp) / "src" / "lenetlab"
        shutil.copytree(PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
        (package / "native" / MUTANTS[name][0]).write_text(mutant_source(name))
        env = {**os.environ, "PYTHONPATH": str(package.parent), "COLUMNS": "400"}  # uncropped summaries
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", "--tb=no",
                   str(REPO / "tests" / "native" / "test_native.py")]
        if select:
            command += ["-k", select]
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    lines = done.stdout.splitlines()
    failed: dict[str, list[str]] = {}
    for line in lines:  # -rf: "FAILED tests/test_native.py::test_name[id] - AssertionError: message"
        match = re.match(r"FAILED \S+::(\w+)(\[[^\]]*\])?(?: - (.*))?", line)
        if match:
            failed.setdefault(match[1], []).append(f"{match[2] or ''} {match[3] or ''}".strip())
    counts = [line.strip("= ") for line in lines if re.search(r"\d+ (passed|failed|error)", line)]
    closing = counts[-1] if counts else (done.stdout + done.stderr).strip()[-300:]
    return done.returncode, failed, closing


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", metavar="MUTANT",
                    help=f"mutants to run (default: all): {', '.join(MUTANTS)}")
    ap.add_argument("-k", dest="select", help="pytest -k expression: only these tests")
    args = ap.parse_args()
    unknown = set(args.names) - set(MUTANTS)
    if unknown:
        ap.error(f"no mutant {', '.join(sorted(unknown))} (there are {', '.join(MUTANTS)})")
    survivors = []
    for name in args.names or MUTANTS:
        code, failed, closing = run(name, args.select)
        caught = code == 1 and bool(failed)  # 1: tests failed (not a crash, nor no tests collected)
        verdict = "caught" if caught else f"NOT CAUGHT (exit {code})"
        print(f"{name}: {MUTANTS[name][3]}\n  {verdict}: {closing}")
        for test, failures in failed.items():
            print(f"  {test}: {len(failures)} failed, first {failures[0][:300]}")
        if not caught:
            survivors.append(name)
    if survivors:
        print(f"survived: {', '.join(survivors)}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
