"""The native library's cache: a library is loaded only if it is what the build wrote.

Each case puts something into a fresh cache folder where the library belongs (a truncated or
garbage file, another valid shared object, a library from another version of the argument
record) and loads in a subprocess: the process must not crash, must end on the native library,
and the file must then be a fresh build of this source. The builds here use -O0 (quick to
compile; nothing here runs a step), from a pristine build copied into each folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lenetlab import native

if native.load() is None:
    pytest.skip(f"the native step cannot be built here: {native.unavailable_reason()}",
                allow_module_level=True)

SRC = Path(__file__).resolve().parents[2] / "src"
EXTRA = "-O0"  # LENETLAB_NATIVE_CFLAGS_EXTRA of every build here
FLAGS = native.library_flags(native.target_flags(extra=(EXTRA,)), (EXTRA,))

# load() in a fresh process: what it loaded (or why not) and the stamp of what it loaded
LOAD = textwrap.dedent("""
    import json
    from lenetlab import native
    lib = native.load()
    print(json.dumps({"loaded": lib is not None, "reason": native.unavailable_reason(),
                      "abi": lib.ln_abi() if lib is not None else None,
                      "vector_bytes": lib.ln_vector_bytes() if lib is not None else None}))
""")


def _env(cache: Path, **extra) -> dict:
    env = {**os.environ, "LENETLAB_NATIVE_CACHE": str(cache), native.EXTRA_FLAGS_ENV: EXTRA,
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return {**env, **extra}


def _load_in_subprocess(cache: Path, code: str = LOAD, **extra) -> dict:
    done = subprocess.run([sys.executable, "-c", code], env=_env(cache, **extra), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"the loading process ended with {done.returncode}: {done.stderr[-2000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A cache folder holding this source's library (and its checksum), built once."""
    folder = tmp_path_factory.mktemp("pristine")
    old = os.environ.get("LENETLAB_NATIVE_CACHE")
    os.environ["LENETLAB_NATIVE_CACHE"] = str(folder)
    try:
        native.build(native.source_text(), "native_step", FLAGS)
    finally:
        if old is None:
            del os.environ["LENETLAB_NATIVE_CACHE"]
        else:
            os.environ["LENETLAB_NATIVE_CACHE"] = old
    return folder


@pytest.fixture()
def cache(pristine, tmp_path, monkeypatch) -> Path:
    """A copy of the pristine cache, which this process's native.build also uses."""
    folder = tmp_path / "cache"
    shutil.copytree(pristine, folder)
    monkeypatch.setenv("LENETLAB_NATIVE_CACHE", str(folder))
    return folder


def _library(folder: Path) -> Path:
    (path,) = folder.glob("native_step-*.so")
    return path


def _other_build(source_text: str, name: str) -> Path:
    """A library built from another source, with its own checksum beside it (in this process's cache)."""
    return native.build(source_text, name, FLAGS)


def _assert_rebuilt(path: Path, before: bytes) -> None:
    after = path.read_bytes()
    assert after != before, "the bad library is still there"
    assert native.cache.verified(path) is not None, "the library in the cache is not the one its build wrote"


def _put(path: Path, data: bytes, checksum_too: bool = False) -> None:
    path.write_bytes(data)
    if checksum_too:  # as if the build had written it: only the stamp can tell
        import hashlib

        native.cache.checksum_path(path).write_text(hashlib.sha256(data).hexdigest() + "\n")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "no checksum"])
def test_a_damaged_library_is_rebuilt_not_loaded(cache, damage):
    path = _library(cache)
    good = path.read_bytes()
    if damage == "truncated":
        _put(path, good[:len(good) // 3])
    elif damage == "garbage":
        _put(path, good[:64] + os.urandom(len(good) - 64))  # an ELF header, then noise
    elif damage == "empty":
        _put(path, b"")
    else:  # a library from a lenetlab that wrote no checksum
        native.cache.checksum_path(path).unlink()
    before = path.read_bytes()
    got = _load_in_subprocess(cache)
    assert got["loaded"] and got["abi"] == native.ABI, got
    if damage == "no checksum":
        assert native.cache.verified(path) is not None
    else:
        _assert_rebuilt(path, before)


@pytest.mark.parametrize("checksum_too", [False, True], ids=["checksum-stale", "checksum-matching"])
def test_another_valid_library_in_its_place_is_rebuilt(cache, checksum_too):
    """Another shared object under the library's name: refused by its checksum, or (when its
    checksum was rewritten to match) by its missing stamp, closed uncalled, and rebuilt."""
    path = _library(cache)
    impostor = _other_build("int ln_vector_bytes(void) { return 3; }\n", "impostor").read_bytes()
    _put(path, impostor, checksum_too)
    got = _load_in_subprocess(cache)
    assert got["loaded"] and got["abi"] == native.ABI and got["vector_bytes"] != 3, got
    _assert_rebuilt(path, impostor)


@pytest.mark.parametrize("change", ["abi", "fields swapped"])
def test_a_library_of_another_record_is_rebuilt(cache, change):
    """A library from another version of the argument record (with a checksum that matches:
    only the stamp tells) is refused at load, closed uncalled, and rebuilt from this source."""
    src = native.source_text()
    if change == "abi":
        other = src.replace("#define LN_ABI 1\n", "#define LN_ABI 999\n")
    else:  # two fields of one type swapped: the same size, another layout
        swaps = [("X(double, lr)", "X(double, swapped)"), ("X(double, beta1)", "X(double, lr)"),
                 ("X(double, swapped)", "X(double, beta1)")]
        other = src
        for old, new in swaps:
            other = other.replace(old, new)
    assert other != src
    path = _library(cache)
    stale = _other_build(other, "stale").read_bytes()
    _put(path, stale, checksum_too=True)
    got = _load_in_subprocess(cache)
    assert got["loaded"] and got["abi"] == native.ABI, got
    _assert_rebuilt(path, stale)


def test_the_stamp_check_names_what_differs(cache):
    """The refusal says what differs; a rebuilt library that still differs is reported, not called."""
    code = LOAD.replace("from lenetlab import native\n",
                        "from lenetlab import native\nnative.abi.ABI = 999  # as if Python and C disagreed\n")
    got = _load_in_subprocess(cache, code)
    assert not got["loaded"]
    assert "rebuilt and still cannot be used" in got["reason"] and "version 1" in got["reason"], got


def test_two_processes_building_at_once_both_end_native(tmp_path):
    """Two processes loading into an empty cache at the same moment: one compiles, the other
    waits on the build lock and then loads what the first built (a compiler wrapper counts the
    compilations: without the lock both would compile)."""
    cc = native.compiler()
    log, wrapper, cache, go = tmp_path / "compilations", tmp_path / "cc", tmp_path / "cache", tmp_path / "go"
    # counts the library's compilations (not --version, nor the target flag's probe)
    wrapper.write_text(f'#!/bin/sh\ncase "$*" in *native_step.c*) echo x >> "{log}" ;; esac\n'
                       f'exec "{cc}" "$@"\n')
    wrapper.chmod(0o755)
    # both processes past their imports, then released together
    wait = (f"import os, time\nprint('ready', flush=True)\n"
            f"while not os.path.exists({str(go)!r}): time.sleep(0.005)\n")
    code = LOAD.replace("lib = native.load()\n", wait + "lib = native.load()\n")
    env = _env(cache, CC=str(wrapper))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()[-2000:]
        go.touch()
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        got = json.loads(out.strip().splitlines()[-1])
        assert got["loaded"] and got["abi"] == native.ABI, got
    assert log.read_text().count("x") == 1, "both processes compiled: the second did not wait for the first"
    assert native.cache.verified(_library(cache)) is not None
