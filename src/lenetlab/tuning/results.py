"""A finished search's results for Python and notebooks: the confirmation table, the trials, the best recipe.

open_run gives a TuneRun for a search's run folder. It reads tune.json and the confirmation's
run folder (confirm/, through results.Run, checked against its summary.json); it needs neither
Optuna nor torch until a model is asked for.
"""

from __future__ import annotations

import html
import shlex
from pathlib import Path

from ..errors import RunDirError
from ..markup import plain
from ..model import LeNet5V1
from ..records import Summary
from ..results import Run, require_pandas
from ..tunerecords import (
    BEST,
    BEST_SPEC,
    CONFIRM,
    TuneSummary,
    read_tune_plan,
    read_tune_summary,
    summary_path,
)


class TuneRun:
    """A finished search: its folder (.path), summary (.summary) and confirmation (.confirmation, a Run)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.plan = read_tune_plan(self.path)
        if not summary_path(self.path).exists():
            raise RunDirError(f"{self.path}: the search has not finished (no tune.json yet); finish it with: "
                              f"lenetlab resume {shlex.quote(str(self.path))} (lenetlab.resume in Python)")
        self.summary: TuneSummary = read_tune_summary(self.path)
        self.confirmation = Run(self.path / CONFIRM)

    def __repr__(self) -> str:
        best = self.summary.best_row
        return (f"<lenetlab.TuneRun {str(self.path)!r}: {len(self.summary.trials)} trial(s), "
                f"{self.summary.count('pruned')} pruned, best trial {best.number} val {best.value:.4f}>")

    def table(self):
        """The confirmation: the best recipe and the variant on the test set over confirm_seeds."""
        return self.confirmation.table()

    def comparisons(self):
        """The best recipe minus the variant, paired by seed on test accuracy."""
        return self.confirmation.comparisons()

    def trials(self):
        """One row per search trial: its state, validation accuracy, epochs, time and fields."""
        keys = list(self.summary.spec.space)
        rows = [{"trial": r.number, "state": r.state, "val_accuracy": r.value, "epochs": r.epochs,
                 "wall_time_s": r.wall_time_s, **{k: r.params.get(k) for k in keys}}
                for r in self.summary.trials]
        columns = ["trial", "state", "val_accuracy", "epochs", "wall_time_s", *keys]
        return require_pandas().DataFrame(rows, columns=columns).set_index("trial")

    def importance(self) -> dict[str, float] | None:
        return self.summary.importance

    @property
    def best_params(self) -> dict:
        return dict(self.summary.best_row.params)

    @property
    def best_spec(self) -> Path:
        """best.toml: the sweep spec that runs the confirmation again."""
        return self.path / BEST_SPEC

    def model(self, seed: int | None = None) -> LeNet5V1:
        """The best recipe's model trained in the confirmation (default: its best seed)."""
        return self.confirmation.model(BEST, seed)

    def _repr_html_(self) -> str:
        best = self.summary.best_row
        return (f"<h3>{html.escape(plain(self.summary.name))}: lenetlab tune</h3>"
                f"<p>{len(self.summary.trials)} trials, {self.summary.count('pruned')} pruned; best trial "
                f"{best.number}, validation accuracy {best.value:.4f}. Report: "
                f"<code>{html.escape(plain(self.path / 'report.html'))}</code></p>"
                + self.confirmation._repr_html_())


def say_done(summary: TuneSummary, confirmation: Summary, run_dir: Path) -> None:
    best = summary.best_row
    print(f"tune {run_dir}: {len(summary.trials)} trial(s), {summary.count('pruned')} pruned, "
          f"{summary.count('failed')} failed; best trial {best.number}: validation accuracy {best.value:.4f}")
    for config in confirmation.configs:
        if config.final:
            test = config.final["test"]
            print(f"  {plain(config.name)}: test accuracy {test.mean:.4f} (mean of {test.n} seed(s))")
    for c in confirmation.comparisons:
        print(f"  {plain(c.name)} - {plain(c.reference)}: {c.mean_diff:+.4f}, 95% interval "
              f"[{c.ci95[0]:+.4f}, {c.ci95[1]:+.4f}]" + (" (excludes zero)" if c.excludes_zero else ""))
    print(f"best recipe: {run_dir / BEST_SPEC}; report: {run_dir / 'report.html'} (and report.md)")
