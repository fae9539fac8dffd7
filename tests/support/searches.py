"""Small searches on the real data for the tests of `lenetlab tune`: a spec that prunes, in seconds."""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Three epochs a trial, six trials: the learning rate's range reaches rates too small to learn in
# three epochs, which successive halving stops after their first.
SMALL = {"variant": "baseline", "epochs": 3, "trials": 6, "pruner": "successive_halving", "seed": 0,
         "confirm_seeds": 2,
         "search": {"lr": {"low": 1e-5, "high": 3e-2, "log": True}, "batch_size": [64, 128]}}
SUBSET = 1500  # training images: a trial's epoch takes a fraction of a second


def to_toml(spec: dict) -> str:
    """A spec as TOML (the test's own writer: top-level values, then [search])."""
    from lenetlab.tuning.run import toml_value

    lines = [f"{k} = {toml_value(v)}" for k, v in spec.items() if k != "search"]
    lines.append("[search]")
    for key, dim in spec.get("search", {}).items():
        if isinstance(dim, dict):
            inner = ", ".join(f"{k} = {toml_value(v)}" for k, v in dim.items())
            lines.append(f"{key} = {{ {inner} }}")
        else:
            lines.append(f"{key} = {toml_value(dim)}")
    text = "\n".join(lines) + "\n"
    tomllib.loads(text)  # the writer's own check
    return text


def make_search(out: Path, name: str, data_dir: Path, spec: dict = SMALL, **options) -> Path:
    """A finished search's run folder, made by the Python API."""
    import lenetlab

    subset = options.pop("train_subset", SUBSET)
    lenetlab.tune(spec, out=out, name=name, data_dir=data_dir, train_subset=subset, quiet=True, **options)
    return Path(out) / name
