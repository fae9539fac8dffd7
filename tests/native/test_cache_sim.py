"""benchmarks/cache_sim.py's parts that run quickly: its C driver, and its refusal without valgrind.

The simulation itself (cachegrind, about a minute per version) is not run here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO
from support.legacy import BEFORE_THREADS

from lenetlab import native

CC = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _driver(tmp_path, source: str, name: str) -> str:
    """cache_driver.c built around this native_step.c source; its path."""
    step, exe = tmp_path / f"{name}.c", tmp_path / name
    step.write_text(source)
    legacy = ["-DLN_LEGACY"] if "LN_ARGS" not in source else []
    subprocess.run([CC, "-O2", "-std=gnu11", "-pthread", *legacy, f'-DSTEP_SOURCE="{step}"', "-o", str(exe),
                    str(REPO / "benchmarks" / "cache_driver.c"), "-lm"], check=True, timeout=300)
    return str(exe)


@pytest.mark.skipif(CC is None, reason="no C compiler (set CC, or install cc/gcc)")
def test_driver_runs_the_step_as_before(tmp_path):
    """The driver's steps give the same loss totals on 1 and 3 threads, and the same as e056921's
    step called through its positional interface: it runs the step the library runs."""
    after = _driver(tmp_path, native.source_text(), "after")
    runs = [subprocess.run([after, "5", str(threads)], capture_output=True, text=True, check=True).stdout
            for threads in (1, 3)]
    assert runs[0].startswith("steps 5 loss ") and runs[0] == runs[1]
    before = _driver(tmp_path, BEFORE_THREADS.read_text(), "before")
    assert subprocess.run([before, "5"], capture_output=True, text=True, check=True).stdout == runs[0]


def test_without_valgrind_it_says_so_and_exits_2(tmp_path):
    bare = {**os.environ, "PATH": str(tmp_path)}  # an empty folder: no valgrind, whatever is installed
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cache_sim.py"), "--steps", "1"],
                          capture_output=True, text=True, env=bare, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cache_sim.py: valgrind is not installed")
