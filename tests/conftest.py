"""Shared fixtures and helpers: the real Fashion-MNIST folder, tiny IDX files, a small split
set, and the two ways of running the command (in-process, or as a process for signals)."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# The kernels the tests that train ask for: $LENETLAB_KERNELS, which subprocesses and in-process
# `cli.main` calls read too.
KERNELS = os.environ.get("LENETLAB_KERNELS", "auto")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Train and evaluate in this process on one thread, as each worker of a run does: two
    threads on a busy two-core machine wait for each other at every step."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def real_data_dir() -> Path | None:
    for candidate in (os.environ.get("LENETLAB_DATA"), REPO.parent / "shared/data/fashion-mnist"):
        if candidate and (Path(candidate) / "train-images-idx3-ubyte.gz").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    found = real_data_dir()
    if found is None:
        pytest.skip("the real Fashion-MNIST is not here: set LENETLAB_DATA")
    return found


@pytest.fixture(scope="session")
def dataset(data_dir):
    from lenetlab.data import load_fashion_mnist

    return load_fashion_mnist(data_dir, download=False)


@pytest.fixture(scope="session")
def small_splits(dataset):
    """The real splits with 3,000 training images: about a second per epoch."""
    from lenetlab.data import make_splits

    return make_splits(dataset, split_seed=0, train_subset=3000)


def write_idx(path: Path, array: np.ndarray, magic: int | None = None, compress: bool = True,
              cut: int = 0) -> Path:
    """Write an IDX file (gzip-compressed by default); cut drops that many bytes off the end."""
    magic = magic if magic is not None else (2051 if array.ndim == 3 else 2049)
    raw = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw += array.astype(np.uint8).tobytes()
    if cut:
        raw = raw[:-cut]
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


@pytest.fixture
def tiny_dataset_dir(tmp_path) -> Path:
    """A structurally valid Fashion-MNIST folder of the full sizes (all-zero images)."""
    folder = tmp_path / "fmnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60_000), ("t10k", 10_000)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", np.zeros((n, 28, 28), np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return folder


# ----------------------------------------------------------------------------- the command


class Ran:
    """What one command printed and its exit status."""

    def __init__(self, code: int, out: str, err: str) -> None:
        self.returncode, self.stdout, self.stderr = code, out, err


def run_cli(*args) -> Ran:
    """`lenetlab ARGS` in this process, its output captured (argparse's exit counts as the status)."""
    from lenetlab import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
    return Ran(code, out.getvalue(), err.getvalue())


def lenetlab(*args, env=None, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """`lenetlab ARGS` as a separate process (for signals, kills and two processes at once)."""
    return subprocess.run([sys.executable, "-m", "lenetlab", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout)


def assert_one_line_error(result, *fragments) -> str:
    """Exit status 2 and exactly one line on stderr, no traceback, holding every fragment."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _refuse_constant(name: str):
    raise ValueError(f"not strict JSON: {name}")


def strict_json(path: Path):
    """Parse a JSON file as a strict parser would: NaN and Infinity are errors."""
    return json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=_refuse_constant)


def metrics_text(run: Path) -> str:
    return (Path(run) / "metrics.csv").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- runs stopped midway

# Two 2-epoch trials, one at a time: a run can be stopped in the middle of either.
RESUME_ARGS = ["--seeds", "1", "--variants", "baseline,batch_norm", "--epochs-scale", "0.17",
               "--train-subset", "2000", "--threads", "1", "--workers", "1", "--quiet"]


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, data_dir) -> Path:
    """The run that every stopped-and-resumed run of RESUME_ARGS must end up equal to."""
    out = tmp_path_factory.mktemp("whole")
    result = run_cli("study", *RESUME_ARGS, "--out", out, "--name", "whole", "--data-dir", data_dir)
    assert result.returncode == 0, result.stderr
    return out / "whole"


def start_study(out: Path, name: str, data_dir: Path, *extra, args=RESUME_ARGS) -> subprocess.Popen:
    """`lenetlab study` as a process of its own, as a user starts it in a terminal's foreground."""
    import signal

    cmd = [sys.executable, "-m", "lenetlab", "study", *args, "--out", str(out), "--name", name,
           "--data-dir", str(data_dir), *map(str, extra)]
    # A shell running a job in the background ignores SIGINT for it, and Python keeps an
    # inherited "ignore"; restore the default, as for a command in a terminal's foreground.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def trial_workers(study_pid: int) -> list[int]:
    """The trial processes of a running study: children of its forkserver."""
    servers = []
    for pid in children(study_pid):
        try:
            if b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes():
                servers.append(pid)
        except OSError:
            continue
    return [pid for server in servers for pid in children(server)]


def assert_gone(pids: list[int], timeout: float = 10) -> None:
    """Every process in pids has ended (a zombie awaiting its parent counts as ended)."""
    deadline = time.time() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                alive.append(pid)
        if not alive:
            return
        assert time.time() < deadline, f"processes {alive} outlived the study"
        time.sleep(0.05)


def wait_for(run: Path, pattern: str, process: subprocess.Popen | None = None, timeout: float = 120) -> Path:
    """The first file matching pattern in run, once it exists (while process is still running)."""
    deadline = time.time() + timeout
    while True:
        found = list(Path(run).glob(pattern))
        if found:
            return found[0]
        if process is not None:
            assert process.poll() is None, process.communicate()
        assert time.time() < deadline, f"no {pattern} after {timeout} s"
        time.sleep(0.05)
