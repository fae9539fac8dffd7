"""Command-line options: each value's type, range and real default, checked before any work starts.

The subcommands in cli.py share these: a bad value is one argparse line and exit status 2,
and the help text of every option states its range and default.
"""

from __future__ import annotations

import argparse
import math
import os
import re

from .data import TRAIN_SIZE
from .engines import DEFAULT_RAY_RETRIES, MAX_RAY_RETRIES
from .errors import SpecError
from .recipes import FIELDS, check_field
from .records import RunOptions
from .rundir import MAX_TRIALS

DEFAULT_SEEDS = 3
MAX_THREADS = 256
MAX_EPOCHS_SCALE = 50.0


def number(kind: type, low: float, high: float, low_open: bool = False):
    """An argparse type: a finite int or float in [low, high] ((low, high] with low_open)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}") from None
        if not (math.isfinite(value) and (value > low if low_open else value >= low) and value <= high):
            raise argparse.ArgumentTypeError(f"expected {'more than' if low_open else 'from'} {low:g} "
                                             f"to {high:g}, got {text}")
        return value
    parse.__name__ = kind.__name__
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

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SpecError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SpecError(f"--device {name}: CUDA is not available on this machine")
        if (device.index or 0) >= torch.cuda.device_count():
            raise SpecError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return name


def run_options(args) -> RunOptions:
    """The options of a new run, checked before any folder exists or any work starts."""
    device = resolve_device(args.device)
    return RunOptions(device=device, threads=args.threads, split_seed=args.split_seed,
                      train_subset=args.train_subset, kernels=args.kernels)


SEED = number(int, 0, 2**32 - 1)
THREADS = number(int, 1, MAX_THREADS)


def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files "
                   "(default: $LENETLAB_DATA, then the cache, downloading if needed)")


def add_training_options(p: argparse.ArgumentParser, threads_default: str) -> None:
    add_data_options(p)
    p.add_argument("--device", default="auto", help="auto (default: cuda if available, else cpu), "
                   "cpu, cuda or cuda:N")
    p.add_argument("--kernels", choices=("auto", "native", "torch"),
                   default=os.environ.get("LENETLAB_KERNELS", "auto"),
                   help="the CPU training step: native (lenetlab's own, built with your C compiler on "
                   "first use), torch, or auto (default, or $LENETLAB_KERNELS: native where it builds and "
                   "covers the recipe, else torch with one note saying why)")
    p.add_argument("--threads", type=THREADS, help=f"threads per trial (torch's and the native step's), "
                   f"1 to {MAX_THREADS} (default: {threads_default})")
    p.add_argument("--split-seed", type=SEED, default=0,
                   help="seed of the 54,000 / 6,000 train / validation split, 0 to 2**32-1 (default 0)")
    p.add_argument("--train-subset", type=number(int, 1, TRAIN_SIZE),
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


def add_engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=("local", "ray"), help="local process pool (default) or ray")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    p.add_argument("--workers", type=number(int, 1, 1024),
                   help="trials at a time, 1 to 1024 (default: one per usable core)")
    p.add_argument("--ray-retries", type=number(int, 0, MAX_RAY_RETRIES), default=DEFAULT_RAY_RETRIES,
                   help=f"with --engine ray: times a trial whose worker or host died runs again (from its "
                   f"last checkpoint), 0 to {MAX_RAY_RETRIES} (default {DEFAULT_RAY_RETRIES}); an error "
                   f"of the trial itself is never retried")


def add_run_options(p: argparse.ArgumentParser) -> None:
    add_training_options(p, "cores / workers")
    add_engine_options(p)
    p.set_defaults(engine="local")
    p.add_argument("--out", default="runs", help="parent folder of run folders (default: runs)")
    p.add_argument("--name", help="run folder name (default: <kind>-<date>-<time>)")
    p.add_argument("--max-trials", type=number(int, 1, 10**6), default=MAX_TRIALS,
                   help=f"refuse plans of more trials than this, 1 to 1000000 (default {MAX_TRIALS})")
    add_mlflow_option(p, "each trial as it finishes, then the run's summary")
