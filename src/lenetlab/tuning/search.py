"""The search: trials asked while the budget and the time last, run on the pool or Ray, told back.

The engines ask Search.trials() for the next trial only when a worker is free, so the sampler
always knows every trial that has ended. A trial an interrupted session left running is run
first (from its checkpoint: the same trial, not a new one), and one whose result was recorded
but not told is told from its record: no trial is lost, run twice or left running. Every search
trial trains from the spec's trial_seed on the training split and is judged on validation; the
splits have no test split.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from .. import teaching
from ..data import FashionMNIST
from ..engines import run_trials
from ..options import DEFAULT_RAY_RETRIES
from ..records import Trial, TrialResult
from ..rundir import read_result
from ..tunerecords import TunePlan, write_tune_plan
from .referee import Referee
from .study import distributions, sampler, trial_name
from .summary import best_trial


@dataclass
class Standing:
    """What the progress line says after each trial."""

    finished: int  # trials ended (complete, pruned or failed), of budget
    budget: int
    pruned: int
    best_value: float | None
    best_number: int | None


class SearchDisplay:
    """One line per ended trial: trial n of N, how it ended, the best so far and the pruned count."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo

    def begin(self, standing: Standing, resumed: int) -> None:
        if standing.finished or resumed:
            self.echo(f"resuming the search: {standing.finished} of {standing.budget} trial(s) ended, "
                      f"{resumed} to finish first")

    def done(self, result: TrialResult, standing: Standing) -> None:
        if result.done:
            how = f"val {result.final('val'):.4f} after {result.kept_epoch} epoch(s)"
        elif result.pruned:
            how = f"pruned after epoch {result.history[-1].epoch} (val {result.final('val'):.4f})"
        else:
            how = f"FAILED: {result.error}"
        best = (f"best val {standing.best_value:.4f} (trial {standing.best_number})"
                if standing.best_value is not None else "best -")
        self.echo(f"{result.trial.config}: {how} | {standing.finished} of {standing.budget} ended, {best}, "
                  f"{standing.pruned} pruned")


class Search:
    """A search's session: its study, its plan, and the clock of its timeout."""

    def __init__(self, run_dir: Path, plan: TunePlan, study: optuna.Study, display: SearchDisplay | None):
        self.run_dir, self.plan, self.study, self.display = run_dir, plan, study, display
        self.spec = plan.spec
        self.started, self.elapsed = time.perf_counter(), plan.elapsed_s

    def _trial(self, number: int, params: dict) -> Trial:
        return Trial(trial_name(number), self.spec.recipe(params), self.spec.trial_seed)

    def standing(self) -> Standing:
        trials = self.study.get_trials(deepcopy=False)
        ended = [t for t in trials if t.state != TrialState.RUNNING]
        best = best_trial(self.study)
        return Standing(len(ended), self.spec.trials, sum(t.state == TrialState.PRUNED for t in trials),
                        best.value if best else None, best.number if best else None)

    def _time_left(self) -> bool:
        spent = self.elapsed + time.perf_counter() - self.started
        return self.spec.timeout is None or spent < self.spec.timeout

    def record_elapsed(self) -> None:
        self.plan.elapsed_s = self.elapsed + time.perf_counter() - self.started
        write_tune_plan(self.run_dir, self.plan)

    def left_running(self) -> list[Trial]:
        """The trials an interrupted session left running, told now if their result was recorded;
        the others, to run again (from their checkpoints)."""
        again = []
        for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            trial = self._trial(frozen.number, frozen.params)
            result = read_result(self.run_dir, trial, self.plan.run_id, search=True)
            if result is not None:
                self.tell(result)
            else:
                again.append(trial)
        return again

    def trials(self, again: list[Trial]) -> Iterator[Trial]:
        """The trials to run: those left running first, then new ones while budget and time last."""
        yield from again
        while len(self.study.get_trials(deepcopy=False)) < self.spec.trials and self._time_left():
            yield self._ask()

    def _ask(self) -> Trial:
        """The next trial: asked of the sampler on a copy of the study in memory, then written to
        the journal whole, as one line (Optuna's own ask writes the trial, then each field: a
        kill between them would leave a trial with some of its fields)."""
        space = distributions(self.spec)
        known = self.study.get_trials(deepcopy=False)
        replica = optuna.create_study(direction="maximize", sampler=sampler(self.spec, len(known)))
        replica.add_trials(known)
        params = replica.ask(space).params
        template = optuna.trial.create_trial(state=TrialState.RUNNING, params=params, distributions=space)
        self.study._storage.create_new_trial(self.study._study_id, template_trial=template)
        return self._trial(len(known), params)

    def tell(self, result: TrialResult) -> None:
        """The study told how a trial ended: its kept model's validation accuracy, pruned, or failed."""
        number = int(result.trial.config.removeprefix("trial"))
        if self.study._storage.get_trial(self._trial_id(number)).state != TrialState.RUNNING:
            return  # told already
        if result.done:
            self.study.tell(number, result.final("val"))
        elif result.pruned:
            self.study.tell(number, state=TrialState.PRUNED)
        else:
            self.study.tell(number, state=TrialState.FAIL)

    def _trial_id(self, number: int) -> int:
        return self.study._storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number)

    def run(self, data: FashionMNIST, address: str | None, workers: int,
            ray_retries: int = DEFAULT_RAY_RETRIES, on_done: Callable[[TrialResult], None] | None = None,
            on_start: Callable[[Trial], None] | None = None) -> None:
        """Run the search to its budget or timeout; each result recorded, told and shown as it ends."""
        again = self.left_running()
        if self.display:
            self.display.begin(self.standing(), len(again))

        def done(result: TrialResult) -> None:
            self.tell(result)
            self.record_elapsed()
            if self.display:
                self.display.done(result, self.standing())
            if on_done:
                on_done(result)

        def start(trial: Trial) -> None:
            if on_start:
                on_start(trial)

        def teach(trials: list[Trial], folder: Path) -> None:  # the teacher's models, before any trial
            run_trials(self.plan.engine, trials, self.plan.run_id, folder, self.plan.options, data,
                       min(workers, len(trials)), lambda trial: None, lambda result: None, address,
                       ray_retries)

        teaching.prepare(self.run_dir, [self.spec.base], self.plan.run_id, self.plan.options, data, teach,
                         self.display.echo if self.display else None)
        referee = Referee(str(self.run_dir), self.spec)
        try:
            run_trials(self.plan.engine, self.trials(again), self.plan.run_id, self.run_dir,
                       self.plan.options, data, workers, start, done, address, ray_retries, referee=referee)
        finally:  # Ctrl-C too: the timeout counts this session (a kill -9 loses what the last trial left)
            self.record_elapsed()
