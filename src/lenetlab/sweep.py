"""Sweep specifications: a grid (or list) over recipe fields, times seeds.

A spec is a TOML file:

    name = "weight-decay"          # optional: the run folder's name
    seeds = 3                      # or a list: [0, 1, 2]
    variant = "baseline"           # the recipe every configuration starts from
    [grid]                         # every combination of these values
    weight_decay = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    lr = [0.001, 0.003]

    [[configs]]                    # and/or explicit configurations
    variant = "dropout"
    dropout_rate = 0.3

Every field is optional but at least one configuration must result.
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

from .errors import SpecError
from .recipes import OPTIMIZERS, RECIPES, Recipe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# field -> (type, check, abbreviation used in configuration names)
FIELDS = {
    "variant": (str, lambda v: v in RECIPES, "variant"),
    "weight_decay": (float, lambda v: 0 <= v < math.inf, "wd"),
    "dropout_rate": (float, lambda v: 0 <= v < 1, "p"),
    "epochs": (int, lambda v: v >= 1, "ep"),
    "batch_size": (int, lambda v: v >= 1, "bs"),
    "lr": (float, lambda v: 0 < v < math.inf, "lr"),
    "optimizer": (str, lambda v: v in OPTIMIZERS, "opt"),
}
TOP_LEVEL = {"name", "seeds", "grid", "configs", *FIELDS}


def check_value(key: str, value, where: str = ""):
    """Check one recipe field (sweep specs and run plans both use this); ints pass as floats."""
    kind, ok, _ = FIELDS[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise SpecError(f"{where}{key}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    if not ok(value):
        choices = {"variant": f" (one of {', '.join(RECIPES)})",
                   "optimizer": f" (one of {', '.join(OPTIMIZERS)})"}.get(key, "")
        raise SpecError(f"{where}{key}: invalid value {value!r}{choices}")
    return value


def _check_fields(table: dict, where: str) -> dict:
    unknown = sorted(set(table) - set(FIELDS))
    if unknown:
        raise SpecError(f"{where}{unknown[0]}: unknown field (known: {', '.join(FIELDS)})")
    return {key: check_value(key, value, where) for key, value in table.items()}


def parse_seeds(value) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise SpecError(f"seeds: must be at least 1, got {value}")
        return list(range(value))
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool)
                                                 and v >= 0 for v in value):
        if len(set(value)) != len(value):
            raise SpecError("seeds: repeated seed")
        return list(value)
    raise SpecError(f"seeds: expected a positive integer or a non-empty list of whole numbers >= 0, "
                    f"got {value!r}")


def is_folder_name(name: object) -> bool:
    """A single folder name: no separators, not '.' or '..', so a run stays inside --out."""
    return isinstance(name, str) and bool(name) and Path(name).name == name and name not in (".", "..")


def config_name(fields: dict) -> str:
    """baseline-wd0.001-lr0.003: the variant, then each changed field in a fixed order."""
    parts = [fields.get("variant", "baseline")]
    for key in FIELDS:
        if key != "variant" and key in fields:
            parts.append(f"{FIELDS[key][2]}{fields[key]}")
    return "-".join(parts)


def build_recipe(fields: dict) -> Recipe:
    base = RECIPES[fields.get("variant", "baseline")]
    changes = {k: v for k, v in fields.items() if k != "variant"}
    if "dropout_rate" in changes and not base.use_dropout:
        raise SpecError(f"dropout_rate: variant {base.name!r} has no dropout layer")
    return base.with_changes(**changes)


def expand(spec: dict) -> tuple[str | None, list[int], list[tuple[str, Recipe]]]:
    """Check a parsed spec and expand it into (name, seeds, [(config name, recipe)])."""
    unknown = sorted(set(spec) - TOP_LEVEL)
    if unknown:
        raise SpecError(f"{unknown[0]}: unknown key (known: {', '.join(sorted(TOP_LEVEL))})")
    name = spec.get("name")
    if name is not None and not is_folder_name(name):
        raise SpecError(f"name: expected a folder name, got {name!r}")
    seeds = parse_seeds(spec.get("seeds", 3))
    common = _check_fields({k: v for k, v in spec.items() if k in FIELDS}, "")
    grid = spec.get("grid", {})
    if not isinstance(grid, dict):
        raise SpecError("grid: expected a table of field = [values]")
    axes = []
    for key, values in grid.items():
        if key not in FIELDS:
            raise SpecError(f"grid.{key}: unknown field (known: {', '.join(FIELDS)})")
        if not isinstance(values, list):
            values = [values]
        if not values:
            raise SpecError(f"grid.{key}: empty list of values")
        axes.append([(key, check_value(key, v, "grid.")) for v in values])
    entries = [{**common, **dict(combo)} for combo in itertools.product(*axes)] if axes else []
    extra = spec.get("configs", [])
    if not isinstance(extra, list) or not all(isinstance(t, dict) for t in extra):
        raise SpecError("configs: expected a list of tables ([[configs]])")
    entries += [{**common, **_check_fields(t, f"configs[{i}].")} for i, t in enumerate(extra)]
    if not entries:
        raise SpecError("grid: empty, no configuration to run (give [grid] values or [[configs]])")
    configs, seen = [], set()
    for fields in entries:
        recipe = build_recipe(fields)
        identity = tuple(sorted(recipe.to_dict().items()))
        if identity in seen:  # the same recipe reached twice runs once
            continue
        seen.add(identity)
        configs.append((config_name(fields), recipe))
    return name, seeds, configs


def load_spec(path: str | Path) -> tuple[str | None, list[int], list[tuple[str, Recipe]]]:
    path = Path(path)
    try:
        spec = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: unreadable ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML ({exc})") from None
    try:
        return expand(spec)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None
