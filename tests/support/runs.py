"""Made-up runs for the tests: run folders that the real runner.finalize makes from fake trial results."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

from lenetlab import runner
from lenetlab.model import LeNet5V1
from lenetlab.recipes import RECIPES
from lenetlab.records import SPLITS, EpochMetrics, Evaluation, RunOptions, Trial, TrialResult
from lenetlab.rundir import RunPlan, write_plan
from lenetlab.trials import record_failure, record_trial

OFFSET = {"train": 0.03, "val": 0.005, "test": 0.0}
# Stands in for the loaded data set: finalize only records its checksums and folder.
DATA = SimpleNamespace(checksums={"train-images-idx3-ubyte": "ab" * 32}, folder=Path("/data/fashion"))
WEIGHTS = LeNet5V1().state_dict()


def accuracy(base: float, split: str, seed: int, epoch: int, epochs: int) -> float:
    """A made-up accuracy: rises by epoch to base + split offset + 0.002 per seed at the end."""
    return round(base + OFFSET[split] + 0.002 * seed - 0.01 * (epochs - epoch), 6)


def fake_result(trial: Trial, run_id: str, base: float, options: RunOptions) -> TrialResult:
    epochs = trial.recipe.epochs
    history = [EpochMetrics(epoch, split, round(1.5 - value, 6), value)
               for epoch in range(1, epochs + 1) for split in SPLITS
               for value in [accuracy(base, split, trial.seed, epoch, epochs)]]
    final_test = accuracy(base, "test", trial.seed, epochs, epochs)
    test = Evaluation(loss=1.5 - final_test, accuracy=final_test,
                      per_class_accuracy=[round(base + 0.01 * k - 0.05, 4) for k in range(10)],
                      confusion_matrix=[[90 if row == col else 1 for col in range(10)] for row in range(10)])
    return TrialResult(trial, run_id, "done", history=history, test=test, wall_time_s=12.5,
                       options=options, kernels="torch")


def make_run(run_dir: Path, configs: list[dict], kind: str = "study", reference: str | None = "baseline",
             seeds: tuple[int, ...] = (0, 1), options: RunOptions | None = None,
             elapsed_s: float = 3725.5, name: str = "synthetic-run") -> dict:
    """A run folder as lenetlab leaves it, for configs given as {"name", "base" (accuracy level),
    "recipe" (default: the published one of that name), "failed" (seeds), "offsets" ({seed: extra
    test accuracy})}: trial results recorded by trials.py, then runner.finalize."""
    run_dir.mkdir(parents=True, exist_ok=True)
    options = options or RunOptions()
    recipes = [(c["name"], c.get("recipe") or RECIPES[c["name"]]) for c in configs]
    plan = RunPlan(kind, name, recipes, list(seeds), options, reference, elapsed_s=elapsed_s)
    write_plan(run_dir, plan)
    for config, (name, recipe) in zip(configs, recipes):
        for seed in seeds:
            trial = Trial(name, recipe, seed)
            if seed in config.get("failed", ()):
                record_failure(run_dir, trial, plan.run_id, "RuntimeError: loss became nan\nat epoch 2")
                continue
            result = fake_result(trial, plan.run_id, config["base"], options)
            extra = config.get("offsets", {}).get(seed, 0.0)
            if extra:
                history = [replace(r, accuracy=round(r.accuracy + extra, 6)) if r.split == "test" else r
                           for r in result.history]
                result = replace(result, history=history)
            record_trial(run_dir, result, WEIGHTS, DATA.checksums)
    return runner.finalize(run_dir, plan, DATA)


STUDY = [
    {"name": "baseline", "base": 0.88},
    {"name": "dropout", "base": 0.89, "failed": [1]},
    {"name": "batch_norm", "base": 0.90},
]
