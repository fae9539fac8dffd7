"""A search's Optuna study: its journal in the run folder, the seeded sampler, the pruner, the checks.

The journal (Optuna's JournalStorage in one file) is the search's state: every trial asked, its
parameters, each epoch's validation accuracy and how it ended. It survives a kill at any moment:
each record is one appended line, and a line cut short by a kill is dropped when the run folder is
next held (repair). A journal from someone else is read as such: every trial in it must be one
this spec could have asked, or the run folder is refused as damaged (check_trials).
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from pathlib import Path

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

from ..errors import LenetlabError, RunDirError
from ..tunespec import Choices, TuneSpec

JOURNAL = "search.journal"
STUDY_NAME = "lenetlab-search"
STATES = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)

optuna.logging.set_verbosity(optuna.logging.WARNING)  # lenetlab prints its own line per trial
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def journal_path(run_dir: Path) -> Path:
    return Path(run_dir) / JOURNAL


def trial_name(number: int) -> str:
    """A search trial's configuration name in the run folder (trials/trial7__seed0.json)."""
    return f"trial{number}"


def repair(run_dir: Path) -> None:
    """Make the journal appendable after a kill; only while holding the run folder (rundir.hold),
    so no other process of this run writes it: a last line cut short is dropped, and the lock
    file a killed writer left behind is removed."""
    path = journal_path(run_dir)
    Path(f"{path}.lock").unlink(missing_ok=True)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise RunDirError(f"{path}: unreadable ({exc.strerror})") from None
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as journal:
            journal.truncate(data.rfind(b"\n") + 1)
            os.fsync(journal.fileno())


def storage(run_dir: Path) -> JournalStorage:
    path = str(journal_path(run_dir))
    return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def distributions(spec: TuneSpec) -> dict[str, BaseDistribution]:
    """Optuna's distribution of each searched field."""
    found: dict[str, BaseDistribution] = {}
    for key, dim in spec.space.items():
        if isinstance(dim, Choices):
            found[key] = CategoricalDistribution(dim.values)
        elif isinstance(dim.low, int) and isinstance(dim.high, int):
            found[key] = IntDistribution(dim.low, dim.high, log=dim.log)
        else:
            found[key] = FloatDistribution(float(dim.low), float(dim.high), log=dim.log)
    return found


def make_pruner(spec: TuneSpec) -> optuna.pruners.BasePruner:
    """The spec's pruner, deciding on each epoch's validation accuracy. Its resources are given,
    not 'auto': every process that asks it (each worker) must reach the same answer."""
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=spec.min_epochs, max_resource=spec.max_epochs(),
                                              reduction_factor=3)
    if spec.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=spec.min_epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def startup_trials(spec: TuneSpec) -> int:
    """Trials sampled at random before TPE models the others: Optuna's 10, fewer on a small budget."""
    return max(2, min(10, spec.trials // 3))


def sampler(spec: TuneSpec, number: int) -> optuna.samplers.TPESampler:
    """The sampler that asks trial number: TPE seeded by (the spec's seed, number). Optuna keeps no
    sampler state in the storage, so one made afresh for each trial suggests the same trial
    whether or not the search was interrupted before it."""
    digest = hashlib.sha256(f"lenetlab-tune:{spec.seed}:{number}".encode()).digest()
    return optuna.samplers.TPESampler(seed=int.from_bytes(digest[:4], "little"),
                                      n_startup_trials=startup_trials(spec), constant_liar=True)


def open_study(run_dir: Path, spec: TuneSpec) -> optuna.Study:
    """The run folder's study (created when there is none yet), its trials checked."""
    path = journal_path(run_dir)
    try:
        study = optuna.create_study(storage=storage(run_dir), study_name=STUDY_NAME, direction="maximize",
                                    pruner=make_pruner(spec), sampler=sampler(spec, 0), load_if_exists=True)
    except LenetlabError:
        raise
    except Exception as exc:  # a journal that is no Optuna journal, or one Optuna cannot replay
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise RunDirError(f"{path}: not a search journal lenetlab reads ({detail})") from None
    check_trials(study, spec, path)
    return study


def check_trials(study: optuna.Study, spec: TuneSpec, where: Path) -> None:
    """RunDirError unless every trial of the journal is one of this spec's: numbered in order,
    in a known state, with every searched field inside its distribution and accuracies in 0-1."""
    ours = distributions(spec)
    try:
        directions = study.directions
        trials = study.get_trials(deepcopy=False)
    except Exception as exc:
        raise RunDirError(f"{where}: not a search journal lenetlab reads ({type(exc).__name__})") from None
    if directions != [optuna.study.StudyDirection.MAXIMIZE]:
        raise RunDirError(f"{where}: not a search journal lenetlab reads (its direction is not maximize)")
    for index, trial in enumerate(trials):
        try:
            problem = _problem(trial, index, ours, spec)
        except Exception as exc:  # a record Optuna replayed but cannot answer for (no value, ...)
            problem = f"unreadable ({type(exc).__name__})"
        if problem:
            raise RunDirError(f"{where}: trial {index}: {problem}; not a search this run made")


def _accuracy(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0


def _problem(trial: FrozenTrial, index: int, ours: dict[str, BaseDistribution], spec: TuneSpec) -> str | None:
    if trial.number != index:
        return f"numbered {trial.number}"
    if trial.state not in STATES:
        return f"state {trial.state.name}"
    if set(trial.params) != set(ours) or set(trial.distributions) != set(ours):
        return "its fields are not the spec's [search]"
    for key, value in trial.params.items():
        dist = ours[key]
        if trial.distributions[key] != dist:
            return f"{key}: another distribution"
        try:
            inside = dist._contains(dist.to_internal_repr(value))
        except Exception:
            inside = False
        if not inside:
            return f"{key}: {value!r} is outside the spec's range"
    try:
        spec.recipe(trial.params)
    except LenetlabError as exc:
        return str(exc)
    if trial.state == TrialState.COMPLETE and not _accuracy(trial.value):
        return "its value is not an accuracy"
    if not all(type(step) is int and 1 <= step <= spec.max_epochs() and _accuracy(value)
               for step, value in trial.intermediate_values.items()):
        return "an epoch's accuracy is not one"
    return None
