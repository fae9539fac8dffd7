"""The native source's shape: every file in the unit and the wheel, short functions, one constants table."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO
from support import shape

from lenetlab import native

NATIVE = REPO / "src" / "lenetlab" / "native"


def test_no_function_is_over_its_limit():
    """No C function over 80 lines (signature to closing brace), no Python one in lenetlab/native
    over 60; the parser sees the functions it must (the entry points, the schedule, a kernel)."""
    assert shape.too_long() == []
    names = {name for path in NATIVE.glob("*.[ch]") for name, _, _ in shape.c_functions(path)}
    assert {"ln_train_step", "ln_forward", "ln_constants", "step_job", "conv_tile", "conv2_fwd"} <= names


def test_the_length_check_fails_a_long_function(tmp_path):
    body = "".join(f"    x += {i};\n" for i in range(79))
    (tmp_path / "long.c").write_text(f"static int long_one(int x)\n{{\n{body}    return x;\n}}\n")
    (tmp_path / "short.c").write_text("static int short_one(int x) { return x; }\n")
    (tmp_path / "long.py").write_text("def f():\n" + "    x = 1\n" * 60)
    assert shape.too_long(tmp_path) == ["long.c:1 long_one (83 lines, limit 80)",
                                        "long.py:1 f (61 lines, limit 60)"]


def test_the_root_includes_every_file_once():
    """lenet5.c includes every C file of the folder once, so the one text the cache keys on
    (source_text) holds every file."""
    files = {p.name for p in native.source.files()} - {native.ROOT}
    included = re.findall(r'^#include "([^"]+)"', (NATIVE / native.ROOT).read_text(), re.M)
    assert sorted(included) == sorted(files)
    text = native.source_text()
    for name in files:
        assert (NATIVE / name).read_text() in text, name
        assert f'#line 1 "{name}"' in text


def test_the_constants_are_the_librarys():
    """Python's constants are constants.h's, and the library reports the same (part of the stamp)."""
    lib = native.load()
    if lib is None:
        pytest.skip(f"no native library here: {native.unavailable_reason()}")
    constants = native.abi.CONSTANTS
    assert constants["OPT_SGD"] == 2 and constants["LN_MAX_THREADS"] == native.MAX_THREADS
    theirs = dict(item.split("=") for item in lib.ln_constants().decode().rstrip(",").split(","))
    assert {k: int(v) for k, v in theirs.items()} == native.abi.CONSTANTS


def test_a_library_with_other_constants_is_refused(tmp_path, monkeypatch):
    """A table changed on one side only (OPT_SGD renumbered in the C source) is a refusal naming
    it, never a call with the wrong code."""
    if native.load() is None:
        pytest.skip(f"no native library here: {native.unavailable_reason()}")
    monkeypatch.setenv("LENETLAB_NATIVE_CACHE", str(tmp_path))
    other = native.source_text().replace("X(OPT_SGD, 2)", "X(OPT_SGD, 5)")
    path = native.build(other, "other_constants", native.build_flags())
    import ctypes

    problem = native.abi.stamp_problem(ctypes.CDLL(str(path)))
    assert problem is not None and problem[0] == "differs" and "OPT_SGD=5" in problem[1], problem


def test_the_step_builds_from_an_installed_wheel(tmp_path):
    """The wheel ships every C file: installed into a folder of its own (not this checkout), it
    builds the library into an empty cache and trains a step."""
    if native.compiler() is None:
        pytest.skip("no C compiler")
    wheels, target, tree = tmp_path / "wheels", tmp_path / "site", tmp_path / "tree"
    # from a copy of what the wheel is built from: setuptools builds in the tree, and a stale build/
    # of the checkout's would hold files the source no longer has
    for part in ("src", "pyproject.toml", "README.md"):
        copy = shutil.copytree if (REPO / part).is_dir() else shutil.copy
        copy(REPO / part, tree / part, **({"ignore": shutil.ignore_patterns("*.egg-info", "__pycache__")}
                                           if (REPO / part).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(tree)], check=True, timeout=300, capture_output=True)
    (wheel,) = wheels.glob("lenetlab-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, timeout=300, capture_output=True)
    code = textwrap.dedent("""
        import json, torch
        from lenetlab import native
        from lenetlab.model import LeNet5V1
        lib = native.load()
        model = LeNet5V1(False, False, 0.0)
        trainer = native.NativeTrainer(model, torch.optim.Adam(model.parameters()), threads=1)
        x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
        trainer.train_step(x, y)
        print(json.dumps({"folder": str(native.FOLDER), "loaded": lib is not None,
                          "loss": trainer.take_totals()[0], "source": native.source_text()}))
    """)
    env = {**os.environ, "PYTHONPATH": str(target), "LENETLAB_NATIVE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(got["folder"]).is_relative_to(target) and got["loaded"]
    assert got["source"] == native.source_text() and 0 < got["loss"] < 1000
    assert list((tmp_path / "cache").glob("native_step-*.so"))
