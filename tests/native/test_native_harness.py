"""The native step's parity tests replayed through the C harness: on this host, and built for
aarch64 and run under qemu-aarch64, which proves the 128-bit NEON build on an x86 machine.

Each replay calls one of test_native's parity tests, with one of its own cases, with a
HarnessLib (tests/support/harness.py) as the native library: the same cases, the same float64
references computed here by the PyTorch path, the same rounding bounds (tests/support/rounding.py);
only the native calls run in the harness process. The harnesses:
- host: built with load()'s flags (native.build_flags(), as an executable), run natively;
- aarch64-gcc: Debian's aarch64-linux-gnu-gcc, static, under qemu-aarch64: every case of the
  one-step and forward tests (every variant, each optimiser), the others' where they reach code
  the rest do not (QEMU_CASES);
- aarch64-clang: clang --target=aarch64-linux-gnu, the one-step cases the x86 test runs on its
  other builds too (the original's variant with each optimiser, and ReLU with max pooling, on
  hard, soft and given targets), and mixing's bits.
The aarch64 builds take the target flag native.target_flags probes for their compiler, and
must be the NEON build (16-byte vectors). They carry the marker arm (python -m pytest -m arm
runs exactly them); where the cross compiler or qemu is missing, they skip saying which.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import os
import shutil
import subprocess

import pytest
import torch
from support import (
    harness,  # tests/support/harness.py
    parity,  # the x86 parity checks and their cases, replayed here
)

from lenetlab import native

QEMU = "qemu-aarch64"
# name: (compiler, the flags that make it build for aarch64, what installs it on Debian)
CROSS = {"aarch64-gcc": ("aarch64-linux-gnu-gcc", (), "gcc-aarch64-linux-gnu"),
         "aarch64-clang": ("clang", ("--target=aarch64-linux-gnu",), "clang gcc-aarch64-linux-gnu")}
HARNESSES = ["host", *CROSS]
# the x86 tests replayed; those without a build parameter use the library load() gives
REPLAYED = [parity.check_forward_matches_fast_forward, parity.check_one_step_matches_torch,
            parity.check_other_batch_sizes_match_torch, parity.check_max_pooling_ties_go_to_the_first,
            parity.check_augmenting_in_the_step_is_augmenting_before_it, parity.check_totals_match_torch,
            parity.check_bad_input_changes_nothing, parity.check_mixing_in_the_step_is_mixing_before_it,
            parity.check_one_step_on_soft_targets_matches_torch, parity.check_bad_mixing_changes_nothing,
            parity.check_one_step_on_given_targets_matches_torch, parity.check_bad_targets_change_nothing]
# Under qemu a batch-64 step takes 0.65 s of CPU (Zen 5, qemu 7.2): of these x86 tests' cases
# aarch64-gcc runs those that reach code the others do not, which keeps the arm tests to about
# 2.5 minutes (-m arm: 2 min 28 s of CPU, 195 s of wall time with the cores shared, load 2.4)
QEMU_CASES = {
    # padding lanes; three chunks, the last padded (the x86 test: 1, 48, 128 and 150 images)
    parity.check_other_batch_sizes_match_torch: lambda batch, variant: (batch, variant) in {
        (48, parity.ALL_ON), (150, parity.ALL_ON_RELU_MAX)},
    # erasing alone; the largest shift with flip and erasing (the x86 test adds a shift with flip
    # and one with erasing everything)
    parity.check_augmenting_in_the_step_is_augmenting_before_it: lambda aug: aug.translate in (0, 27),
    parity.check_totals_match_torch: lambda variant: variant.smoothing > 0,  # the smoothed loss
    # mixup and CutMix together, half the batches; the soft targets with every layer and smoothing
    parity.check_mixing_in_the_step_is_mixing_before_it: lambda mix: mix.mixup > 0 and mix.cutmix > 0,
    parity.check_one_step_on_soft_targets_matches_torch:
        lambda variant, optimizer: variant == parity.ALL_ON_RELU_MAX,
    # given targets (a teacher's, alone and beside mixing) with every layer and smoothing
    parity.check_one_step_on_given_targets_matches_torch:
        lambda variant, optimizer: variant == parity.ALL_ON_RELU_MAX,
}
# aarch64-clang: the one-step cases the x86 test runs on its other builds too
CLANG_TESTS = {parity.check_one_step_matches_torch, parity.check_one_step_on_soft_targets_matches_torch,
               parity.check_one_step_on_given_targets_matches_torch}
# ... and mixing's bits, which another compiler's contraction of a product into an FMA would
# move (aarch64-gcc's cases)
CLANG_QEMU_CASES = {parity.check_mixing_in_the_step_is_mixing_before_it}


class Unavailable(Exception):
    """What this machine lacks for a harness: the reason its tests skip."""


def _cross_flags(name: str) -> tuple[str, str, tuple[str, ...]]:
    """(compiler path, its target flag as probed, the harness's flags) of a cross build."""
    cc_name, extra, package = CROSS[name]
    cc = shutil.which(cc_name)
    if cc is None or shutil.which(QEMU) is None:
        missing = cc_name if cc is None else QEMU
        raise Unavailable(f"{missing} is not installed (Debian: apt-get install qemu-user {package})")
    target = native.target_flags("aarch64", cc, extra)
    if target is None:
        raise Unavailable(f"{cc} {' '.join(extra)} builds nothing for aarch64 here: "
                          f"{native.toolchain.refusal(cc, native.library_flags((), extra))}")
    return cc, " ".join(target), (*native.library_flags(target, extra), "-static")


def _make(name: str) -> harness.HarnessLib:
    if name == "host":
        return harness.HarnessLib((str(harness.build(native.build_flags())),))
    cc, _, flags = _cross_flags(name)
    try:
        exe = harness.build(flags, cc, f"native_harness_{name}")
    except native.NativeBuildError as exc:
        raise Unavailable(f"the harness does not build for aarch64 with {cc}: {exc}") from None
    return harness.HarnessLib((shutil.which(QEMU), str(exe)))


@pytest.fixture(scope="module")
def harnesses():
    """Every harness, built together (the compilers run in subprocesses): futures by name."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(HARNESSES)) as pool:
        yield {name: pool.submit(_make, name) for name in HARNESSES}


def _get(harnesses, name: str) -> harness.HarnessLib:
    try:
        return harnesses[name].result()
    except Unavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def built(request, harnesses):
    return _get(harnesses, request.param)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The torch references on one thread, as test_native computes them (its reason)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cases(test) -> tuple[list[dict], set[int]]:
    """The x86 test's own cases, as keyword arguments, and which of them it runs on its other
    builds too (none, for a test whose build is not among its parameters: aarch64-clang runs
    the cases that pick builds, to keep the time under qemu down)."""
    mark = next((m for m in getattr(test, "pytestmark", []) if m.name == "parametrize"), None)
    if mark is None:
        return [{}], set()
    names = mark.args[0].split(",") if isinstance(mark.args[0], str) else list(mark.args[0])
    names = [n.strip() for n in names]
    rows = [tuple(p.values) if hasattr(p, "values") else p if len(names) > 1 else (p,)
            for p in mark.args[1]]
    if "build" not in names:
        return [dict(zip(names, row)) for row in rows], set()
    at = names.index("build")
    strip = [(row[at], {n: v for n, v in zip(names, row) if n != "build"}) for row in rows]
    default = [kwargs for build, kwargs in strip if build == "default"]
    others = [kwargs for build, kwargs in strip if build != "default"]
    return default, {i for i, kwargs in enumerate(default) if kwargs in others}


def _params() -> list:
    params = []
    for test in REPLAYED:
        cases, everywhere = _cases(test)
        for name in HARNESSES:
            for i, kwargs in enumerate(cases):
                qemu_case = QEMU_CASES.get(test, lambda **_: True)(**kwargs)
                if name == "aarch64-clang" and not ((test in CLANG_TESTS and i in everywhere)
                                                    or (test in CLANG_QEMU_CASES and qemu_case)):
                    continue
                if name == "aarch64-gcc" and not qemu_case:
                    continue
                marks = [pytest.mark.arm] if name in CROSS else []
                case_id = "-".join(map(str, kwargs.values()))
                test_id = test.__name__.removeprefix("check_")
                params.append(pytest.param(name, test, kwargs, marks=marks,
                                           id="-".join(filter(None, (test_id, name, case_id)))))
    return params


@pytest.mark.parametrize(("built", "test", "kwargs"), _params(), indirect=["built"])
def test_replayed(built, test, kwargs, monkeypatch):
    """The x86 parity test's case with the harness as the native library: passed as its build
    where it takes one, and as what native.load() gives for its own NativeTrainers."""
    monkeypatch.setattr(native.library, "load", lambda: built)
    if "build" in inspect.signature(test).parameters:
        kwargs = {**kwargs, "build": built}
    test(**kwargs)


def _macros(cc: str, flags: tuple[str, ...]) -> set[str]:
    done = subprocess.run([cc, *flags, "-dM", "-E", "-x", "c", os.devnull], capture_output=True,
                          text=True, timeout=60, check=True)
    return {line.split()[1] for line in done.stdout.splitlines() if line.startswith("#define ")}


@pytest.mark.arm
@pytest.mark.parametrize("name", list(CROSS))
def test_the_aarch64_build_is_the_neon_one(harnesses, name):
    """What the native source's #if reads from the cross compiler's macros (no __AVX__ or
    __AVX512F__: 16-byte vectors; __ARM_NEON: as NEON registers), and what the build itself
    reports under qemu: the 128-bit NEON code, with the target flag the probe chose."""
    lib = _get(harnesses, name)
    cc, target, flags = _cross_flags(name)
    macros = _macros(cc, tuple(f for f in flags if f not in native.LIBRARY_FLAGS))
    assert {"__aarch64__", "__ARM_NEON", "__ARM_FEATURE_FMA"} <= macros, sorted(macros)
    assert not macros & {"__AVX__", "__AVX512F__", "__SSE__"}
    assert lib.ln_vector_bytes() == 16
    if name == "aarch64-gcc":  # a cross compiler cannot name the host CPU: the probe walks down to none
        assert target == "" and all(native.toolchain.refusal(cc, native.library_flags(t, ()))
                                    for t in native.target_candidates("aarch64")[:-1])


def test_the_host_harness_is_the_library(harnesses, tmp_path):
    """The host harness replays a recorded step --steps 3 times and ends with the very bits
    the library gives for three steps in this process (the same source and flags), and harness.py's
    case command writes a case the harness runs."""
    lib = _get(harnesses, "host")
    assert lib.ln_vector_bytes() == native.load().ln_vector_bytes()
    variant = parity.ALL_ON_RELU_MAX
    (x, y), = parity._random_batches(1, 100)  # two chunks, the second padded
    scale = parity._mask(parity._fresh(variant, "adam")[0], 100, 0)[1]
    case, out, after = tmp_path / "step.case", tmp_path / "step.out", tmp_path / "after.case"
    recorded = native.NativeTrainer(*parity._fresh(variant, "adam"), label_smoothing=variant.smoothing,
                                    lib=harness._Recorder(lib.command, case))
    recorded.train_step(x, y, scale)
    assert harness.read(case, "lncase")[0] == "step"
    subprocess.run([*lib.command, str(case), str(out), "--steps", "3"], check=True, timeout=120)
    rc, entries = harness.read(out, "lnout")
    model, opt = parity._fresh(variant, "adam")
    trainer = native.NativeTrainer(model, opt, label_smoothing=variant.smoothing)
    for _ in range(3):
        trainer.train_step(x, y, scale)
    # the state the library reached, as the entries of a case recorded from it
    native.NativeTrainer(model, opt, lib=harness._Recorder(lib.command, after)).train_step(x, y, scale)
    after = harness.read(after, "lncase")[1]
    assert rc == 0 and entries.keys() - {"totals"} <= after.keys()
    assert all((entries[k] == after[k]).all() for k in entries if k != "totals"), [
        k for k in entries if k != "totals" and not (entries[k] == after[k]).all()]
    assert tuple(entries["totals"]) == trainer.take_totals()
    assert harness.main(["case", str(tmp_path / "baseline.case")]) == 0
    done = subprocess.run([*lib.command, str(tmp_path / "baseline.case"), str(out), "--steps", "2"],
                          capture_output=True, timeout=120)
    assert done.returncode == 0 and harness.read(out, "lnout")[0] == 0, done.stderr


def test_a_case_the_harness_cannot_read_is_one_line(harnesses, tmp_path):
    """A damaged case file: the harness names what is wrong in one line and exits 2."""
    lib = _get(harnesses, "host")
    bad = tmp_path / "bad.case"
    for text, words in ((b"lncase 1 step\nlr f64 1\n\x00", "ends inside"),
                        (b"lncase 1 step\nno_such f64 1\n" + bytes(8), "no_such"),
                        (b"lncase 1 step\nlr f32 1\n" + bytes(4), "type"),
                        (b"something else\n", "case file")):
        bad.write_bytes(text)
        done = subprocess.run([*lib.command, str(bad), str(tmp_path / "out")], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2 and words in done.stderr and len(done.stderr.splitlines()) == 1, done


def test_cases_are_read_back_as_written(tmp_path):
    """harness.read gives back what write_case wrote, and refuses a file of the other kind."""
    path = tmp_path / "x.case"
    path.write_bytes(b"lncase 1 forward\nx f32 2\n" + torch.tensor([1.5, -2.0]).numpy().tobytes())
    entry, entries = harness.read(path, "lncase")
    assert entry == "forward" and entries["x"].tolist() == [1.5, -2.0]
    with pytest.raises(ValueError, match="lnout"):
        harness.read(path, "lnout")
