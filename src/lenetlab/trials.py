"""One trial, start to finish: train a (configuration, seed), then record its files in the run folder.

Both engines (the local process pool and Ray) call execute_trial where the work
runs and record_trial where the run folder is, so a run folder's contents do not
depend on the engine that filled it.

Run folder layout (all writes atomic):
    run.json                       the plan: configurations, seeds, options
    checkpoints/<key>.pt           the state after the last finished epoch (deleted when done)
    trials/<key>.json              a finished (or failed) trial: history, test evaluation
    models/seed<k>/<file>.pth      its weights (plain state_dict) + <file>.json sidecar
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import files
from .data import FashionMNIST, make_splits
from .evaluation import evaluate
from .provenance import library_versions, machine_info
from .recipes import Recipe, describe_start, file_name
from .training import train_trial


def trial_key(config: str, seed: int) -> str:
    return f"{config}__seed{seed}"


def make_trial(config: str, recipe: Recipe, seed: int) -> dict:
    """A trial as plain data, so it can cross process and machine boundaries."""
    return {"key": trial_key(config, seed), "config": config, "variant": recipe.name,
            "seed": seed, "recipe": recipe.to_dict()}


def trial_result_path(run_dir: Path, trial: dict) -> Path:
    return run_dir / "trials" / f"{trial['key']}.json"


def checkpoint_path(run_dir: Path, trial: dict) -> Path:
    return run_dir / "checkpoints" / f"{trial['key']}.pt"


def weights_path(run_dir: Path, trial: dict) -> Path:
    return run_dir / "models" / f"seed{trial['seed']}" / file_name(trial["config"])


def execute_trial(trial: dict, data: FashionMNIST, options: dict, checkpoint: Path | None,
                  progress: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Train and evaluate one trial; return its result and its weights (CPU tensors).

    options: threads, device, split_seed and train_subset (None for the whole split).
    """
    torch.set_num_threads(options["threads"])
    splits = make_splits(data, options["split_seed"], options["device"], options.get("train_subset"))
    recipe = Recipe(**trial["recipe"])
    started = time.perf_counter()
    output = train_trial(recipe, trial["seed"], splits, checkpoint=checkpoint,
                         progress=progress, log=log)
    test = evaluate(output.model, splits.test_x, splits.test_y)
    result = {
        **trial,
        "status": "done",
        "start": describe_start(recipe),
        "history": output.history,
        "test": {"accuracy": test.accuracy, "loss": test.loss,
                 "per_class_accuracy": test.per_class_accuracy,
                 "confusion_matrix": test.confusion_matrix},
        "wall_time_s": time.perf_counter() - started,
        "threads": options["threads"],
        "device": options["device"],
        "split_seed": options["split_seed"],
        "train_subset": options.get("train_subset"),
    }
    state_dict = {k: v.detach().cpu() for k, v in output.model.state_dict().items()}
    return {"result": result, "state_dict": state_dict}


def read_result(run_dir: Path, trial: dict) -> dict | None:
    """A trial's recorded result, or None when it is missing or damaged (then it runs again)."""
    try:
        result = json.loads(trial_result_path(run_dir, trial).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or result.get("key") != trial["key"]:
        return None
    if result.get("status") == "failed" and isinstance(result.get("error"), str):
        return result
    try:
        rows = result["history"]
        ok = (result["status"] == "done" and isinstance(rows, list) and rows
              and all(isinstance(r["epoch"], int) and r["split"] in ("train", "val", "test")
                      and isinstance(r["loss"], float | int) and isinstance(r["accuracy"], float | int)
                      for r in rows)
              and len(result["test"]["per_class_accuracy"]) == 10
              and len(result["test"]["confusion_matrix"]) == 10
              and isinstance(result["test"]["accuracy"], float | int))
    except (KeyError, TypeError):
        ok = False
    return result if ok else None


def save_weights(path: Path, outcome: dict, checksums: dict[str, str]) -> None:
    """The plain state_dict (as the original saved it) and a JSON sidecar saying how it was made."""
    result = outcome["result"]
    path.with_suffix(".json").unlink(missing_ok=True)  # never new weights beside an old sidecar
    files.torch_save(outcome["state_dict"], path)
    files.write_json(path.with_suffix(".json"), {
        "variant": result["variant"], "config": result["config"], "seed": result["seed"],
        "recipe": result["recipe"], "start": result["start"],
        "architecture": {"use_dropout": result["recipe"]["use_dropout"],
                         "use_batch_norm": result["recipe"]["use_batch_norm"]},
        "split_seed": result["split_seed"], "train_subset": result["train_subset"],
        "metrics": result["history"], "test_accuracy": result["test"]["accuracy"],
        "wall_time_s": result["wall_time_s"], "data_sha256": checksums,
        "versions": library_versions(), "machine": machine_info(result["device"]),
        "threads": result["threads"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })


def record_trial(run_dir: Path, outcome: dict, checksums: dict[str, str]) -> dict:
    """Write a finished trial's weights, sidecar and result; drop its checkpoint."""
    result = outcome["result"]
    weights = weights_path(run_dir, result)
    save_weights(weights, outcome, checksums)
    result = {**result, "weights": str(weights.relative_to(run_dir))}
    files.write_json(trial_result_path(run_dir, result), result)
    checkpoint_path(run_dir, result).unlink(missing_ok=True)
    return result


def record_failure(run_dir: Path, trial: dict, error: str) -> dict:
    """Record a trial that raised or whose worker died; its checkpoint stays for --resume."""
    result = {**trial, "status": "failed", "error": error}
    files.write_json(trial_result_path(run_dir, trial), result)
    return result
