"""Search specifications: what `lenetlab tune` searches, from a TOML file, checked field by field.

A spec is a TOML file (every key optional but the search space):

    name = "baseline-search"     # the run folder's name
    variant = "baseline"         # the published recipe every trial starts from (default baseline)
    epochs = 12                  # any recipe field outside [search]: fixed for every trial
    trials = 30                  # the budget: trials asked of the sampler, pruned ones included
    timeout = 600                # optional: seconds of search in all, across resumes
    seed = 0                     # the sampler's seed
    pruner = "hyperband"         # hyperband, successive_halving or none
    min_epochs = 1               # epochs every trial trains before the pruner may stop it
    trial_seed = 0               # the seed every search trial trains from
    confirm_seeds = 3            # the best recipe and the variant, on these seeds, with test accuracy

    [search]                     # each field: a range or a list of choices
    lr = { low = 1e-4, high = 1e-2, log = true }
    weight_decay = { low = 1e-6, high = 1e-2, log = true }
    batch_size = [32, 64, 128]

No torch and no Optuna here: `lenetlab tune --help`, `lenetlab runs` and the spec's checks do
without them; tuning/ turns the space into Optuna's distributions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .checked import is_folder_name
from .errors import OptionError, SpecError
from .files import read_toml
from .recipes import FIELDS, RECIPES, Recipe, check_field, with_fields
from .rundir import parse_seeds

PRUNERS = ("hyperband", "successive_halving", "none")
MAX_BUDGET = 10_000  # trials of one search
SETTINGS = ("name", "variant", "trials", "timeout", "seed", "pruner", "min_epochs", "trial_seed",
            "confirm_seeds", "search")
DEFAULTS = {"variant": "baseline", "trials": 20, "timeout": None, "seed": 0, "pruner": "hyperband",
            "min_epochs": 1, "trial_seed": 0, "confirm_seeds": 3}


@dataclass(frozen=True)
class Range:
    """A numeric field searched between low and high (both included), on a log scale if log."""

    low: float | int
    high: float | int
    log: bool = False


@dataclass(frozen=True)
class Choices:
    """A field searched among listed values."""

    values: list


Space = dict[str, Range | Choices]


@dataclass(frozen=True)
class TuneSpec:
    """A checked search: the base recipe (variant and fixed fields), the space and the budget."""

    name: str | None
    variant: str
    fixed: dict  # recipe fields every trial has
    space: Space
    trials: int
    timeout: float | None  # seconds of search over every session of the run
    seed: int  # the sampler's
    pruner: str
    min_epochs: int  # the pruners' smallest resource: no trial is stopped before it trains these
    trial_seed: int
    confirm_seeds: list[int]

    @property
    def base(self) -> Recipe:
        """The recipe every trial starts from: the variant with the fixed fields. (The best is
        confirmed against the variant as published: tuning/run.py's best_spec.) A searched
        distill starts at its first value, as a fixed teacher needs one above 0."""
        start = {"distill": _ends(self.space["distill"])[0]} if "distill" in self.space else {}
        return with_fields(RECIPES[self.variant], {**self.fixed, **start})

    def recipe(self, params: dict) -> Recipe:
        """The recipe of a trial: the base with the sampled fields."""
        return with_fields(self.base, params)

    def max_epochs(self) -> int:
        """The most epochs a trial can train: the pruner's largest resource."""
        epochs = self.space.get("epochs")
        if isinstance(epochs, Range):
            return int(epochs.high)
        if isinstance(epochs, Choices):
            return max(epochs.values)
        return self.base.epochs

    def to_dict(self) -> dict:
        return {"name": self.name, "variant": self.variant, "fixed": self.fixed,
                "space": {key: asdict(dim) for key, dim in self.space.items()}, "trials": self.trials,
                "timeout": self.timeout, "seed": self.seed, "pruner": self.pruner,
                "min_epochs": self.min_epochs, "trial_seed": self.trial_seed,
                "confirm_seeds": self.confirm_seeds}

    @classmethod
    def from_dict(cls, body: dict) -> TuneSpec:
        """A spec run.json recorded, checked again as a spec file is (SpecError)."""
        table = {key: body[key] for key in ("name", "variant", "trials", "timeout", "seed", "pruner",
                                            "min_epochs", "trial_seed", "confirm_seeds")}
        table.update(body["fixed"])
        table["search"] = {key: dim["values"] if set(dim) == {"values"} else dim
                           for key, dim in body["space"].items()}
        return parse(table)


def _whole(key: str, value, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise SpecError(f"{key}: expected a whole number from {low:,} to {high:,}, got {value!r}")
    return value


def _dimension(key: str, value) -> Range | Choices:
    """One [search] entry, checked against its recipe field."""
    where = f"search.{key}"
    if key not in FIELDS:
        raise SpecError(f"{where}: not a recipe field (fields: {', '.join(FIELDS)})")
    kind = FIELDS[key].kind
    if isinstance(value, list):
        if not value:
            raise SpecError(f"{where}: an empty list of choices")
        values = [check_field(key, v, f"{where}: ") for v in value]
        if len(set(map(repr, values))) != len(values):
            raise SpecError(f"{where}: a choice is listed twice")
        return Choices(values)
    if not isinstance(value, dict):
        raise SpecError(f"{where}: expected a list of choices or a range {{ low = ..., high = ... }}, "
                        f"got {value!r}")
    if kind not in (int, float):
        raise SpecError(f"{where}: a {kind.__name__} field is searched among a list of choices, not a range")
    unknown = sorted(set(value) - {"low", "high", "log"})
    if unknown or "low" not in value or "high" not in value:
        raise SpecError(f"{where}: expected {{ low = ..., high = ..., log = true or false }}, got keys "
                        f"{', '.join(sorted(value)) or 'none'}")
    low, high = (check_field(key, value[end], f"{where}.{end}: ") for end in ("low", "high"))
    log = value.get("log", False)
    if not isinstance(log, bool):
        raise SpecError(f"{where}.log: expected true or false, got {log!r}")
    if low > high:
        raise SpecError(f"{where}: low {low!r} is above high {high!r}")
    if not FIELDS[key].interval and low != high and not (low > 0 or high == 0):
        raise SpecError(f"{where}: its values are not one interval ({FIELDS[key].help}); range over "
                        f"one part of them or list the choices")
    if log and low <= 0:
        raise SpecError(f"{where}: a log range must stay above 0, got low {low!r}")
    return Range(low, high, log)


def _ends(dim: Range | Choices) -> list:
    return [dim.low, dim.high] if isinstance(dim, Range) else list(dim.values)


def _check_together(base: Recipe, space: Space) -> None:
    """Every trial's recipe is valid: each field's values on the base (dropout_rate needs a
    dropout layer, ...), and the warm-up at its longest within the epochs at their fewest."""
    for key, dim in space.items():
        for value in _ends(dim):
            with_fields(base, {key: value}, "search.")
    if "warmup_epochs" in space or "epochs" in space:
        longest = max(_ends(space["warmup_epochs"])) if "warmup_epochs" in space else base.warmup_epochs
        fewest = min(_ends(space["epochs"])) if "epochs" in space else base.epochs
        with_fields(base, {"warmup_epochs": longest, "epochs": fewest}, "search.")


def parse(table: dict) -> TuneSpec:
    """Check a parsed spec (SpecError naming the key) into a TuneSpec."""
    if not isinstance(table, dict):
        raise SpecError("expected a table of settings")
    unknown = sorted(set(table) - set(SETTINGS) - set(FIELDS))
    if unknown:
        raise SpecError(f"{unknown[0]}: neither a setting ({', '.join(SETTINGS)}) nor a recipe field")
    settings = {**DEFAULTS, **{k: v for k, v in table.items() if k in SETTINGS}}
    name = settings.get("name")
    if name is not None and not is_folder_name(name):
        raise SpecError(f"name: expected a folder name, got {name!r}")
    variant = settings["variant"]
    if not isinstance(variant, str) or variant not in RECIPES:
        raise SpecError(f"variant: invalid value {variant!r} (one of {', '.join(RECIPES)})")
    trials = _whole("trials", settings["trials"], 1, MAX_BUDGET)
    timeout = settings["timeout"]
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout < math.inf):
        raise SpecError(f"timeout: expected seconds, a number above 0, got {timeout!r}")
    seed = _whole("seed", settings["seed"], 0, 2**32 - 1)
    trial_seed = _whole("trial_seed", settings["trial_seed"], 0, 2**32 - 1)
    pruner = settings["pruner"]
    if pruner not in PRUNERS:
        raise SpecError(f"pruner: invalid value {pruner!r} (one of {', '.join(PRUNERS)})")
    try:
        confirm_seeds = parse_seeds(settings["confirm_seeds"])
    except SpecError as exc:
        raise SpecError(f"confirm_{exc}") from None
    search = table.get("search")
    if not isinstance(search, dict) or not search:
        raise SpecError("search: expected a table of fields to search ([search] with at least one field)")
    fixed = {key: check_field(key, value) for key, value in table.items() if key in FIELDS}
    twice = sorted(set(fixed) & set(search))
    if twice:
        raise SpecError(f"{twice[0]}: both fixed and in [search]; keep one")
    space = {key: _dimension(key, value) for key, value in search.items()}
    # the teacher trains once, before the trials, and stores its outputs for one layout of moves
    for key in ("teacher", "teacher_models", "teacher_epochs", "translate", "flip"):
        if key in space and (key.startswith("teacher") or fixed.get("teacher", RECIPES[variant].teacher)):
            raise SpecError(f"search.{key}: fixed in a search with a teacher (the teacher trains once, "
                            "before the trials, for one translate and flip); set it outside [search]")
    min_epochs = _whole("min_epochs", settings["min_epochs"], 1, 1000)
    spec = TuneSpec(name, variant, fixed, space, trials, None if timeout is None else float(timeout), seed,
                    pruner, min_epochs, trial_seed, confirm_seeds)
    try:
        base = spec.base
    except OptionError as exc:  # fields that do not fit together (a warm-up as long as the run)
        raise SpecError(str(exc)) from None
    _check_together(base, space)
    if min_epochs > spec.max_epochs():
        raise SpecError(f"min_epochs: {min_epochs} is more than a trial's most epochs ({spec.max_epochs()})")
    return spec


def load_tune_spec(path: str | Path) -> TuneSpec:
    """A spec file, checked: SpecError naming the file and the key."""
    table = read_toml(path)
    try:
        return parse(table)
    except (SpecError, OptionError) as exc:
        raise SpecError(f"{path}: {exc}") from None
