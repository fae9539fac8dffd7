"""A search in MLflow: a parent run for the search and its confirmation, a nested run per search trial.

As tracking.py does for a study: the run folder stays the source of truth, runs are found again
by their tags (the run's id, the trial's key), so a resumed search or `lenetlab log-mlflow` on a
search's folder continues the same MLflow runs. A trial's run holds its searched fields as
params, its validation accuracy per epoch, and how it ended (FINISHED, or KILLED with the tag
state=pruned, or FAILED). A failure of the store ends the logging, never the search.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from .. import tracking
from ..errors import OutputError, RunDirError
from ..records import Summary, Trial, TrialResult
from ..rundir import read_result
from ..tunerecords import TunePlan, TuneSummary, read_tune_plan, read_tune_summary, summary_path

STATUS = {"done": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}


class TuneLog:
    """The search's MLflow runs: found by their tags, created when missing."""

    def __init__(self, uri: str, run_dir: Path, plan: TunePlan) -> None:
        self.uri, self.run_dir, self.plan = uri, Path(run_dir), plan
        self.client = tracking.client(uri)
        self.experiment_id = tracking.experiment(self.client, plan.name)
        self.trials: dict[str, tuple[str, str]] = {}  # key -> (MLflow run id, status)
        parent = None
        for run in tracking.search(self.client, self.experiment_id,
                                   f"tags.`{tracking.RUN_ID_TAG}` = '{plan.run_id}'"):
            key = run.data.tags.get(tracking.TRIAL_TAG)
            if key is None:
                parent = parent or run
            else:
                self.trials.setdefault(key, (run.info.run_id, run.info.status))
        if parent is None:
            parent = self.client.create_run(self.experiment_id, run_name=plan.name, tags={
                tracking.RUN_ID_TAG: plan.run_id, "run_dir": str(self.run_dir.resolve()),
                "lenetlab.kind": "tune", "lenetlab.version": plan.lenetlab_version})
            spec = plan.spec
            tracking._log(self.client, parent.info.run_id, params={
                "kind": "tune", "variant": spec.variant, "searched": ",".join(spec.space),
                "trials": spec.trials, "pruner": spec.pruner, "sampler_seed": spec.seed,
                "trial_seed": spec.trial_seed, "confirm_seeds": ",".join(map(str, spec.confirm_seeds)),
                **{f"fixed.{k}": v for k, v in spec.fixed.items()}})
        else:
            self.client.update_run(parent.info.run_id, status="RUNNING")
        self.parent_id = parent.info.run_id

    def start_trial(self, trial: Trial) -> None:
        if trial.key not in self.trials:
            created = self.client.create_run(self.experiment_id, run_name=trial.config, tags={
                tracking.RUN_ID_TAG: self.plan.run_id, tracking.TRIAL_TAG: trial.key,
                "mlflow.parentRunId": self.parent_id, "run_dir": str(self.run_dir.resolve())})
            self.trials[trial.key] = (created.info.run_id, "RUNNING")

    def log_trial(self, result: TrialResult) -> None:
        """A recorded trial's fields, epochs and end; nothing to do when it is logged already."""
        from mlflow.entities import Metric

        status = STATUS[result.status]
        if self.trials.get(result.trial.key, ("", ""))[1] == status:
            return
        self.start_trial(result.trial)
        run_id = self.trials[result.trial.key][0]
        now = int(time.time() * 1000)
        metrics = [Metric(f"{row.split}_{measure}", float(getattr(row, measure)), now, row.epoch)
                   for row in result.history for measure in ("loss", "accuracy")]
        if result.done:
            metrics.append(Metric("kept_val_accuracy", result.final("val"), now, result.kept_epoch))
        params = {key: getattr(result.trial.recipe, key) for key in self.plan.spec.space}
        tags = {"state": result.status, **({"error": tracking._clip(result.error)} if result.error else {})}
        tracking._log(self.client, run_id, params=params, tags=tags, metrics=metrics)
        self.client.set_terminated(run_id, status)
        self.trials[result.trial.key] = (run_id, status)

    def finish(self, summary: TuneSummary, confirmation: Summary) -> None:
        """Every recorded trial not logged yet, then the search's files and its result on the parent."""
        from mlflow.entities import Metric

        spec = self.plan.spec
        for row in summary.trials:
            trial = Trial(f"trial{row.number}", spec.recipe(row.params), spec.trial_seed)
            result = read_result(self.run_dir, trial, self.plan.run_id, search=True)
            if result is not None:
                self.log_trial(result)
        for name in ("tune.json", "best.toml", "report.md", "report.html"):
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.parent_id, str(self.run_dir / name))
        self.client.log_artifacts(self.parent_id, str(self.run_dir / "plots"), "plots")
        now = int(time.time() * 1000)
        metrics = {"trials": len(summary.trials), "trials_pruned": summary.count("pruned"),
                   "trials_failed": summary.count("failed"), "best_val_accuracy": summary.best_row.value}
        for config in confirmation.configs:
            if config.final:
                metrics[f"confirmed_test_accuracy.{config.name}"] = config.final["test"].mean
        for c in confirmation.comparisons:
            metrics["confirmed_difference"] = c.mean_diff
        tracking._log(self.client, self.parent_id, params={f"best.{k}": v for k, v in
                                                           summary.best_row.params.items()},
                      metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        self.client.set_terminated(self.parent_id, "FINISHED")

    def stop(self, status: str, running: set[str]) -> None:
        for key in running:
            if key in self.trials:
                self.client.set_terminated(self.trials[key][0], status)
        self.client.set_terminated(self.parent_id, status)

    def described(self) -> str:
        return (f"mlflow: experiment {self.plan.name!r}: the search and {len(self.trials)} trial run(s); "
                f"see them with: {tracking.where_to_look(self.uri, self.experiment_id, self.parent_id)}")


class TuneTracker(tracking.Tracker):
    """Logs a search live: tracking.Tracker's handling of a failing store, with TuneLog's runs.
    tuning/run.py calls begin(plan), start, done, then finish(summary, confirmation); the
    command calls close if the search stops."""

    def _open(self) -> None:
        self.log = TuneLog(self.uri, self.run_dir, read_tune_plan(self.run_dir))

    def begin(self, plan: TunePlan) -> None:  # type: ignore[override]
        if self.echo:
            self.echo(f"mlflow: logging to {self.uri}, experiment {plan.name!r}")
        self._try(self._open)

    def finish(self, summary: TuneSummary, confirmation: Summary) -> None:  # type: ignore[override]
        if self.problem is not None or self.log is None:  # tried again from the start, once
            self.problem = None
            self._try(self._open)
        self._try(lambda: self.log.finish(summary, confirmation))
        if self.problem is None:
            print(self.log.described())
        else:
            print(f"lenetlab: warning: could not log to MLflow at {self.uri} ({self.problem}); the run "
                  f"folder is complete, log it later with: lenetlab log-mlflow "
                  f"{shlex.quote(str(self.run_dir))} {self.option}", file=sys.stderr)


def log_tune_dir(uri: str | None, run_dir: Path) -> str:
    """Log a finished search's folder as live logging would have (what is logged already is kept)."""
    from ..summary import load_summary

    uri, run_dir = tracking.resolve_uri(uri), Path(run_dir)
    plan = read_tune_plan(run_dir)
    if not summary_path(run_dir).is_file():
        raise RunDirError(f"{run_dir}: not finished (no tune.json); finish and log it with: "
                          f"lenetlab resume {shlex.quote(str(run_dir))} --mlflow {shlex.quote(uri)}")
    summary, confirmation = read_tune_summary(run_dir), load_summary(run_dir / "confirm")
    try:
        log = TuneLog(uri, run_dir, plan)
        log.finish(summary, confirmation)
    except Exception as exc:
        raise OutputError(f"could not log {run_dir} to MLflow at {uri} ({tracking.reason(exc)})") from None
    return log.described()
