"""lenetlab: regularised LeNet-5 networks on Fashion-MNIST, trained fast and reported honestly.

The command line's verbs as functions (api.py): study, sweep, train, resume, predict, and
open_run for a finished run folder; each study, sweep or resume returns a Run (results.py).
The original study's API is kept: LeNet5V1, train_model, MODEL_PATH, MODEL_SAVE_PATHS,
plus make_dataloaders() to build its three DataLoaders from the local data.
"""

from .api import Stopped, open_run, predict, resume, study, sweep, train
from .compat import make_dataloaders, train_model
from .data import CLASS_NAMES, load_fashion_mnist, make_splits
from .errors import DataError, LenetlabError, OptionError, RunDirError, SpecError, WeightsError
from .model import LeNet5V1, detect_flags, load_weights
from .recipes import MODEL_PATH, MODEL_SAVE_PATHS, RECIPES, Recipe
from .records import Summary, Trained
from .results import Run

__version__ = "0.1.0"

__all__ = [
    "CLASS_NAMES", "MODEL_PATH", "MODEL_SAVE_PATHS", "RECIPES", "DataError", "LeNet5V1",
    "LenetlabError", "OptionError", "Recipe", "Run", "RunDirError", "SpecError", "Stopped", "Summary",
    "Trained", "WeightsError", "detect_flags", "load_fashion_mnist", "load_weights", "make_dataloaders",
    "make_splits", "open_run", "predict", "resume", "study", "sweep", "train", "train_model",
]
