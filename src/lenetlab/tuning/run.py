"""Start or resume a search: the search, best.toml, the confirmation on the test set, the report.

    runs/NAME/
      run.json          the plan (tunerecords.TunePlan): the spec, the options, the search's time
      search.journal    the Optuna study (tuning/study.py)
      trials/, checkpoints/, models/   each search trial's record, as a sweep's (no test result)
      best.toml         the best trial's recipe beside the spec's variant: a sweep spec
      confirm/          that sweep, run over the spec's confirm_seeds: test accuracy, paired intervals
      tune.json         the search's summary (tunerecords.TuneSummary); report.md, report.html, plots/

The test files are read only once the search has ended, for the confirmation: the search loads
the training files alone (data.load_fashion_mnist(test=False)). The run folder is held
(rundir.hold) from the first write to the last, as a study's is.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .. import files, runner, sweeps
from ..data import FashionMNIST
from ..engines import default_workers, usable_cores
from ..errors import LenetlabError, RunDirError
from ..options import DEFAULT_RAY_RETRIES
from ..recipes import RECIPES
from ..records import RunOptions, Summary
from ..rundir import hold, plan_path
from ..summary import load_summary
from ..tunerecords import (
    BEST,
    BEST_SPEC,
    CONFIRM,
    TunePlan,
    TuneSummary,
    read_tune_plan,
    write_tune_plan,
    write_tune_summary,
)
from ..tunespec import TuneSpec
from .search import Search, SearchDisplay
from .study import open_study, repair
from .summary import best_trial, build_summary

LoadData = Callable[[bool], FashionMNIST]  # test: whether to read the test files too


def new_plan(name: str, spec: TuneSpec, options: RunOptions, engine: str = "local",
             workers: int | None = None) -> TunePlan:
    """A plan with its workers and threads settled, as runner.new_plan settles a sweep's."""
    workers = min(workers or default_workers(options.device), spec.trials)
    if options.threads is None:
        options = replace(options, threads=max(1, usable_cores() // workers))
    return TunePlan(name, spec, options, engine, workers)


def start(run_dir: Path, plan: TunePlan, load_data: LoadData, address: str | None = None,
          echo: Callable[[str], None] = print, display: runner.Display | None = None,
          ray_retries: int = DEFAULT_RAY_RETRIES, tracker=None) -> tuple[TuneSummary, Summary]:
    with hold(run_dir):
        if plan_path(run_dir).exists():
            raise RunDirError(f"{run_dir}: already holds a run (resume it with: lenetlab resume "
                              f"{shlex.quote(str(run_dir))}, or choose another --name)")
        write_tune_plan(run_dir, plan)
        return _execute(run_dir, plan, load_data, address, plan.workers, echo, display, ray_retries, tracker)


def resume(run_dir: Path, load_data: LoadData, engine: str | None = None, address: str | None = None,
           workers: int | None = None, echo: Callable[[str], None] = print,
           display: runner.Display | None = None, ray_retries: int = DEFAULT_RAY_RETRIES,
           tracker=None) -> tuple[TuneSummary, Summary]:
    """Go on with an interrupted search where it stopped, then confirm and report."""
    with hold(run_dir):
        plan = read_tune_plan(run_dir)
        if engine:
            plan.engine = engine
        return _execute(run_dir, plan, load_data, address, workers or plan.workers, echo, display,
                        ray_retries, tracker)


def _execute(run_dir: Path, plan: TunePlan, load_data: LoadData, address: str | None, workers: int,
             echo: Callable[[str], None], display: runner.Display | None, ray_retries: int,
             tracker) -> tuple[TuneSummary, Summary]:
    repair(run_dir)
    study = open_study(run_dir, plan.spec)
    search = Search(run_dir, plan, study, SearchDisplay(echo))
    if tracker:
        tracker.begin(plan)
    search.run(load_data(False), address, workers, ray_retries,
               on_done=tracker.done if tracker else None, on_start=tracker.start if tracker else None)
    best = best_trial(study)
    if best is None:
        raise LenetlabError(f"{run_dir}: no search trial completed (each was pruned or failed), so there is "
                            f"no recipe to confirm; see {run_dir / 'trials'}")
    spec_path = write_best_spec(run_dir, plan, best.params)
    echo(f"search done: best trial {best.number} (val {best.value:.4f}); confirming it beside "
         f"{plan.spec.variant} on seeds {', '.join(map(str, plan.spec.confirm_seeds))}, on the test set")
    confirmation = confirm(run_dir / CONFIRM, spec_path, plan, load_data(True), address, workers, display,
                           ray_retries)
    summary = build_summary(run_dir, plan, study)
    write_tune_summary(run_dir, summary)
    from .report import render_tune_report  # matplotlib: only a finished search needs it

    render_tune_report(run_dir, summary, confirmation)
    if tracker:
        tracker.finish(summary, confirmation)
    return summary, confirmation


def best_spec(plan: TunePlan, params: dict) -> dict:
    """The sweep spec of the confirmation: the best trial's recipe (named best) and the spec's
    variant as published, over confirm_seeds; the variant is the reference."""
    spec = plan.spec
    best = {"variant": spec.variant, "name": BEST, **spec.fixed, **params}
    configs = [best]
    if spec.recipe(params) != RECIPES[spec.variant]:  # a search can end where it started
        configs.append({"variant": spec.variant, "name": spec.variant})
    return {"name": f"{plan.name}-confirm", "seeds": spec.confirm_seeds, "configs": configs,
            "reference": spec.variant if len(configs) > 1 else BEST}


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's


def to_toml(spec: dict) -> str:
    """A sweep spec (top-level values and [[configs]] tables of plain values) as TOML."""
    lines = [f"{key} = {toml_value(value)}" for key, value in spec.items() if key != "configs"]
    for table in spec.get("configs", []):
        lines += ["", "[[configs]]"] + [f"{key} = {toml_value(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


def write_best_spec(run_dir: Path, plan: TunePlan, params: dict) -> Path:
    path = run_dir / BEST_SPEC
    text = ("# The best recipe lenetlab tune found, chosen on validation accuracy, beside the variant\n"
            "# it started from; run it again with: lenetlab sweep best.toml\n"
            + to_toml(best_spec(plan, params)))
    files.write_text(path, text)
    return path


def confirm(confirm_dir: Path, spec_path: Path, plan: TunePlan, data: FashionMNIST, address: str | None,
            workers: int, display: runner.Display | None, ray_retries: int) -> Summary:
    """The confirmation sweep of best.toml inside the run folder: started, resumed or read back."""
    if plan_path(confirm_dir).exists():
        if (confirm_dir / "summary.json").exists():
            summary = load_summary(confirm_dir)
            if not summary.failed_count:
                return summary
        return runner.resume(confirm_dir, data, plan.engine, address, workers, display, ray_retries)
    sweep = sweeps.load_spec(spec_path)
    confirm_plan = runner.new_plan("sweep", CONFIRM, sweep.configs, sweep.seeds,
                                   replace(plan.options, threads=None), plan.engine, workers, sweep.reference)
    return runner.start(confirm_dir, confirm_plan, data, address, display, ray_retries)
