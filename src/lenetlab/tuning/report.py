"""A search's report: the confirmation, the search's history, the fields' importance and the best trials.

report.md and report.html of the tune run folder, as a study's are made (report.build_html): every
value enters through markup.Md, and the one plot is the search's history. The confirmation's
own report (tables per seed, curves, confusion matrices) is confirm/report.html.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

from .. import files
from ..errors import RunDirError
from ..markup import Md, code, md
from ..plots import PLAIN_TEXT, new_figure, save_figure
from ..records import Summary
from ..report import build_html
from ..summary import load_summary
from ..tunerecords import TrialRow, TuneSummary, read_tune_summary, summary_path

HISTORY_PLOT = "plots/search-history.png"
TOP = 10


def render_tune_report(run_dir: Path, summary: TuneSummary | None = None,
                       confirmation: Summary | None = None) -> Path:
    """Write plots/search-history.png, report.md and report.html; read the run's files when not given."""
    run_dir = Path(run_dir)
    if summary is None:
        if not summary_path(run_dir).exists():
            raise RunDirError(f"{run_dir}: the search has not finished (no tune.json yet); finish it with: "
                              f"lenetlab resume {shlex.quote(str(run_dir))}")
        summary = read_tune_summary(run_dir)
    if confirmation is None:
        confirmation = load_summary(run_dir / "confirm")
    write_history_plot(summary, run_dir / HISTORY_PLOT)
    text = build_markdown(summary, confirmation)
    files.write_text(run_dir / "report.md", text)
    files.write_text(run_dir / "report.html", build_html(text, summary.name, run_dir))
    return run_dir / "report.md"


def best_so_far(rows: list[TrialRow]) -> list[float | None]:
    best, found = None, []
    for row in rows:
        if row.value is not None:
            best = row.value if best is None else max(best, row.value)
        found.append(best)
    return found


def write_history_plot(summary: TuneSummary, path: Path) -> None:
    import matplotlib

    with matplotlib.rc_context(PLAIN_TEXT):
        fig, ax = new_figure((7, 4))
        rows = summary.trials
        for state, marker, colour in (("complete", "o", "tab:blue"), ("pruned", "x", "tab:grey")):
            shown = [(r.number, r.value if r.value is not None else r.val_by_epoch.get(r.epochs))
                     for r in rows if r.state == state and (r.value is not None or r.val_by_epoch)]
            if shown:
                ax.scatter([n for n, _ in shown], [v for _, v in shown], marker=marker, color=colour,
                           label=f"{state} ({'kept model' if state == 'complete' else 'last epoch'})")
        best = best_so_far(rows)
        ax.step([r.number for r in rows], [math.nan if b is None else b for b in best], where="post",
                color="tab:orange", label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel("validation accuracy")
        ax.set_title("the search, trial by trial")
        ax.legend(loc="lower right")
        save_figure(fig, path)


def _row(cells: list) -> Md:
    return Md("| {} |").format(Md(" | ").join(cell if isinstance(cell, Md) else md(cell) for cell in cells))


def _table(header: list[str], rows: list[list]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows), ""]


def _value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _params(params: dict) -> Md:
    return Md(", ").join(Md("{} {}").format(key, _value(value)) for key, value in params.items())


def _shown_value(row: TrialRow) -> str:
    """A complete trial's kept model's accuracy; a pruned one's at its last epoch, in parentheses."""
    if row.value is not None:
        return f"{row.value:.4f}"
    last = row.val_by_epoch.get(row.epochs)
    return f"({last:.4f})" if last is not None else "-"


def build_markdown(summary: TuneSummary, confirmation: Summary) -> str:
    spec = summary.spec
    best = summary.best_row
    lines = [Md("# {}: lenetlab tune report").format(summary.name), "",
             Md("Created {} by lenetlab {}. A search over {} starting from {}, chosen on validation "
                "accuracy only; the test set was read only for the confirmation below.").format(
                 summary.created, summary.lenetlab_version, Md(", ").join(map(code, spec.space)),
                 code(spec.variant)), ""]
    lines += ["## Result", ""]
    lines += [Md("{} trials of a budget of {} in {:.0f} s of search: {} complete, {} pruned, {} failed. "
                 "Best: trial {} with validation accuracy {:.4f} ({}).").format(
        len(summary.trials), spec.trials, summary.search_time_s, summary.count("complete"),
        summary.count("pruned"), summary.count("failed"), best.number, best.value, _params(best.params)), ""]
    lines += _confirmation_section(confirmation)
    lines += ["## The search", "", Md("![the search, trial by trial]({})").format(Md(HISTORY_PLOT)), "",
              "Each trial's validation accuracy (its kept model's; a pruned trial's at its last epoch, "
              "in parentheses in the tables) and the best so far.", ""]
    lines += ["## Importance of each field", "", md(summary.importance_note), ""]
    if summary.importance:
        lines += _table(["Field", "Importance"], [[code(k), f"{v:.3f}"] for k, v in
                                                  sorted(summary.importance.items(), key=lambda kv: -kv[1])])
    keys = list(spec.space)
    complete = sorted((r for r in summary.trials if r.state == "complete"),
                      key=lambda r: (-r.value, r.number))
    lines += [Md("## The {} best trials").format(min(TOP, len(complete))), ""]
    lines += _table(["Rank", "Trial", "Validation accuracy", "Epochs trained", *keys],
                    [[i + 1, r.number, f"{r.value:.4f}", r.epochs, *(_value(r.params[k]) for k in keys)]
                     for i, r in enumerate(complete[:TOP])])
    lines += ["## Every trial", ""]
    running_best = best_so_far(summary.trials)
    lines += _table(["Trial", "State", "Validation accuracy", "Best so far", "Epochs trained", "Time (s)"],
                    [[r.number, r.state, _shown_value(r), f"{b:.4f}" if b is not None else "-", r.epochs,
                      f"{r.wall_time_s:.1f}"] for r, b in zip(summary.trials, running_best)])
    lines += ["## How it was run", "",
              Md("Sampler: Optuna's TPE, seed {}; pruner: {} on each epoch's validation accuracy, from "
                 "epoch {} on; every search trial trains from seed {}. Fixed fields: {}. The best recipe "
                 "as a sweep spec: "
                 "{} (`lenetlab sweep best.toml` runs the confirmation again); the confirmation's own "
                 "report: {}.").format(spec.seed, spec.pruner, spec.min_epochs, spec.trial_seed,
                                       _params(spec.fixed) if spec.fixed else "none",
                                       code("best.toml"), code("confirm/report.html")), ""]
    return "\n".join(lines).rstrip() + "\n"


def _confirmation_section(confirmation: Summary) -> list[str]:
    lines = ["## Confirmation on the test set", ""]
    seeds = confirmation.settings.seeds
    rows = []
    for config in confirmation.configs:
        stat = config.final["test"] if config.final else None
        if stat is None:
            rows.append([md(config.name), "no seed completed", "", *([""] * len(seeds))])
            continue
        interval = f"[{stat.ci95[0]:.4f}, {stat.ci95[1]:.4f}]" if stat.n > 1 else "n/a, 1 seed"
        rows.append([md(config.name), f"{stat.mean:.4f}", interval,
                     *(f"{stat.values[s]:.4f}" if s in stat.values else "-" for s in seeds)])
    lines += _table(["Configuration", "Test accuracy", "95% interval", *(f"seed {s}" for s in seeds)], rows)
    for c in confirmation.comparisons:
        interval = f"[{c.ci95[0]:+.4f}, {c.ci95[1]:+.4f}]" if c.n > 1 else "no interval (1 seed)"
        verdict = ("The interval lies above zero: the search's recipe is better on the test set."
                   if c.excludes_zero and c.mean_diff > 0 else
                   "The interval lies below zero: the search's recipe is worse on the test set."
                   if c.excludes_zero else "The interval includes zero: no difference is shown.")
        lines += [Md("{} minus {}, paired by seed over {} seed(s): {:+.4f}, 95% interval {}. {}").format(
            c.name, c.reference, c.n, c.mean_diff, interval, verdict), ""]
    return lines
