"""A study (the five recipes) or a sweep (any grid of recipes), each over several seeds, in a run folder.

plan -> run.json; engines run the missing trials, each recorded as it finishes;
then finalize() aggregates what finished into metrics.csv, summary.json, the best
seed's weights under the original names, the plots and report.md.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from . import files
from .data import FashionMNIST
from .engines import default_workers, run_local, run_ray
from .errors import RunDirError, SpecError
from .provenance import library_versions, machine_info
from .recipes import RECIPES, Recipe, file_name
from .report import METRICS_HEADER, SPLITS
from .stats import paired_difference, summarize
from .training import total_epochs
from .trials import make_trial, read_result


def new_run_dir(out: Path, name: str | None, kind: str) -> Path:
    """runs/NAME, or runs/<kind>-<time> when no name is given; never an existing run."""
    from .sweep import is_folder_name

    if name is not None and not is_folder_name(name):
        raise SpecError(f"--name {name!r}: expected a folder name (no '/', not '.' or '..')")
    name = name or f"{kind}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(out) / name
    if (run_dir / "run.json").exists():
        raise RunDirError(f"{run_dir}: already holds a run (use --resume {run_dir}, or another --name)")
    return run_dir


def create_run(run_dir: Path, kind: str, configs: list[tuple[str, Recipe]], seeds: list[int],
               reference: str | None, options: dict) -> dict:
    """Write run.json: the plan every later step (and --resume) works from."""
    plan = {
        "lenetlab_version": library_versions()["lenetlab"], "kind": kind, "name": run_dir.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "configs": [{"name": name, "recipe": recipe.to_dict()} for name, recipe in configs],
        "seeds": seeds, "options": options, "reference": reference, "elapsed_s": 0.0,
    }
    files.write_json(run_dir / "run.json", plan)
    return plan


def load_plan(run_dir: Path) -> dict:
    """Read and check run.json; a folder that is not a lenetlab run gets a RunDirError."""
    path = Path(run_dir) / "run.json"
    if not Path(run_dir).is_dir():
        raise RunDirError(f"{run_dir}: no such run folder")
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{run_dir}: not a lenetlab run folder (no run.json)") from None
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{path}: unreadable ({exc})") from None
    try:
        problem = _plan_problem(plan)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        raise RunDirError(f"{path}: malformed run plan ({problem})")
    return plan


def _plan_problem(plan: dict) -> str | None:
    """What is wrong with a parsed run.json, or None."""
    from .sweep import FIELDS, check_value

    for key in ("kind", "name", "created", "lenetlab_version"):
        if not isinstance(plan[key], str):
            return f"{key} must be a string"
    if not plan["configs"] or not isinstance(plan["configs"], list):
        return "no configurations"
    for entry in plan["configs"]:
        recipe = Recipe(**entry["recipe"])
        if not isinstance(entry["name"], str) or "/" in entry["name"]:
            return f"bad configuration name {entry['name']!r}"
        try:
            for field in FIELDS:
                if field != "variant":
                    check_value(field, getattr(recipe, field))
        except SpecError as exc:
            return f"configuration {entry['name']!r}: {exc}"
        start, epochs = recipe.warm_start_from, recipe.warm_start_epochs
        if start is not None and (start not in RECIPES or not _whole(epochs, 1)):
            return f"configuration {entry['name']!r}: bad warm start {start!r} / {epochs!r}"
    names = [entry["name"] for entry in plan["configs"]]
    if len(set(names)) != len(names):
        return "a configuration name appears twice"
    seeds = plan["seeds"]
    if not seeds or not all(_whole(seed, 0) for seed in seeds):
        return "seeds must be a non-empty list of whole numbers >= 0"
    options = plan["options"]
    if not _whole(options["threads"], 1) or not _whole(options["split_seed"], 0):
        return "options.threads must be a whole number >= 1, options.split_seed >= 0"
    if not isinstance(options["device"], str) or options["device"].split(":")[0] not in ("cpu", "cuda"):
        return "options.device must be cpu, cuda or cuda:N"
    if options.get("train_subset") is not None and not _whole(options["train_subset"], 1):
        return "options.train_subset must be null or a whole number >= 1"
    elapsed = plan.get("elapsed_s", 0.0)
    if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or not 0 <= elapsed < math.inf:
        return "elapsed_s must be a number of seconds"
    return None


def _whole(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def plan_trials(plan: dict) -> list[dict]:
    return [make_trial(entry["name"], Recipe(**entry["recipe"]), seed)
            for seed in plan["seeds"] for entry in plan["configs"]]


def read_results(run_dir: Path, plan: dict) -> dict[str, dict]:
    """Results recorded so far, by trial key; missing or damaged result files are left out."""
    results = {}
    for trial in plan_trials(plan):
        result = read_result(run_dir, trial)
        if result is not None:
            results[trial["key"]] = result
    return results


class Progress:
    """Done / running / failed across trials, with tqdm's time estimate on a terminal."""

    def __init__(self, total: int, quiet: bool, echo: Callable[[str], None]) -> None:
        import sys

        from tqdm import tqdm

        self.echo = echo
        self.quiet = quiet
        self.running = 0
        self.failed = 0
        self.bar = tqdm(total=total, desc="trials", unit="trial", file=sys.stderr,
                        disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True)

    def start(self, trial: dict) -> None:
        self.running += 1
        self.bar.set_postfix(running=self.running, failed=self.failed)

    def done(self, result: dict) -> None:
        self.running -= 1
        if result["status"] == "done":
            line = (f"done   {result['config']} seed {result['seed']}: test accuracy "
                    f"{result['test']['accuracy']:.4f} ({result['wall_time_s']:.0f} s)")
        else:
            self.failed += 1
            line = f"FAILED {result['config']} seed {result['seed']}: {result['error']}"
        if self.quiet:
            pass
        elif self.bar.disable:  # no terminal: plain lines, e.g. into a log
            self.echo(line)
        else:
            self.bar.write(line)  # above the bar, which stays at the bottom
        self.bar.set_postfix(running=self.running, failed=self.failed)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def execute(run_dir: Path, plan: dict, data: FashionMNIST, engine: str = "local",
            address: str | None = None, workers: int | None = None, quiet: bool = False,
            echo: Callable[[str], None] = print) -> dict:
    """Run every trial of the plan that has not finished, then finalize the run folder.

    data: the data set, loaded and validated by the caller before any worker starts.
    """
    started = time.perf_counter()
    options = plan["options"]
    options = {**options, "data_dir": str(data.folder.resolve())}
    finished = {key for key, r in read_results(run_dir, plan).items() if r.get("status") == "done"}
    todo = [t for t in plan_trials(plan) if t["key"] not in finished]
    # Longest trials first, so that the last worker to finish is not left with a 20-epoch trial.
    todo.sort(key=lambda t: -total_epochs(Recipe(**t["recipe"])))
    workers = max(1, min(workers or default_workers(options["device"]), len(todo) or 1))
    if not quiet and finished:
        echo(f"resuming {run_dir}: {len(finished)} trial(s) done, {len(todo)} to run")
    progress = Progress(len(todo), quiet, echo)
    try:
        if engine == "ray":
            run_ray(todo, run_dir, options, address, workers, data, progress.start, progress.done)
        else:
            run_local(todo, run_dir, options, workers, progress.start, progress.done)
    finally:
        progress.close()
        plan["elapsed_s"] = plan.get("elapsed_s", 0.0) + time.perf_counter() - started
        files.write_json(run_dir / "run.json", plan)
    return finalize(run_dir, data.checksums, str(data.folder))


def _metrics_rows(results: dict[str, dict]) -> list[list]:
    rows = []
    for result in results.values():
        if result.get("status") != "done":
            continue
        for row in result["history"]:
            rows.append([result["config"], result["variant"], result["seed"], row["epoch"],
                         row["split"], f"{row['loss']:.6f}", f"{row['accuracy']:.6f}"])
    return rows


def _final(result: dict, split: str) -> float:
    last = max(row["epoch"] for row in result["history"])
    return next(r["accuracy"] for r in result["history"]
                if r["epoch"] == last and r["split"] == split)


def summarize_configs(plan: dict, results: dict[str, dict]) -> list[dict]:
    """Per configuration: final accuracies over seeds (mean, std, 95% CI), failures, best seed."""
    summaries = []
    for entry in plan["configs"]:
        name = entry["name"]
        mine = [results.get(f"{name}__seed{seed}") for seed in plan["seeds"]]
        done = [r for r in mine if r and r.get("status") == "done"]
        failed = [{"seed": r["seed"], "error": r["error"]}
                  for r in mine if r and r.get("status") == "failed"]
        summary = {"name": name, "variant": entry["recipe"]["name"], "recipe": entry["recipe"],
                   "seeds": plan["seeds"], "completed_seeds": [r["seed"] for r in done],
                   "final": None, "best_seed": None, "per_class_test_accuracy": {},
                   "confusion_matrix": {}, "failed": failed}
        if done:
            summary["final"] = {
                split: {**summarize([_final(r, split) for r in done]),
                        "values": {str(r["seed"]): _final(r, split) for r in done}}
                for split in SPLITS
            }
            summary["best_seed"] = max(done, key=lambda r: _final(r, "test"))["seed"]
            summary["per_class_test_accuracy"] = {
                str(r["seed"]): r["test"]["per_class_accuracy"] for r in done}
            summary["confusion_matrix"] = {str(r["seed"]): r["test"]["confusion_matrix"] for r in done}
        summaries.append(summary)
    return summaries


def compare(configs: list[dict], reference: str | None) -> list[dict]:
    """Each configuration against the reference, paired by seed, on final test accuracy."""
    ref = next((c for c in configs if c["name"] == reference and c["final"]), None)
    if ref is None:
        return []
    comparisons = []
    for config in configs:
        if config is ref or not config["final"]:
            continue
        diff = paired_difference(config["final"]["test"]["values"], ref["final"]["test"]["values"])
        if diff is not None:
            comparisons.append({"name": config["name"], "reference": reference, **diff})
    return comparisons


def _copy_best_weights(run_dir: Path, configs: list[dict]) -> None:
    """The best seed's weights of each configuration at models/<original name>, for the old snippets."""
    for config in configs:
        if config["best_seed"] is None:
            continue
        source = run_dir / "models" / f"seed{config['best_seed']}" / file_name(config["name"])
        for suffix in (".pth", ".json"):
            try:
                content = source.with_suffix(suffix).read_bytes()
            except OSError as exc:
                raise RunDirError(f"{source.with_suffix(suffix)}: cannot read the best seed's "
                                  f"weights ({exc.strerror})") from None
            files.atomic_write(run_dir / "models" / source.with_suffix(suffix).name,
                               lambda handle, c=content: handle.write(c), binary=True)


def finalize(run_dir: Path, checksums: dict[str, str], data_folder: str) -> dict:
    """Aggregate the recorded trials into metrics.csv, summary.json, best weights and report."""
    from .report import render_report

    plan = load_plan(run_dir)
    results = read_results(run_dir, plan)
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(METRICS_HEADER)
    writer.writerows(_metrics_rows(results))
    files.write_text(run_dir / "metrics.csv", buffer.getvalue())

    configs = summarize_configs(plan, results)
    finished = [c for c in configs if c["final"]]
    best = max(finished, key=lambda c: c["final"]["test"]["mean"], default=None)
    summary = {
        "lenetlab_version": plan["lenetlab_version"], "kind": plan["kind"], "name": plan["name"],
        "created": plan["created"], "wall_time_s": plan.get("elapsed_s", 0.0),
        "config": {"seeds": plan["seeds"], **plan["options"]},
        "data": {"folder": data_folder, "sha256": checksums},
        "versions": library_versions(), "machine": machine_info(plan["options"]["device"]),
        "reference": plan.get("reference"),
        "configs": configs,
        "comparisons": compare(configs, plan.get("reference")),
        "best": {"name": best["name"], "seed": best["best_seed"]} if best else None,
    }
    files.write_json(run_dir / "summary.json", summary)
    _copy_best_weights(run_dir, configs)
    render_report(run_dir)
    return summary


def study_configs(variants: list[str], epochs_scale: float, warm_start: bool) -> list[tuple[str, Recipe]]:
    from .recipes import get_recipe, scale_epochs

    return [(name, scale_epochs(get_recipe(name, warm_start), epochs_scale)) for name in variants]

