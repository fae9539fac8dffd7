"""Each epoch of a search's trial: its validation accuracy told to the study, and the pruner's answer.

The engines take a Referee (engines.Referee) and ask it, where a trial trains, for the function
each epoch calls (training.OnEpoch). A local worker opens the run folder's journal itself; a Ray
task asks the run's RefereeHost actor, on the host that holds the run folder (engines.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna

from ..records import Trial
from ..training import OnEpoch
from ..tunespec import TuneSpec
from .study import STUDY_NAME, make_pruner, storage


@dataclass(frozen=True)
class Referee:
    """Picklable: the run folder and the spec, from which a worker opens the study."""

    run_dir: str
    spec: TuneSpec

    def for_trial(self, trial: Trial) -> OnEpoch:
        number = int(trial.config.removeprefix("trial"))
        study: optuna.Study | None = None
        trial_id: int | None = None

        def on_epoch(epoch: int, accuracy: float) -> bool:
            nonlocal study, trial_id
            if study is None:  # opened at the first epoch's end, not while the worker starts
                study = optuna.load_study(study_name=STUDY_NAME, storage=storage(Path(self.run_dir)),
                                          pruner=make_pruner(self.spec))
                trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
            judged = optuna.trial.Trial(study, trial_id)
            if epoch not in study._storage.get_trial(trial_id).intermediate_values:
                judged.report(accuracy, epoch)  # an epoch trained again after a kill was told already
            return judged.should_prune()

        return on_epoch
