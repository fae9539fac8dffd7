"""lenetlab: regularised LeNet-5 networks on Fashion-MNIST, trained fast and reported honestly.

The command line's verbs as functions (api.py): study, sweep, tune, train, resume, predict, and
open_run for a finished run folder; each study or sweep returns a Run (results.py), a search
(tune) a TuneRun (tuning/results.py).
The original study's API is kept: LeNet5V1, train_model, MODEL_PATH, MODEL_SAVE_PATHS,
plus make_dataloaders() to build its three DataLoaders from the local data.

Each name is imported from its module when first used (PEP 562), so `import lenetlab`, the
command's --help and a trial's worker load no torch, numpy or PIL they do not need.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_WHERE = {
    "Stopped": "errors", "open_run": "api", "predict": "api", "resume": "api", "study": "api",
    "sweep": "api", "train": "api", "tune": "api",
    "make_dataloaders": "compat", "train_model": "compat",
    "CLASS_NAMES": "data", "load_fashion_mnist": "data", "make_splits": "data",
    "DataError": "errors", "LenetlabError": "errors", "OptionError": "errors", "RunDirError": "errors",
    "SpecError": "errors", "WeightsError": "errors",
    "LeNet5V1": "model", "detect_flags": "model", "load_weights": "model",
    "MODEL_PATH": "recipes", "MODEL_SAVE_PATHS": "recipes", "RECIPES": "recipes", "Recipe": "recipes",
    "Summary": "records", "Trained": "records",
    "Run": "results", "TuneRun": "tuning.results",
}

__all__ = [
    "CLASS_NAMES", "MODEL_PATH", "MODEL_SAVE_PATHS", "RECIPES", "DataError", "LeNet5V1",
    "LenetlabError", "OptionError", "Recipe", "Run", "RunDirError", "SpecError", "Stopped", "Summary",
    "Trained", "WeightsError", "detect_flags", "load_fashion_mnist", "load_weights", "make_dataloaders",
    "make_splits", "open_run", "predict", "resume", "study", "sweep", "train", "train_model", "tune",
    "TuneRun",
]


def __getattr__(name: str):
    if name not in _WHERE:
        if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule: lenetlab.training
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module 'lenetlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # the next access is a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


if TYPE_CHECKING:  # what type checkers and IDEs see; nothing here runs
    from .api import open_run, predict, resume, study, sweep, train, tune
    from .compat import make_dataloaders, train_model
    from .data import CLASS_NAMES, load_fashion_mnist, make_splits
    from .errors import DataError, LenetlabError, OptionError, RunDirError, SpecError, Stopped, WeightsError
    from .model import LeNet5V1, detect_flags, load_weights
    from .recipes import MODEL_PATH, MODEL_SAVE_PATHS, RECIPES, Recipe
    from .records import Summary, Trained
    from .results import Run
    from .tuning.results import TuneRun
