"""The native build's target flag, found by trying: a compiler's refusal leads to the next candidate.

Each test puts a compiler wrapper in CC, in front of the real one, that refuses some flags the
way Apple clang refuses -march=native on arm64 (its message, exit status 1), and logs every
command it is given; the builds go to a fresh cache folder.
"""

from __future__ import annotations

import io
import shlex
from contextlib import redirect_stderr

import pytest
from support import (
    parity,  # the parity tests' models, batches and element-by-element check
    rounding,
)

from lenetlab import native, trials
from lenetlab.recipes import RECIPES

APPLE = "clang: error: the clang compiler does not support '{}'"


def _wrapper(tmp_path, refuse: str, monkeypatch):
    """CC = a wrapper that refuses each flag matching the shell pattern refuse (all but
    --version for "*"), else runs the real compiler; returns its log (one line per command)."""
    real, log, cc = native.compiler(), tmp_path / "commands", tmp_path / "cc"
    cc.write_text(f'#!/bin/sh\n[ "$1" = --version ] && exec "{real}" "$@"\n'
                  f'echo "$*" >> "{log}"\n'
                  f'for a in "$@"; do case "$a" in {refuse}) echo "{APPLE}" | sed "s/{{}}/$a/" >&2; '
                  f'exit 1;; esac; done\nexec "{real}" "$@"\n')
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("LENETLAB_NATIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(native.EXTRA_FLAGS_ENV, raising=False)
    return log


def _commands(log) -> list[list[str]]:
    return [shlex.split(line) for line in log.read_text().splitlines()] if log.exists() else []


def _is_library(command: list[str]) -> bool:
    return any(arg.endswith("native_step.c") for arg in command)


def test_a_refused_flag_leads_to_the_next_candidate(tmp_path, monkeypatch):
    """-march=native refused: the next candidate (on x86-64 none: SSE2's 16-byte vectors)
    builds the library, which trains one step within the rounding bound, and the result's
    build record says which flag it was built with (none)."""
    if native.target_candidates() != native.TARGET_FLAGS["x86_64"]:
        pytest.skip("the candidates of x86-64; on this machine see the aarch64 order test")
    default = trials.trained_on("native")
    assert default.target == "-march=native" and ", -march=native" in default.build
    log = _wrapper(tmp_path, "-march=native", monkeypatch)
    lib = native.load()
    assert lib is not None, native.unavailable_reason()
    assert native.build_flags() == native.library_flags(())
    assert lib.ln_vector_bytes() == 16
    library = [c for c in _commands(log) if _is_library(c)]
    assert len(library) == 1 and "-march=native" not in library[0]  # refused by the probe, not the build
    variant = parity.ALL_ON_RELU_MAX
    model, opt = parity._fresh(variant, "adam")
    (x, y), = parity._random_batches(1, 64)
    scale = parity._mask(model, 64, 0)[1]
    want = rounding.step(model, opt, x, y, scale, variant.smoothing)
    native.NativeTrainer(model, opt, label_smoothing=variant.smoothing).train_step(x, y, scale)
    parity._within(parity._state(model, opt), want, "the step built without -march=native")
    record = trials.trained_on("native")
    assert record.target == "" and record.vector_bytes == 16 and record.compiler == native.compiler()
    assert record.build == f"native, 16-byte vectors, {native.compiler()}, no target flag"


def test_aarch64_tries_mcpu_then_march_then_none(tmp_path, monkeypatch):
    """On aarch64 (the machine's name as macOS and Linux give it): -mcpu=native, then
    -march=native, then none, each probed before any build of the library; refused both, the
    library is built with none."""
    log = _wrapper(tmp_path, "-mcpu=native|-march=native", monkeypatch)
    for name in ("aarch64", "arm64"):
        assert native.target_candidates(name) == (("-mcpu=native",), ("-march=native",), ())
    monkeypatch.setattr(native.toolchain.platform, "machine", lambda: "arm64")
    assert native.target_flags() == ()
    probes = [c for c in _commands(log) if not _is_library(c)]
    tried = [next((a for a in c if a.endswith("=native")), None) for c in probes]
    assert tried == ["-mcpu=native", "-march=native", None]


def test_a_compiler_that_refuses_everything_leaves_the_pytorch_path_with_one_notice(tmp_path, monkeypatch):
    log = _wrapper(tmp_path, "*", monkeypatch)
    assert native.load() is None and native.build_flags() is None
    reason = native.unavailable_reason()
    assert "does not support" in reason and "no target flag" in reason and "\n" not in reason
    assert not [c for c in _commands(log) if _is_library(c)]  # every candidate refused at its probe
    assert native.choose("auto", RECIPES["baseline"], "cpu") == "torch"
    err = io.StringIO()
    with redirect_stderr(err):
        native.announce("auto", "cpu", [(name, RECIPES[name]) for name in ("baseline", "tuned")])
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and "PyTorch's kernels" in lines[0] and "unavailable" in lines[0], lines
    assert trials.trained_on("torch").build == "torch"


def test_windows_looks_for_clang_never_cl(monkeypatch, tmp_path):
    """Without $CC, Windows takes clang from PATH and nothing else (cc, gcc and MSVC's cl are not
    looked for: cl has no vector extensions); elsewhere cc, then gcc."""
    found = {name: tmp_path / name for name in ("clang", "cc", "gcc", "cl")}
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(native.toolchain.shutil, "which",
                        lambda name: str(found[name]) if name in found else None)
    monkeypatch.setattr(native.toolchain.os, "name", "nt")
    assert native.compiler() == str(found["clang"])
    del found["clang"]
    assert native.compiler() is None
    monkeypatch.setattr(native.toolchain.os, "name", "posix")
    assert native.compiler() == str(found["cc"])
