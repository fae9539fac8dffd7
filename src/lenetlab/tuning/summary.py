"""A search's summary from its study and its trial records: each trial, the best, the importances.

Written as tune.json (tunerecords.TuneSummary) once the confirmation has run (tuning/run.py); the
report, `lenetlab runs`, open_run and MLflow read it back. The confirmation's own results stay in
its run folder (confirm/summary.json).

The importance of each field is Optuna's PED-ANOVA: it needs no other package (fANOVA needs
scikit-learn's random forests, a large dependency for one table), is deterministic for the same
trials, and measures what a search asks: which fields decide whether a trial reaches the top
of the results (the top 10% of the completed trials against all of them).
"""

from __future__ import annotations

import math
from pathlib import Path

import optuna
from optuna.trial import TrialState

from ..records import Trial
from ..rundir import read_result
from ..tunerecords import TrialRow, TunePlan, TuneSummary
from .study import trial_name

STATES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
          TrialState.RUNNING: "running"}


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The complete trial with the highest validation accuracy (the first, on a tie)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda t: (t.value, -t.number), default=None)


def importance(study: optuna.Study) -> tuple[dict[str, float] | None, str]:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varied = [key for key in (complete[0].params if complete else {})
              if len({repr(t.params[key]) for t in complete}) > 1]
    if len(complete) < 4 or not varied:
        return None, (f"not measured: {len(complete)} complete trial(s), at least 4 with the fields "
                      f"varying are needed")
    try:
        found = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(), params=varied)
    except Exception as exc:  # too few trials in the top quantile, ...
        return None, f"not measured: {(str(exc).splitlines() or [type(exc).__name__])[0][:120]}"
    total = sum(found.values())
    if not total or not all(math.isfinite(v) for v in found.values()):
        return None, "not measured: no field separates the best trials from the others"
    note = (f"PED-ANOVA over the {len(complete)} complete trials: how much each field decides whether a "
            f"trial is among the best 10%")
    return {key: value / total for key, value in found.items()}, note


def build_summary(run_dir: Path, plan: TunePlan, study: optuna.Study) -> TuneSummary:
    rows = []
    for frozen in study.get_trials(deepcopy=False):
        trial = Trial(trial_name(frozen.number), plan.spec.recipe(frozen.params), plan.spec.trial_seed)
        result = read_result(run_dir, trial, plan.run_id, search=True)
        val = {row.epoch: row.accuracy for row in result.history if row.split == "val"} if result else {}
        rows.append(TrialRow(
            number=frozen.number, state=STATES[frozen.state], params=dict(frozen.params),
            value=frozen.value if frozen.state == TrialState.COMPLETE else None, val_by_epoch=val,
            epochs=max(val, default=0), wall_time_s=result.wall_time_s if result else 0.0,
            error=result.error if result else None))
    best = best_trial(study)
    weights, note = importance(study)
    return TuneSummary(plan.name, plan.created, plan.lenetlab_version, plan.elapsed_s, plan.spec,
                       rows, best.number if best else None, weights, note)


