"""A finished run folder's results for Python and notebooks: tables, curves, comparisons, models, plots.

Run reads the folder through summary.read_summary, so its files are checked against the
digests summary.json recorded before anything is shown. The tables are pandas DataFrames
(the notebook extra: pip install 'lenetlab[notebook]'); pandas is imported when a table is
asked for, not with lenetlab.
"""

from __future__ import annotations

import html
import shlex
from pathlib import Path

from .errors import LenetlabError, RunDirError, SpecError
from .markup import plain
from .model import LeNet5V1, load_weights
from .recipes import PUBLISHED
from .records import SPLITS, Summary, Trial
from .rundir import read_plan, weights_path
from .summary import read_summary

PLOT_KINDS = ("convergence", "overlay", "confusion", "per_class")


def require_pandas():
    try:
        import pandas
    except ImportError:
        raise LenetlabError("tables need pandas, in the notebook extra: "
                            "pip install 'lenetlab[notebook]'") from None
    return pandas


class Run:
    """A finished study or sweep: its folder (.path), its typed summary (.summary) and views of them."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        read_plan(self.path)  # a folder that is no run says so first
        if not (self.path / "summary.json").exists():
            raise RunDirError(f"{self.path}: the run has not finished (no summary.json yet); finish it with: "
                              f"lenetlab resume {shlex.quote(str(self.path))} (lenetlab.resume in Python)")
        self.summary: Summary
        self.summary, self._curves = read_summary(self.path)

    def __repr__(self) -> str:
        best = self.summary.best_config
        shown = f", best {best.name} {best.final['test'].mean:.4f}" if best else ""
        return (f"<lenetlab.Run {self.summary.kind} {str(self.path)!r}: {len(self.summary.configs)} "
                f"configuration(s) x {len(self.summary.settings.seeds)} seed(s){shown}>")

    def table(self):
        """The results: a row per configuration; for each split its mean, 95% interval and each
        seed's value; the published figures (train, val) where the original has them."""
        pandas = require_pandas()
        rows = {}
        for config in self.summary.configs:
            row = {("seeds", "completed"): len(config.completed_seeds),
                   ("seeds", "planned"): len(config.seeds)}
            for split in SPLITS:
                stat = config.final[split] if config.final else None
                row[(split, "mean")] = stat.mean if stat else None
                row[(split, "ci95_low")], row[(split, "ci95_high")] = stat.ci95 if stat else (None, None)
                for seed in config.seeds:
                    row[(split, f"seed {seed}")] = stat.values.get(seed) if stat else None
            if self.summary.kind == "study" and config.name in PUBLISHED:
                row[("published", "train")], row[("published", "val")] = PUBLISHED[config.name]
            rows[config.name] = row
        table = pandas.DataFrame.from_dict(rows, orient="index")
        table.columns = pandas.MultiIndex.from_tuples(table.columns)
        table.index.name = "configuration"
        return table

    def curves(self):
        """metrics.csv: one row per configuration, seed, epoch and split (loss and accuracy)."""
        return require_pandas().read_csv(self.path / "metrics.csv")

    def comparisons(self):
        """Each configuration against the reference, paired by seed on test accuracy."""
        rows = [{"configuration": c.name, "reference": c.reference, "paired_seeds": c.n,
                 "mean_diff": c.mean_diff, "ci95_low": c.ci95[0], "ci95_high": c.ci95[1],
                 "excludes_zero": c.excludes_zero} for c in self.summary.comparisons]
        columns = ["configuration", "reference", "paired_seeds", "mean_diff", "ci95_low", "ci95_high",
                   "excludes_zero"]
        return require_pandas().DataFrame(rows, columns=columns).set_index("configuration")

    def model(self, config: str, seed: int | None = None) -> LeNet5V1:
        """The trained LeNet5V1 of a configuration's seed (default: its best seed), in eval mode."""
        try:
            found = self.summary.config(config)
        except KeyError as exc:
            raise SpecError(f"config {exc.args[0]}") from None
        seed = found.best_seed if seed is None else seed
        if seed not in found.completed_seeds:
            raise SpecError(f"seed {seed!r}: {config} has no trained model of that seed (completed: "
                            f"{', '.join(map(str, found.completed_seeds)) or 'none'})")
        return load_weights(weights_path(self.path, Trial(config, found.recipe, seed)))

    def plot(self, kind: str = "overlay", config: str | None = None):
        """One of the report's plots as a matplotlib Figure: convergence (of config, default the
        best configuration), overlay, confusion (the best run's) or per_class."""
        if kind not in PLOT_KINDS:
            raise SpecError(f"kind {kind!r}: expected one of {', '.join(PLOT_KINDS)}")
        from .plots import available_plots  # matplotlib: see runner.finalize

        if kind == "convergence" and config is None:
            config = self.summary.best.name if self.summary.best else self.summary.configs[0].name
        for plot in available_plots(self.summary, self._curves):
            if plot.kind == kind and (config is None or plot.config == config):
                return plot.draw()
        raise SpecError(f"kind {kind!r}{f' of {config!r}' if config else ''}: no such plot in {self.path} "
                        f"(no configuration of that name, or none completed a seed)")

    def _repr_html_(self) -> str:
        """The table and the report's plots, for a notebook cell."""
        from .plots import available_plots
        from .report import embedded_png

        try:
            table = self.table().to_html(float_format=lambda v: f"{v:.4f}", na_rep="")
        except LenetlabError as exc:
            table = f"<p>{html.escape(str(exc))}</p>"
        images = []
        for plot in available_plots(self.summary, self._curves):
            png = self.path / "plots" / plot.file
            if png.is_file():
                caption = html.escape(plot.caption)
                images.append(f"<figure>{embedded_png(png, caption, 'max-width: 100%')}"
                              f"<figcaption>{caption}</figcaption></figure>")
        return (f"<h3>{html.escape(plain(self.summary.name))}: lenetlab {self.summary.kind}</h3>"
                f"<p><code>{html.escape(plain(self.path))}</code>, report: "
                f"<code>{html.escape(plain(self.path / 'report.html'))}</code></p>{table}{''.join(images)}")
