"""Options: each value's type, range and real default, checked before any work starts.

One table (RANGES, CHOICES) serves both front ends: the Python API checks its keywords with
check(), and the CLI's flags parse with the argparse types made from the same entries. A bad
value is a typed error naming the keyword in Python, one argparse line and exit status 2 on
the command line; the help text of every flag states its range and default.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass

from .errors import OptionError, SpecError
from .recipes import FIELDS, check_field
from .records import TRAIN_SIZE, RunOptions
from .rundir import MAX_SEEDS, MAX_TRIALS

DEFAULT_SEEDS = 3
MAX_THREADS = 256
MAX_EPOCHS_SCALE = 50.0
# How many times Ray reruns a trial whose worker process or host died (--ray-retries).
DEFAULT_RAY_RETRIES = 3
MAX_RAY_RETRIES = 100


@dataclass(frozen=True)
class Number:
    """A finite int or float in [low, high] ((low, high] with low_open)."""

    kind: type
    low: float
    high: float
    low_open: bool = False

    def problem(self, value, shown: str | None = None) -> str | None:
        inside = value > self.low if self.low_open else value >= self.low
        if math.isfinite(value) and inside and value <= self.high:
            return None
        return (f"expected {'more than' if self.low_open else 'from'} {self.low:g} to {self.high:g}, "
                f"got {value if shown is None else shown}")

    @property
    def expected(self) -> str:
        return "a whole number" if self.kind is int else "a number"

    def parse(self, text: str):
        """The argparse type: the text as a number, in range."""
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.expected}, got {text!r}") from None
        problem = self.problem(value, text)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    def check(self, key: str, value):
        """A keyword's value from Python: the right type (an int passes as a float), in range."""
        numeric = isinstance(value, int) or (self.kind is float and isinstance(value, float))
        if isinstance(value, bool) or not numeric:
            raise OptionError(key, f"{{option}}: expected {self.expected}, got {value!r}")
        problem = self.problem(value)
        if problem:
            raise OptionError(key, f"{{option}}: {problem}")
        return self.kind(value)


SEED = Number(int, 0, 2**32 - 1)
RANGES = {
    "seeds": Number(int, 1, MAX_SEEDS), "epochs_scale": Number(float, 0, MAX_EPOCHS_SCALE, low_open=True),
    "seed": SEED, "split_seed": SEED, "threads": Number(int, 1, MAX_THREADS),
    "train_subset": Number(int, 1, TRAIN_SIZE), "workers": Number(int, 1, 1024),
    "ray_retries": Number(int, 0, MAX_RAY_RETRIES), "max_trials": Number(int, 1, 10**6),
    "top_k": Number(int, 1, 10),
    # a search's budget and its time in seconds (tunespec.py checks the same in a spec file)
    "trials": Number(int, 1, 10_000), "timeout": Number(float, 0, 10**9, low_open=True),
}
CHOICES = {"kernels": ("auto", "native", "torch"), "engine": ("local", "ray"),
           "invert": ("auto", "yes", "no")}


def check(key: str, value):
    """An option given from Python, checked as its flag is; None (the default) passes."""
    if value is None:
        return None
    if key in CHOICES and value not in CHOICES[key]:
        raise OptionError(key, f"{{option}}: invalid choice {value!r} "
                          f"(choose from {', '.join(CHOICES[key])})")
    return RANGES[key].check(key, value) if key in RANGES else value


def typed(key: str):
    """The argparse type of the flag for key."""
    number = RANGES[key]

    def parse(text: str):
        return number.parse(text)
    parse.__name__ = number.kind.__name__  # argparse names the kind in its messages
    return parse


_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def field(key: str):
    """An argparse type for one recipe field, checked against its range in recipes.FIELDS."""
    kind = FIELDS[key].kind

    def parse(text: str):
        try:
            value = _BOOLS[text.lower()] if kind is bool else kind(text)
        except (KeyError, ValueError):
            expected = "true or false" if kind is bool else kind.__name__
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        try:
            return check_field(key, value)
        except SpecError as exc:
            raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[1]) from None
    parse.__name__ = kind.__name__
    return parse


def list_of(kind):
    """A comma-separated list (spaces around the commas allowed)."""
    def parse(text: str) -> list:
        values = [kind(part.strip()) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return values
    parse.__name__ = f"comma-separated {kind.__name__}"
    return parse


def resolve_device(name: str) -> str:
    import torch

    if not isinstance(name, str):  # run.json records it as written
        raise OptionError("device", f"{{option}}: expected auto, cpu, cuda or cuda:N as a string, "
                          f"got {type(name).__name__} {name!r}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise OptionError("device", f"{{option}} {name}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError("device", f"{{option}} {name}: CUDA is not available on this machine")
        if (device.index or 0) >= torch.cuda.device_count():
            raise OptionError("device", f"{{option}} {name}: this machine has "
                              f"{torch.cuda.device_count()} GPU(s)")
    return name


def run_options(device: str = "auto", threads: int | None = None, split_seed: int = 0,
                train_subset: int | None = None, kernels: str | None = None) -> RunOptions:
    """The options of a new run, checked before any folder exists or any work starts
    (kernels None: $LENETLAB_KERNELS, else auto)."""
    return RunOptions(device=resolve_device(device), threads=check("threads", threads),
                      split_seed=check("split_seed", split_seed),
                      train_subset=check("train_subset", train_subset),
                      kernels=check("kernels", kernels or default_kernels()))


def default_kernels() -> str:
    return os.environ.get("LENETLAB_KERNELS", "auto")


THREADS = typed("threads")


def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files "
                   "(default: $LENETLAB_DATA, then the cache, downloading if needed)")


def add_training_options(p: argparse.ArgumentParser, threads_default: str) -> None:
    add_data_options(p)
    p.add_argument("--device", default="auto", help="auto (default: cuda if available, else cpu), "
                   "cpu, cuda or cuda:N")
    p.add_argument("--kernels", choices=CHOICES["kernels"], default=default_kernels(),
                   help="the CPU training step: native (lenetlab's own, built with your C compiler on "
                   "first use), torch, or auto (default, or $LENETLAB_KERNELS: native where it builds and "
                   "covers the recipe, else torch with one note saying why)")
    p.add_argument("--threads", type=THREADS, help=f"threads per trial (torch's and the native step's), "
                   f"1 to {MAX_THREADS} (default: {threads_default})")
    p.add_argument("--split-seed", type=typed("split_seed"), default=0,
                   help="seed of the 54,000 / 6,000 train / validation split, 0 to 2**32-1 (default 0)")
    p.add_argument("--train-subset", type=typed("train_subset"),
                   help=f"train on the first N images of the split only, 1 to {TRAIN_SIZE} (quick checks)")
    p.add_argument("--quiet", action="store_true", help="no progress display")


def tracking_uri(text: str) -> str:
    """An argparse type: an MLflow tracking URI, so that `--mlflow SPEC.toml` is not taken for one."""
    named = text in ("databricks", "databricks-uc")  # MLflow's URIs without a scheme
    if text and not named and not re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", text):
        raise argparse.ArgumentTypeError(f"expected a tracking URI such as sqlite:///mlflow.db or "
                                         f"http://HOST:PORT, got {text!r} (for the default, write --mlflow "
                                         f"after the other arguments, or --mlflow=)")
    return text


def add_mlflow_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--mlflow", nargs="?", const="", type=tracking_uri, metavar="TRACKING_URI",
                   help=f"log to MLflow {what} (needs pip install 'lenetlab[mlflow]'); TRACKING_URI "
                   "default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory")


def add_engine_options(p: argparse.ArgumentParser, planned: bool = False) -> None:
    """The engine flags; planned: resume's, whose defaults are those in the run's run.json."""
    as_planned = "the run's, as planned in its run.json"
    p.add_argument("--engine", choices=CHOICES["engine"],
                   help=f"local process pool or ray (default: {as_planned if planned else 'local'})")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    p.add_argument("--workers", type=typed("workers"), help="trials at a time, 1 to 1024 (default: "
                   f"{as_planned if planned else 'one per usable core, one on a GPU'})")
    p.add_argument("--ray-retries", type=typed("ray_retries"), default=DEFAULT_RAY_RETRIES,
                   help=f"with --engine ray: times a trial whose worker or host died runs again (from its "
                   f"last checkpoint), 0 to {MAX_RAY_RETRIES} (default {DEFAULT_RAY_RETRIES}); an error "
                   f"of the trial itself is never retried")


def add_run_options(p: argparse.ArgumentParser) -> None:
    add_training_options(p, "cores / workers")
    add_engine_options(p)
    p.set_defaults(engine="local")
    p.add_argument("--out", default="runs", help="parent folder of run folders (default: runs)")
    p.add_argument("--name", help="run folder name (default: <kind>-<date>-<time>)")
    p.add_argument("--max-trials", type=typed("max_trials"), default=MAX_TRIALS,
                   help=f"refuse plans of more trials than this, 1 to 1000000 (default {MAX_TRIALS})")
    add_mlflow_option(p, "each trial as it finishes, then the run's summary")
