"""The records of a search: its plan (run.json) and, once finished, its summary (tune.json).

Plain dataclasses written as stamped records and read back checked, with neither Optuna nor
torch: `lenetlab runs`, `lenetlab report` and open_run read a search without the tune extra.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import files
from .checked import checked, is_folder_name, require
from .errors import RunDirError
from .provenance import library_versions
from .recipes import with_fields
from .records import RunOptions, TrialResult
from .rundir import MAX_SEEDS, plan_path
from .tunespec import TuneSpec

TRIAL_STATES = ("complete", "pruned", "failed", "running")
# In a search's run folder: the confirmation's sweep (its folder, its spec) and the best recipe's
# configuration name in it.
CONFIRM, BEST_SPEC, BEST = "confirm", "best.toml", "best"


@dataclass
class TunePlan:
    """A search's run.json: the spec, how trials run, and the search's time so far."""

    name: str
    spec: TuneSpec
    options: RunOptions
    engine: str = "local"
    workers: int = 1
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    lenetlab_version: str = field(default_factory=lambda: library_versions()["lenetlab"])
    elapsed_s: float = 0.0  # the search's time over every session of this run, resumes included
    kind: str = "tune"

    def to_dict(self) -> dict:
        return {**asdict(self), "spec": self.spec.to_dict()}

    @classmethod
    def from_dict(cls, body: dict) -> TunePlan:
        spec = TuneSpec.from_dict(body["spec"])
        plan = checked(cls(**{**body, "spec": spec, "options": RunOptions(**body["options"])}), "tune plan")
        require(plan.kind == "tune" and is_folder_name(plan.name), "kind or name: not a search's")
        require(plan.engine in ("local", "ray") and 1 <= plan.workers <= 1024, "engine or workers: unknown")
        require(plan.elapsed_s >= 0 and len(plan.spec.confirm_seeds) <= MAX_SEEDS, "elapsed_s: negative")
        plan.options.check()
        return plan


def write_tune_plan(run_dir: Path, plan: TunePlan) -> None:
    files.write_record(plan_path(run_dir), "tune-plan", plan.to_dict())


def read_tune_plan(run_dir: Path) -> TunePlan:
    """The plan of a search's run folder; RunDirError for anything else."""
    return files.read_typed(plan_path(run_dir), "tune-plan", TunePlan.from_dict, "search plan")


def is_tune_run(run_dir: Path) -> bool:
    """Whether run_dir's run.json says it is a search (checked when it is read)."""
    try:
        return files.strict_json(plan_path(run_dir).read_text(encoding="utf-8")).get("file") == "tune-plan"
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


@dataclass(frozen=True)
class TrialRow:
    """One search trial: how it ended, its fields, and its validation accuracy per epoch."""

    number: int
    state: str  # complete, pruned, failed (running only in a search still going)
    params: dict
    value: float | None  # the kept model's validation accuracy (complete trials)
    val_by_epoch: dict[int, float]
    epochs: int  # epochs trained
    wall_time_s: float
    error: str | None = None


@dataclass(frozen=True)
class TuneSummary:
    name: str
    created: str
    lenetlab_version: str
    search_time_s: float
    spec: TuneSpec
    trials: list[TrialRow]
    best: int  # the trial number chosen on validation
    importance: dict[str, float] | None  # by field, summing to 1; None when it could not be measured
    importance_note: str  # how it was measured, or why not

    @property
    def best_row(self) -> TrialRow | None:
        return next((row for row in self.trials if row.number == self.best), None)

    def count(self, state: str) -> int:
        return sum(row.state == state for row in self.trials)

    def to_dict(self) -> dict:
        body = asdict(self)
        body["spec"] = self.spec.to_dict()
        body["trials"] = [{**asdict(row), "val_by_epoch": {str(k): v for k, v in row.val_by_epoch.items()}}
                          for row in self.trials]
        return body

    @classmethod
    def from_dict(cls, body: dict) -> TuneSummary:
        """tune.json's body, checked: TypeError, ValueError or SpecError naming what does not fit."""
        rows = [TrialRow(**{**row, "val_by_epoch": {int(k): v for k, v in row["val_by_epoch"].items()}})
                for row in body["trials"]]
        summary = checked(cls(**{**body, "spec": TuneSpec.from_dict(body["spec"]), "trials": rows}),
                          "tune summary")
        space = set(summary.spec.space)
        require(is_folder_name(summary.name) and summary.search_time_s >= 0, "name or search_time_s")
        require([row.number for row in rows] == list(range(len(rows))), "trials: not numbered in order")
        for row in rows:
            where = f"trials: {row.number}"
            require(row.state in TRIAL_STATES and set(row.params) == space, f"{where} does not fit")
            with_fields(summary.spec.base, row.params, "trials.")  # each field checked as the spec's own
            require((row.value is not None) == (row.state == "complete"), f"{where}: its value")
            shares = [*row.val_by_epoch.values(), *([row.value] if row.value is not None else [])]
            require(all(map(_accuracy, shares)) and row.epochs == max(row.val_by_epoch, default=0)
                    and row.wall_time_s >= 0, f"{where}: its numbers")
        require(summary.best_row is not None and summary.best_row.state == "complete",
                "best: not a complete trial")
        require(summary.importance is None or set(summary.importance) <= space
                and all(_accuracy(v) for v in summary.importance.values()), "importance: not the fields'")
        return summary


def _accuracy(value) -> bool:
    """A share from 0 to 1 (an accuracy, an importance)."""
    return isinstance(value, float) and 0.0 <= value <= 1.0


def read_search_results(run_dir: Path, run_id: str) -> list[TrialResult]:
    """The search trials this run recorded so far (trials/trial*.json), any others left out."""
    found = []
    for path in sorted(Path(run_dir, "trials").glob("trial*__seed*.json")):
        try:
            result = TrialResult.from_dict(files.read_record(path, "trial"))
        except (RunDirError, KeyError, TypeError, ValueError, AttributeError):
            continue
        if (result.run_id == run_id and path.name == f"{result.trial.key}.json"
                and result.of_kind(search=True)):
            found.append(result)
    return found


def summary_path(run_dir: Path) -> Path:
    return Path(run_dir) / "tune.json"


def write_tune_summary(run_dir: Path, summary: TuneSummary) -> None:
    files.write_record(summary_path(run_dir), "tune-summary", summary.to_dict())


def read_tune_summary(run_dir: Path) -> TuneSummary:
    return files.read_typed(summary_path(run_dir), "tune-summary", TuneSummary.from_dict, "search summary")
