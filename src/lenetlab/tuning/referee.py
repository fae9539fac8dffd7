"""Each epoch of a search's trial: its validation accuracy told to the study, and the pruner's answer.

The engines take a Referee (engines.Referee) and ask it, where a trial trains, for the function
each epoch calls (training.OnEpoch). A local worker opens the run folder's journal itself; a Ray
task asks the run's RefereeHost actor, on the host that holds the run folder (engines.py).

A kill can land between any two of the journal's lines, and a resumed trial trains its last
epoch again: its answer must be the first one. Optuna's successive halving (Hyperband's too)
marks the trial's rung as it decides ("completed_rung_N") and would not decide that rung again,
so the referee notes how many marks the trial had before it asks (JUDGING), and the answer
"prune" once given (PRUNED_AT); an epoch told before a kill is judged again on a copy of the
study in memory without the marks that first decision left.
"""

from __future__ import annotations

from pathlib import Path

import optuna

from ..records import Trial
from ..training import OnEpoch
from ..tunespec import TuneSpec
from .study import STUDY_NAME, make_pruner, storage

JUDGING = "lenetlab:judging"  # {"epoch": e, "marks": rung marks before the pruner was asked at e}
PRUNED_AT = "lenetlab:pruned_at"  # the epoch at whose end the pruner stopped the trial
RUNG = "completed_rung_"  # Optuna's successive halving's mark of a rung decided


def _marks(frozen: optuna.trial.FrozenTrial) -> int:
    return sum(key.startswith(RUNG) for key in frozen.system_attrs)


class Referee:
    """Picklable (the run folder and the spec); the study is opened where it is first needed,
    once per process (a local worker, or Ray's RefereeHost for every trial)."""

    def __init__(self, run_dir: str, spec: TuneSpec) -> None:
        self.run_dir, self.spec = run_dir, spec
        self._study: optuna.Study | None = None

    def __getstate__(self) -> dict:
        return {"run_dir": self.run_dir, "spec": self.spec}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def study(self) -> optuna.Study:
        if self._study is None:  # at the first epoch's end, not while the worker starts
            self._study = optuna.load_study(study_name=STUDY_NAME, storage=storage(Path(self.run_dir)),
                                            pruner=make_pruner(self.spec))
        return self._study

    def for_trial(self, trial: Trial) -> OnEpoch:
        number = int(trial.config.removeprefix("trial"))

        def on_epoch(epoch: int, accuracy: float) -> bool:
            study = self.study()
            trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
            frozen = study._storage.get_trial(trial_id)
            if PRUNED_AT in frozen.system_attrs:  # decided before a kill
                return epoch >= frozen.system_attrs[PRUNED_AT]
            judging = frozen.system_attrs.get(JUDGING)
            if judging is not None and judging["epoch"] == epoch:  # asked before a kill, unanswered
                prune = self.judge_again(study, frozen, judging["marks"])
            else:
                if epoch not in frozen.intermediate_values:  # told before a kill: told once
                    study._storage.set_trial_intermediate_value(trial_id, epoch, accuracy)
                study._storage.set_trial_system_attr(trial_id, JUDGING,
                                                     {"epoch": epoch, "marks": _marks(frozen)})
                prune = optuna.trial.Trial(study, trial_id).should_prune()
            if prune:
                study._storage.set_trial_system_attr(trial_id, PRUNED_AT, epoch)
            return prune

        return on_epoch

    def judge_again(self, study: optuna.Study, frozen: optuna.trial.FrozenTrial, marks: int) -> bool:
        """The pruner's first answer for frozen's last epoch: asked again on a copy of the study,
        the trial's rung marks from the `marks`-th on taken off."""
        replica = optuna.create_study(study_name=STUDY_NAME, direction="maximize",
                                      pruner=make_pruner(self.spec))
        for other in study.get_trials(deepcopy=True):
            if other.number == frozen.number:
                later = [k for k in other.system_attrs if k.startswith(RUNG) and int(k[len(RUNG):]) >= marks]
                for key in later:
                    del other.system_attrs[key]
            replica.add_trial(other)
        return replica.pruner.prune(replica, replica.get_trials(deepcopy=False)[frozen.number])
