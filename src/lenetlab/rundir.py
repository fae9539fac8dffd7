"""Run folders: their names and layout, the plan in run.json, and the lock that gives a folder one owner.

    runs/NAME/
      run.json                      the plan: configurations, seeds, options (resume works from it)
      .lock                         held (flock) by the one process running the plan
      .run-id                       a running Ray run's id: how a Ray worker knows it reaches the folder
      trials/<config>__seed<k>.json a finished or failed trial
      checkpoints/<key>.pt          the state after a running trial's last finished epoch
      models/seed<k>/<file>.pth     each trial's weights + <file>.json sidecar
      models/<file>.pth             the best seed's weights of each configuration
      metrics.csv, summary.json, report.md, report.html, plots/   written by summary.py and report.py
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import files
from .checked import checked, is_folder_name, is_name, require
from .errors import OptionError, RunDirError, SpecError
from .provenance import library_versions
from .recipes import Recipe, file_name, recipe_from_dict
from .records import RunOptions, Trial, TrialResult

MAX_SEEDS = 1000
# A sweep larger than this is refused unless --max-trials raises the cap: each trial takes
# minutes, and a plan of millions would take gigabytes before the first one ran.
MAX_TRIALS = 1000


def parse_seeds(value) -> list[int]:
    """A seed count (1 to MAX_SEEDS: seeds 0..n-1) or a list of distinct seeds 0 to 2**32-1."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= MAX_SEEDS:
            raise SpecError(f"seeds: expected 1 to {MAX_SEEDS} seeds, got {value}")
        return list(range(value))
    if (isinstance(value, list) and 0 < len(value) <= MAX_SEEDS
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32 for v in value)):
        if len(set(value)) != len(value):
            raise SpecError("seeds: repeated seed")
        return list(value)
    raise SpecError(f"seeds: expected a count from 1 to {MAX_SEEDS} or a list of at most {MAX_SEEDS} "
                    f"whole numbers from 0 to 2**32-1, got {value!r}")


def check_size(trials: int, cap: int) -> None:
    if trials > cap:
        raise OptionError("max_trials", f"the plan has {trials:,} trials, more than the cap of {cap:,}; "
                                        f"raise it with {{option}} {trials} if you mean it")


@dataclass
class RunPlan:
    """What a run trains and how: written once to run.json, then only elapsed_s changes."""

    kind: str  # study or sweep
    name: str
    configs: list[tuple[str, Recipe]]
    seeds: list[int]
    options: RunOptions
    reference: str | None = None  # the configuration others are compared with
    engine: str = "local"
    workers: int = 1
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    lenetlab_version: str = field(default_factory=lambda: library_versions()["lenetlab"])
    elapsed_s: float = 0.0  # training time over every session of this run, resumes included

    def trials(self) -> list[Trial]:
        return [Trial(name, recipe, seed) for seed in self.seeds for name, recipe in self.configs]

    def to_dict(self) -> dict:
        body = asdict(self)
        body["configs"] = [{"name": name, "recipe": asdict(recipe)} for name, recipe in self.configs]
        return body

    @classmethod
    def from_dict(cls, body: dict) -> RunPlan:
        configs = [(entry["name"], recipe_from_dict(entry["recipe"])) for entry in body["configs"]]
        plan = checked(cls(**{**body, "configs": configs, "options": RunOptions(**body["options"])}), "run")
        names = [name for name, _ in plan.configs]
        require(plan.kind in ("study", "sweep"), f"kind: {plan.kind!r} is not study or sweep")
        require(is_folder_name(plan.name), f"name: {plan.name!r} is not a folder name")
        require(bool(names) and all(map(is_name, names)) and len(set(names)) == len(names),
                "configs: expected distinct names")
        parse_seeds(plan.seeds)
        require(plan.reference is None or plan.reference in names, "reference: none of the configurations")
        require(plan.engine in ("local", "ray") and 1 <= plan.workers <= 1024, "engine or workers: unknown")
        require(plan.elapsed_s >= 0, "elapsed_s: negative")
        plan.options.check()
        return plan


def plan_path(run_dir: Path) -> Path:
    return Path(run_dir) / "run.json"


def write_plan(run_dir: Path, plan: RunPlan) -> None:
    files.write_record(plan_path(run_dir), "run-plan", plan.to_dict())


def read_plan(run_dir: Path) -> RunPlan:
    """The plan of a run folder; RunDirError for a folder that is not a lenetlab run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run folder")
    if not plan_path(run_dir).is_file():
        raise RunDirError(f"{run_dir}: not a lenetlab run folder (no run.json)")
    return files.read_typed(plan_path(run_dir), "run-plan", RunPlan.from_dict, "run plan")


def new_run_dir(out: Path, name: str | None, kind: str) -> Path:
    """out/NAME, or out/<kind>-<time> when no name is given."""
    if name is not None and not is_folder_name(name):
        raise OptionError("name", f"{{option}} {name!r}: expected a folder name (no '/', no control "
                          f"characters, not '.' or '..')")
    return Path(out) / (name or f"{kind}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")


@contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """Own run_dir for the duration: an OS lock that a killed process releases by itself.

    A second process starting or resuming the same folder is refused with the holder's pid.
    """
    run_dir = Path(run_dir)
    files.writable_dir(run_dir)
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, files.FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            raise RunDirError(f"{run_dir}: in use by process {holder} (a study or sweep running on it); "
                              f"wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def result_path(run_dir: Path, trial: Trial) -> Path:
    return Path(run_dir) / "trials" / f"{trial.key}.json"


def token_path(run_dir: Path) -> Path:
    """The file holding the running run's id: a worker that reads this run's id there reaches the
    run folder itself (the same folder, not one of the same name on another host)."""
    return Path(run_dir) / ".run-id"


def reaches(run_dir: Path, run_id: str) -> bool:
    """Whether this process reaches the run folder of run run_id and can write its checkpoints."""
    try:
        found = token_path(run_dir).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return False
    folder = Path(run_dir) / "checkpoints"
    return found == run_id and folder.is_dir() and os.access(folder, os.W_OK)


def checkpoint_path(run_dir: Path, trial: Trial) -> Path:
    return Path(run_dir) / "checkpoints" / f"{trial.key}.pt"


def weights_path(run_dir: Path, trial: Trial) -> Path:
    return Path(run_dir) / "models" / f"seed{trial.seed}" / file_name(trial.config)


def read_result(run_dir: Path, trial: Trial, run_id: str, search: bool = False) -> TrialResult | None:
    """This run's recorded result of trial, or None when missing, damaged, another run's, not of
    its kind, or when its weights file is not the one it recorded: then the trial runs again.
    search: the run is a search, whose trials are judged without the test split and may be
    pruned; a study's or sweep's are tested, done or failed."""
    try:
        result = TrialResult.from_dict(files.read_record(result_path(run_dir, trial), "trial"))
    except (RunDirError, KeyError, TypeError, ValueError, AttributeError):  # damaged: the trial runs again
        return None
    if result.run_id != run_id or result.trial != trial:
        return None
    if not result.of_kind(search):
        return None
    if result.done and files.sha256_file(Path(run_dir) / result.weights) != result.weights_sha256:
        return None
    return result


def read_results(run_dir: Path, plan: RunPlan) -> dict[str, TrialResult]:
    """This run's results recorded so far, by trial key; missing or damaged ones are left out."""
    results = {}
    for trial in plan.trials():
        result = read_result(run_dir, trial, plan.run_id)
        if result is not None:
            results[trial.key] = result
    return results
