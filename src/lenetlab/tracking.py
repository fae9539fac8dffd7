"""MLflow tracking: a run folder's study or sweep and its trials, and `train`'s weights, as MLflow runs.

The run folder stays the source of truth; MLflow is a view onto it. One experiment per run
folder name holds a parent run for the study or sweep (its options, summary files and plots)
and a nested run per trial (its recipe and seed, each split's loss and accuracy per epoch, its
weights). Runs are found again by their tags (the run's id and the trial's key), so a resumed
run, or a run folder logged again with `lenetlab log-mlflow`, continues the same MLflow runs.
Tracker logs a run live, as a runner.Display. mlflow is imported only here, and only when
something is logged: it is an optional extra.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import files
from .errors import OptionError, OutputError, RunDirError, SpecError, WeightsError
from .recipes import recipe_from_dict
from .records import EpochMetrics, Trial, TrialResult
from .rundir import RunPlan, read_plan
from .summary import load_summary

TRAIN_EXPERIMENT = "lenetlab-train"  # `lenetlab train` has no run folder to name one after
RUN_ID_TAG = "lenetlab.run_id"  # the run folder's run_id, on the parent and every trial run
TRIAL_TAG = "lenetlab.trial"  # the trial's key (config__seedN), on trial runs only
SHA_TAG = "lenetlab.weights_sha256"  # the logged weights: a trial trained anew gets a new run
PARAM_LIMIT = 500  # characters: what every MLflow server accepts in a param value
BATCH = 900  # metrics per log_batch call (MLflow takes at most 1,000 entries)

# Unless the user says otherwise, an unreachable server is given up on in seconds, not minutes:
# the run is tried once more at its end, and `lenetlab log-mlflow` can log it later.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def require_extra(what: str | None = None) -> None:
    """The install line when mlflow is not installed (checked before any work): a SpecError
    naming what needs it, else an OptionError naming the mlflow option."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        if what is None:
            raise OptionError("mlflow", "{option} needs the mlflow extra: "
                                        "pip install 'lenetlab[mlflow]'") from None
        raise SpecError(f"{what} needs the mlflow extra: pip install 'lenetlab[mlflow]'") from None


def resolve_uri(given: str | None) -> str:
    """--mlflow URI, else $MLFLOW_TRACKING_URI, else an SQLite file in the working directory."""
    return given or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def client(uri: str):
    """An MlflowClient for uri, quiet (no INFO lines while an SQLite store is created)."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def reason(exc: BaseException) -> str:
    """A short account of why MLflow refused: the OS error when there is one, else the first line."""
    text = str(exc).strip() or type(exc).__name__
    found = re.search(r"\[Errno -?\d+\][^'\")\]]+", text)
    return found.group(0).strip() if found else _clip(text.splitlines()[0], 160)


def _clip(text, limit: int = PARAM_LIMIT) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def where_to_look(uri: str, experiment_id: str, run_id: str) -> str:
    """How to see a logged run: a link on a server, the `mlflow ui` command for a local store."""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    if uri.startswith("sqlite:") or "://" not in uri:
        return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"
    return f"run {run_id} at {uri}"



def trial_params(trial: Trial) -> dict[str, str]:
    """The recipe fields (its name as `variant`), the configuration and the seed."""
    recipe = asdict(trial.recipe)
    return {"variant": recipe.pop("name"), **recipe, "config": trial.config, "seed": trial.seed}


def trial_tags(trial: Trial) -> dict[str, str]:
    return {"config": trial.config, "variant": trial.recipe.name, "seed": str(trial.seed)}


def _log(mlflow_client, run_id: str, params: dict | None = None, tags: dict | None = None,
         metrics: list = ()) -> None:
    from mlflow.entities import Param, RunTag

    params = [Param(key, _clip(value)) for key, value in (params or {}).items()]
    tags = [RunTag(key, str(value)) for key, value in (tags or {}).items()]
    if params or tags:
        mlflow_client.log_batch(run_id, params=params, tags=tags)
    for first in range(0, len(metrics), BATCH):
        mlflow_client.log_batch(run_id, metrics=metrics[first:first + BATCH])


def _log_training(mlflow_client, run_id: str, weights: Path, history: list[EpochMetrics],
                  test_accuracy: float, wall_time_s: float, kept_epoch: int | None, test_flip: float | None,
                  **params_or_tags) -> None:
    """A trained trial: <split>_loss and <split>_accuracy per epoch (step = epoch); the kept
    model's test accuracy (at the kept epoch's step), the kept epoch, the flip-averaged test
    accuracy if measured and the wall time as metrics; the weights with their sidecar as artifacts."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    last = max((row.epoch for row in history), default=0)
    kept = last if kept_epoch is None else kept_epoch  # results from before checkpoint choice
    metrics = [Metric(f"{row.split}_{measure}", float(getattr(row, measure)), now, row.epoch)
               for row in history for measure in ("loss", "accuracy")]
    metrics += [Metric("final_test_accuracy", float(test_accuracy), now, kept),
                Metric("kept_epoch", float(kept), now, kept),
                Metric("wall_time_s", float(wall_time_s), now, last)]
    if test_flip is not None:
        metrics.append(Metric("final_test_accuracy_flip_averaged", float(test_flip), now, kept))
    _log(mlflow_client, run_id, metrics=metrics, **params_or_tags)
    for path in (weights, weights.with_suffix(".json")):
        mlflow_client.log_artifact(run_id, str(path), "weights")


def experiment(mlflow_client, name: str) -> str:
    """The id of the experiment called name, created (or restored from the bin) when needed."""
    found = mlflow_client.get_experiment_by_name(name)
    if found is None:
        return mlflow_client.create_experiment(name)
    if found.lifecycle_stage == "deleted":
        mlflow_client.restore_experiment(found.experiment_id)
    return found.experiment_id


def search(mlflow_client, experiment_id: str, filter_string: str) -> list:
    """Every active run of the experiment matching filter_string (up to MLflow's 50,000), oldest first."""
    return mlflow_client.search_runs([experiment_id], filter_string, max_results=50000,
                                     order_by=["attributes.start_time ASC"])


@dataclass
class _Logged:
    """What this process knows of one trial's MLflow run."""

    run_id: str
    status: str
    tags: dict[str, str] = field(default_factory=dict)
    has_metrics: bool = False


class RunLog:
    """A run folder's MLflow runs: the parent run and a nested run per trial, found by their tags."""

    def __init__(self, uri: str, run_dir: Path, plan: RunPlan) -> None:
        self.uri, self.run_dir, self.plan = uri, Path(run_dir), plan
        self.client = client(uri)
        self.experiment_id = experiment(self.client, plan.name)
        self.trials: dict[str, _Logged] = {}
        parent = None
        for run in search(self.client, self.experiment_id, f"tags.`{RUN_ID_TAG}` = '{plan.run_id}'"):
            key = run.data.tags.get(TRIAL_TAG)
            if key is None:
                parent = parent or run
            elif key not in self.trials:
                self.trials[key] = _Logged(run.info.run_id, run.info.status, dict(run.data.tags),
                                           bool(run.data.metrics))
        if parent is None:
            tags = {RUN_ID_TAG: plan.run_id, "run_dir": str(self.run_dir.resolve()),
                    "lenetlab.kind": plan.kind, "lenetlab.version": plan.lenetlab_version}
            parent = self.client.create_run(self.experiment_id, run_name=plan.name, tags=tags)
            _log(self.client, parent.info.run_id, params={
                "kind": plan.kind, "configs": ",".join(name for name, _ in plan.configs),
                "seeds": ",".join(map(str, plan.seeds)), "reference": plan.reference, **asdict(plan.options)})
        else:
            self.client.update_run(parent.info.run_id, status="RUNNING")
        self.parent_id = parent.info.run_id
        self.parent_metrics = dict(parent.data.metrics)

    @property
    def complete(self) -> set[str]:
        """The trials whose run holds their final result (FINISHED or FAILED)."""
        return {key for key, run in self.trials.items() if run.status in ("FINISHED", "FAILED")}

    def _fresh(self, trial: Trial) -> _Logged:
        """The trial's run to log a new training into: the same one, unless it already holds
        metrics of an earlier training (its files were damaged and it trained again)."""
        run = self.trials.get(trial.key)
        if run is not None and run.has_metrics:
            self.client.delete_run(run.run_id)
            run = None
        if run is None:
            tags = {RUN_ID_TAG: self.plan.run_id, TRIAL_TAG: trial.key, **trial_tags(trial),
                    "run_dir": str(self.run_dir.resolve()), "mlflow.parentRunId": self.parent_id}
            created = self.client.create_run(self.experiment_id, run_name=trial.key, tags=tags)
            run = self.trials[trial.key] = _Logged(created.info.run_id, created.info.status)
        # every time: a run whose creation was cut short may lack them (the same values are accepted)
        _log(self.client, run.run_id, params=trial_params(trial))
        return run

    def start_trial(self, trial: Trial) -> None:
        run = self._fresh(trial)
        if run.status != "RUNNING":
            self.client.update_run(run.run_id, status="RUNNING")
            run.status = "RUNNING"

    def log_trial(self, result: TrialResult) -> None:
        """Log a recorded result into its trial's run; nothing to do when it is logged already."""
        run = self.trials.get(result.trial.key)
        status, tag, value = (("FINISHED", SHA_TAG, result.weights_sha256) if result.done
                              else ("FAILED", "error", _clip(result.error or "failed")))
        if run is not None and run.status == status and run.tags.get(tag) == value:
            return
        run = self._fresh(result.trial)
        if result.done:
            tags = {SHA_TAG: result.weights_sha256, "weights": result.weights, "kernels": result.kernels}
            _log_training(self.client, run.run_id, self.run_dir / result.weights, result.history,
                          result.test.accuracy, result.wall_time_s, result.kept_epoch, result.test_flip,
                          tags=tags)
            run.has_metrics, run.tags = True, {**run.tags, **tags}
            if run.tags.pop("error", None) is not None:
                self.client.delete_tag(run.run_id, "error")
        else:
            self.client.set_tag(run.run_id, "error", value)
            run.tags["error"] = value
        self.client.set_terminated(run.run_id, status)
        run.status = status

    def finish(self) -> None:
        """After finalize: every recorded trial MLflow does not hold yet, then the summary's files
        as the parent's artifacts and its counts as metrics."""
        from mlflow.entities import Metric

        from .runner import read_results

        results = read_results(self.run_dir, self.plan)
        for trial in self.plan.trials():
            if trial.key in results:
                self.log_trial(results[trial.key])
        summary = load_summary(self.run_dir)
        for name in ("summary.json", "metrics.csv", "report.md", "report.html"):
            if (self.run_dir / name).is_file():  # report.html: not in run folders older than it
                self.client.log_artifact(self.parent_id, str(self.run_dir / name))
        if (self.run_dir / "plots").is_dir():
            self.client.log_artifacts(self.parent_id, str(self.run_dir / "plots"), "plots")
        failed = summary.failed_count
        counts = {"trials_done": summary.done_count, "trials_failed": failed}
        best = summary.best_config
        if best:
            counts["best_test_accuracy"] = best.final["test"].mean
            self.client.set_tag(self.parent_id, "best", best.name)
        now = int(time.time() * 1000)
        changed = [Metric(k, float(v), now, 0) for k, v in counts.items() if self.parent_metrics.get(k) != v]
        _log(self.client, self.parent_id, metrics=changed)
        self.parent_metrics.update(counts)
        self.client.set_terminated(self.parent_id, "FAILED" if failed else "FINISHED")

    def stop(self, status: str, trials: set[str]) -> None:
        """The run stopped midway (interrupted, an error): mark the parent and running trials."""
        for key in trials:  # each started here, with no failure since (see Tracker._try)
            self.client.set_terminated(self.trials[key].run_id, status)
        self.client.set_terminated(self.parent_id, status)

    def described(self) -> str:
        return (f"mlflow: experiment {self.plan.name!r}: the {self.plan.kind} and {len(self.complete)} trial "
                f"run(s); see them with: {where_to_look(self.uri, self.experiment_id, self.parent_id)}")



class Tracker:
    """Logs a run as runner.execute reports it (a runner.Display), then its summary (finish) or how
    it stopped (close). A failure of the store ends the logging, never the run: finish tries the
    whole run once more, and if that fails too, one line says what is missing and how to log it later."""

    def __init__(self, uri: str | None, run_dir: Path, echo: Callable[[str], None] | None = None) -> None:
        self.uri, self.run_dir, self.echo = resolve_uri(uri), Path(run_dir), echo
        self.log: RunLog | None = None
        self.problem: str | None = None
        self.running: set[str] = set()
        self.option = f"--mlflow {shlex.quote(self.uri)}"  # for the lines that tell how to go on

    def _try(self, action: Callable[[], None]) -> None:
        if self.problem is not None:
            return
        try:
            action()
        except Exception as exc:  # the store's problem must not stop the run
            self.problem = reason(exc)

    def _open(self) -> None:
        self.log = RunLog(self.uri, self.run_dir, read_plan(self.run_dir))

    def begin(self, todo: int, finished: int) -> None:
        if self.echo:  # before the store is opened, which can take seconds
            self.echo(f"mlflow: logging to {self.uri}, experiment {read_plan(self.run_dir).name!r}")
        self._try(self._open)

    def start(self, trial: Trial) -> None:
        self.running.add(trial.key)
        self._try(lambda: self.log.start_trial(trial))

    def done(self, result: TrialResult) -> None:
        self.running.discard(result.trial.key)
        self._try(lambda: self.log.log_trial(result))

    def note(self, line: str) -> None:  # the progress display shows it
        pass

    def finish(self) -> None:
        """After finalize: every recorded trial and the summary, tried again once after a failure."""
        from .runner import read_results

        if self.problem is not None or self.log is None:  # tried again from the start, once
            self.problem = None
            self._try(self._open)
        self._try(lambda: self.log.finish())
        if self.problem is None:
            print(self.log.described())
            return
        plan = read_plan(self.run_dir)
        recorded = set(read_results(self.run_dir, plan))
        missing = recorded - (self.log.complete if self.log else set())
        print(f"lenetlab: warning: could not log to MLflow at {self.uri} ({self.problem}); not in MLflow: "
              f"the {plan.kind}'s summary and {len(missing)} of {len(recorded)} trial(s); the run folder "
              f"is complete, log it later with: lenetlab log-mlflow {shlex.quote(str(self.run_dir))} "
              f"{self.option}", file=sys.stderr)

    def close(self, status: str = "KILLED") -> None:
        """The run stopped before it finished: mark the MLflow runs, say once if logging failed."""
        if self.log is not None:
            self._try(lambda: self.log.stop(status, self.running))
        if self.problem is not None:
            print(f"lenetlab: warning: could not log to MLflow at {self.uri} ({self.problem}); resuming "
                  f"with {self.option} logs the whole run", file=sys.stderr)



def log_run_dir(uri: str | None, run_dir: Path) -> str:
    """Log a finished run folder as live logging would have (what is logged already is kept)."""
    from .summary import read_summary

    uri, run_dir = resolve_uri(uri), Path(run_dir)
    plan = read_plan(run_dir)
    if not (run_dir / "summary.json").is_file():
        raise RunDirError(f"{run_dir}: not finished (no summary.json); finish and log it with: "
                          f"lenetlab resume {shlex.quote(str(run_dir))} --mlflow {shlex.quote(uri)}")
    read_summary(run_dir)  # a damaged folder is refused, as `lenetlab report` refuses it
    try:
        log = RunLog(uri, run_dir, plan)
        log.finish()
    except Exception as exc:
        raise OutputError(f"could not log {run_dir} to MLflow at {uri} ({reason(exc)})") from None
    return log.described()


def read_sidecar(weights: Path) -> tuple[Trial, list[EpochMetrics], dict]:
    """The trial, epochs and JSON sidecar that lenetlab wrote beside a weights file."""
    weights, sidecar = Path(weights), Path(weights).with_suffix(".json")
    if not weights.exists():
        raise WeightsError(f"{weights}: no such run folder or weights file")
    if weights.suffix != ".pth" or not weights.is_file():
        raise WeightsError(f"{weights}: expected a run folder or a .pth weights file that lenetlab saved")
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        trial = Trial(record["config"], recipe_from_dict(record["recipe"]), int(record["seed"]))
        history = [EpochMetrics(**row) for row in record["metrics"]]
        float(record["test_accuracy"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise WeightsError(f"{sidecar}: not the sidecar lenetlab writes beside weights "
                           f"({type(exc).__name__}: {reason(exc)})") from None
    return trial, history, record


def log_weights(uri: str | None, weights: Path) -> str:
    """`lenetlab log-mlflow WEIGHTS.pth`: one run for weights `lenetlab train` saved (experiment
    lenetlab-train), found again by the weights' SHA-256; the line that says where to see it.
    WeightsError for a file that is not lenetlab's, OutputError when the store fails."""
    from .model import load_weights

    uri, weights = resolve_uri(uri), Path(weights)
    trial, history, record = read_sidecar(weights)
    load_weights(weights)  # what is uploaded is a LeNet5V1 state_dict, read without running any code
    digest = files.sha256_file(weights)
    try:
        mlflow_client = client(uri)
        experiment_id = experiment(mlflow_client, TRAIN_EXPERIMENT)
        for run in search(mlflow_client, experiment_id, f"tags.`{SHA_TAG}` = '{digest}'"):
            if run.info.status == "FINISHED":
                break  # logged already
            mlflow_client.delete_run(run.info.run_id)  # an attempt cut short: log it whole again
        else:
            tags = {**trial_tags(trial), "weights": str(weights.resolve()), SHA_TAG: digest,
                    "kernels": record.get("kernels")}
            run = mlflow_client.create_run(experiment_id, run_name=trial.key, tags=tags)
            options = {key: record.get(key) for key in ("split_seed", "train_subset", "threads")}
            _log_training(mlflow_client, run.info.run_id, weights, history, record["test_accuracy"],
                          record.get("wall_time_s", 0.0), record.get("kept_epoch"),
                          record.get("test_accuracy_flip_averaged"),
                          params={**trial_params(trial), **options})
            mlflow_client.set_terminated(run.info.run_id, "FINISHED")
    except Exception as exc:
        raise OutputError(f"could not log to MLflow at {uri} ({reason(exc)})") from None
    return (f"mlflow: experiment {TRAIN_EXPERIMENT!r}: see it with: "
            f"{where_to_look(uri, experiment_id, run.info.run_id)}")


def log_trained(uri: str | None, weights: Path) -> None:
    """After `lenetlab train --mlflow`: log the saved weights; a store's failure is one warning."""
    uri = resolve_uri(uri)
    try:
        print(log_weights(uri, weights))
    except OutputError as exc:
        print(f"lenetlab: warning: {exc}; the weights are saved, log them later with: lenetlab log-mlflow "
              f"{shlex.quote(str(weights))} --mlflow {shlex.quote(uri)}", file=sys.stderr)
