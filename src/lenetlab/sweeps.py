"""Sweep specifications: a grid (or list) over recipe fields, times seeds, into named configurations.

A spec is a TOML file (every key optional, but at least one configuration must result):

    name = "weight-decay"          # the run folder's name
    seeds = 3                      # or a list: [0, 1, 2]
    variant = "baseline"           # the published recipe every configuration starts from
    [grid]                         # every combination of these values
    weight_decay = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    lr = [0.001, 0.003]

    [[configs]]                    # and/or explicit configurations
    variant = "dropout"
    dropout_rate = 0.3
    name = "dropout-lighter"       # optional: the configuration's name in the report

    reference = "dropout-lighter"  # optional: the configuration the others are compared with
                                   # (default: one named baseline, if any)

The fields and their ranges are recipes.FIELDS (plus `variant`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import OptionError, SpecError
from .files import read_toml
from .recipes import FIELDS, RECIPES, Recipe, check_field, with_fields
from .rundir import MAX_TRIALS, check_size, is_folder_name, parse_seeds

KEYS = ("variant", *FIELDS)
Configs = list[tuple[str, Recipe]]
TOP_LEVEL = {"name", "seeds", "grid", "configs", "reference", *KEYS}


@dataclass(frozen=True)
class Sweep:
    name: str | None  # the run folder's name, if the spec gives one
    seeds: list[int]
    configs: Configs
    reference: str | None  # the configuration the others are compared with


def _check(key: str, value, where: str):
    if key != "variant":
        return check_field(key, value, where)
    if not isinstance(value, str) or value not in RECIPES:
        raise SpecError(f"{where}variant: invalid value {value!r} (one of {', '.join(RECIPES)})")
    return value


def _check_table(table: dict, where: str, allowed=KEYS) -> dict:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise SpecError(f"{where}{unknown[0]}: unknown field (known: {', '.join(allowed)})")
    if "name" in table and not is_folder_name(table["name"]):
        raise SpecError(f"{where}name: expected a name usable as a file name, got {table['name']!r}")
    return {key: _check(key, value, where) if key != "name" else value for key, value in table.items()}


def config_name(fields: dict) -> str:
    """baseline-wd0.001-lr0.003-noflip: the variant, then each changed field in a fixed order."""
    if "name" in fields:
        return fields["name"]
    parts = [fields.get("variant", "baseline")]
    for key, field in FIELDS.items():
        if key in fields:
            value = fields[key]
            flag = isinstance(value, bool)
            parts.append(("" if value else "no") + field.short if flag else f"{field.short}{value}")
    return "-".join(parts)


def expand(spec: dict, max_trials: int = MAX_TRIALS) -> Sweep:
    """Check a parsed spec and expand it into its configurations and seeds."""
    unknown = sorted(set(spec) - TOP_LEVEL)
    if unknown:
        raise SpecError(f"{unknown[0]}: unknown key (known: {', '.join(sorted(TOP_LEVEL))})")
    name = spec.get("name")
    if name is not None and not is_folder_name(name):
        raise SpecError(f"name: expected a folder name, got {name!r}")
    seeds = parse_seeds(spec.get("seeds", 3))
    common = _check_table({k: v for k, v in spec.items() if k in KEYS}, "")
    grid = spec.get("grid", {})
    if not isinstance(grid, dict):
        raise SpecError("grid: expected a table of field = [values]")
    extra = spec.get("configs", [])
    if not isinstance(extra, list) or not all(isinstance(t, dict) for t in extra):
        raise SpecError("configs: expected a list of tables ([[configs]])")
    axes = []
    for key, values in grid.items():
        if key not in KEYS:
            raise SpecError(f"grid.{key}: unknown field (known: {', '.join(KEYS)})")
        values = values if isinstance(values, list) else [values]
        if not values:
            raise SpecError(f"grid.{key}: empty list of values")
        axes.append(values)
    # Refuse an oversized plan before building it: a 100 x 100 x 100 grid is a million trials.
    check_size(((math.prod(map(len, axes)) if axes else 0) + len(extra)) * len(seeds), max_trials)
    axes = [[(key, _check(key, v, "grid.")) for v in values] for key, values in zip(grid, axes)]
    entries = [{**common, **dict(combo)} for combo in itertools.product(*axes)] if axes else []
    entries += [{**common, **_check_table(t, f"configs[{i}].", (*KEYS, "name"))} for i, t in enumerate(extra)]
    if not entries:
        raise SpecError("grid: empty, no configuration to run (give [grid] values or [[configs]])")
    configs, seen = [], {}
    for fields in entries:
        base = RECIPES[fields.get("variant", "baseline")]
        recipe = with_fields(base, {k: v for k, v in fields.items() if k not in ("variant", "name")})
        identity = tuple(sorted(asdict(recipe).items()))
        if identity not in seen:  # the same recipe reached twice runs once
            seen[identity] = config_name(fields)
            configs.append((config_name(fields), recipe))
        elif "name" in fields and fields["name"] != seen[identity]:  # a named one must not vanish
            raise SpecError(f"configs: {fields['name']!r} is the same recipe as {seen[identity]!r}")
    names = [n for n, _ in configs]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise SpecError(f"configs: two different configurations are named {twice!r}")
    reference = spec.get("reference")
    if reference is not None and reference not in names:
        raise SpecError(f"reference: {reference!r} is none of the configurations ({', '.join(names)})")
    return Sweep(name, seeds, configs, reference)


def load_spec(path: str | Path, max_trials: int = MAX_TRIALS) -> Sweep:
    path = Path(path)
    spec = read_toml(path)
    try:
        return expand(spec, max_trials)
    except OptionError as exc:
        if exc.key in TOP_LEVEL:  # a key of the spec, named as the spec names it
            raise SpecError(f"{path}: {exc}") from None
        raise OptionError(exc.key, f"{path}: {exc.message}") from None  # the caller's option (max_trials)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None
