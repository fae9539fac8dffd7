"""Start or resume a run (a study of the published recipes, or a sweep): plan, run the trials, finalize.

    plan (RunPlan) -> run.json; an engine runs the trials not yet done, each recorded as it
    finishes; finalize() aggregates them into metrics.csv, summary.json, the best seed's
    weights under the original names, the plots, report.md and report.html.

The run folder is held (rundir.hold) from the first write to the last, so two processes
never run the same plan at once.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from . import teaching
from .data import FashionMNIST
from .engines import default_workers, run_trials, usable_cores
from .errors import RunDirError
from .options import DEFAULT_RAY_RETRIES
from .recipes import Recipe, get_recipe, scale_epochs
from .records import RunOptions, Summary, Trial, TrialResult
from .rundir import RunPlan, hold, plan_path, read_plan, read_results, write_plan
from .summary import write_summary
from .training import total_epochs


class Display(Protocol):
    """What a run reports as it goes (the CLI's progress.Progress is one)."""

    def begin(self, todo: int, finished: int) -> None: ...
    def start(self, trial: Trial) -> None: ...
    def done(self, result: TrialResult) -> None: ...
    def note(self, line: str) -> None: ...  # a line of news between trials (a teacher training)


def study_configs(variants: list[str], epochs_scale: float, warm_start: bool) -> list[tuple[str, Recipe]]:
    """The published recipes of variants, their epochs scaled for quick runs."""
    return [(name, scale_epochs(get_recipe(name, warm_start), epochs_scale)) for name in variants]


def new_plan(kind: str, name: str, configs: list[tuple[str, Recipe]], seeds: list[int],
             options: RunOptions, engine: str = "local", workers: int | None = None,
             reference: str | None = None) -> RunPlan:
    """A plan with its workers and threads settled: no more workers than trials (a small run
    still gets every core), and by default the cores shared between the workers. The others
    are compared with reference (default: a configuration named baseline, if any)."""
    workers = min(workers or default_workers(options.device), len(configs) * len(seeds))
    if options.threads is None:
        options = replace(options, threads=max(1, usable_cores() // workers))
    reference = reference or next((n for n, _ in configs if n == "baseline"), None)
    return RunPlan(kind, name, configs, seeds, options, reference, engine, workers)


def start(run_dir: Path, plan: RunPlan, data: FashionMNIST, address: str | None = None,
          display: Display | None = None, ray_retries: int = DEFAULT_RAY_RETRIES) -> Summary:
    """Create the run folder's plan and run it. data: loaded and checked by the caller."""
    with hold(run_dir):
        if plan_path(run_dir).exists():
            raise RunDirError(f"{run_dir}: already holds a run (resume it with: lenetlab resume "
                              f"{shlex.quote(str(run_dir))}, or choose another --name)")
        write_plan(run_dir, plan)
        return execute(run_dir, plan, data, address, plan.workers, display, ray_retries)


def resume(run_dir: Path, data: FashionMNIST, engine: str | None = None, address: str | None = None,
           workers: int | None = None, display: Display | None = None,
           ray_retries: int = DEFAULT_RAY_RETRIES) -> Summary:
    """Finish an interrupted run as planned: skip the trials that finished, rerun the others."""
    with hold(run_dir):
        plan = read_plan(run_dir)
        if engine:
            plan.engine = engine
        return execute(run_dir, plan, data, address, workers or plan.workers, display, ray_retries)


def execute(run_dir: Path, plan: RunPlan, data: FashionMNIST, address: str | None, workers: int,
            display: Display | None = None, ray_retries: int = DEFAULT_RAY_RETRIES) -> Summary:
    """Run every trial of the plan that has not finished, then finalize the run folder."""
    finished = {key for key, r in read_results(run_dir, plan).items() if r.done}
    # Longest trials first, so that the last worker to finish is not left with a 20-epoch trial.
    todo = sorted((t for t in plan.trials() if t.key not in finished),
                  key=lambda t: -total_epochs(t.recipe))
    workers = max(1, min(workers, len(todo) or 1))
    started, elapsed = time.perf_counter(), plan.elapsed_s
    if display:
        display.begin(len(todo), len(finished))

    def start_one(trial: Trial) -> None:
        if display:
            display.start(trial)

    def record_elapsed() -> None:
        plan.elapsed_s = elapsed + time.perf_counter() - started
        write_plan(run_dir, plan)

    def done(result: TrialResult) -> None:
        record_elapsed()  # after every trial, so that a kill loses no finished time
        if display:
            display.done(result)

    def teach(trials: list[Trial], folder: Path) -> None:  # not on the display: its count is the plan's
        run_trials(plan.engine, trials, plan.run_id, folder, plan.options, data, min(workers, len(trials)),
                   lambda trial: None, lambda result: record_elapsed(), address, ray_retries)

    # the teachers of distilling recipes first, each once for the whole run
    teaching.prepare(run_dir, [t.recipe for t in todo], plan.run_id, plan.options, data, teach,
                     display.note if display else None)
    run_trials(plan.engine, todo, plan.run_id, run_dir, plan.options, data, workers, start_one, done, address,
               ray_retries)
    record_elapsed()
    return finalize(run_dir, plan, data)


def finalize(run_dir: Path, plan: RunPlan, data: FashionMNIST) -> Summary:
    """Aggregate the recorded trials into metrics.csv, summary.json, best weights and the report."""
    # Imported here: the report's plots bring matplotlib, which only a finished run needs.
    from .report import render_report

    summary, curves = write_summary(run_dir, plan, read_results(run_dir, plan), data.checksums,
                                    str(data.folder))
    render_report(run_dir, summary, curves)
    return summary
