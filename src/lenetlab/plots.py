"""The plots of a run: accuracy per epoch, test accuracy overlay, best confusion matrix, per class.

Each function draws one matplotlib Figure from the summary and the per-epoch curves
(summary.py); write_plots writes every plot the data allows as a PNG, atomically. Figures are
made without pyplot: no backend is chosen or changed, so a notebook's own stays as it is.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.ticker import MaxNLocator

from . import files
from .data import CLASS_NAMES
from .records import SPLITS, ConfigSummary, Summary
from .summary import Curves

SPLIT_LABELS = {"train": "train", "val": "validation", "test": "test"}
# The original notebook drew training in blue and evaluation in orange; test is added in green.
SPLIT_COLOURS = {"train": "tab:blue", "val": "tab:orange", "test": "tab:green"}
HEATMAP_ABOVE = 6  # more configurations than this: per-class accuracy as a heatmap
DPI = 120
# Names are text: '$' in one is a dollar sign, not the start of a formula that could fail the plot.
PLAIN_TEXT = {"text.parse_math": False}


@dataclass(frozen=True)
class Plot:
    """One plot a run's data allows: its kind, caption and file name, and how to draw it."""

    kind: str  # convergence (one per configuration), overlay, confusion or per_class
    caption: str
    file: str  # under the run folder's plots/
    draw: Callable[[], Figure]
    config: str | None = None  # the configuration of a convergence plot


def available_plots(summary: Summary, curves: Curves) -> list[Plot]:
    """Every plot the data allows, in the report's order."""
    plots: list[Plot] = []
    file_names = _plot_file_names([config.name for config in summary.configs])
    for config in summary.configs:
        config_curves = curves.get(config.name, {})
        if config_curves:
            plots.append(Plot("convergence", f"{config.name}: accuracy per epoch", file_names[config.name],
                              partial(_plot_convergence, config, config_curves), config.name))
    means = {config.name: _mean_curve(curves.get(config.name, {}).get("test", {}))
             for config in summary.configs}
    means = {name: curve for name, curve in means.items() if curve}
    if means:
        plots.append(Plot("overlay", "Mean test accuracy per epoch", "test_accuracy_overlay.png",
                          partial(_plot_overlay, means)))
    if summary.best is not None:
        plots.append(Plot("confusion", "Confusion matrix of the best run", "confusion_matrix_best.png",
                          partial(_plot_confusion, summary)))
    per_class = _per_class_means(summary)
    if per_class:
        plots.append(Plot("per_class", "Per-class test accuracy", "per_class_accuracy.png",
                          partial(_plot_per_class, per_class)))
    return plots


def write_plots(summary: Summary, curves: Curves, plots_dir: Path) -> list[tuple[str, str]]:
    """Draw every plot the data allows; return (caption, path relative to the run folder)."""
    plots = available_plots(summary, curves)
    for plot in plots:
        save_figure(plot.draw(), plots_dir / plot.file)
    return [(plot.caption, f"plots/{plot.file}") for plot in plots]


def _plot_file_names(config_names: list[str]) -> dict[str, str]:
    """convergence_<name>.png with only letters, digits, '.', '_' and '-' in <name>."""
    file_names: dict[str, str] = {}
    used: set[str] = set()
    for name in config_names:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", name) or "config"
        candidate, suffix = safe, 2
        while candidate in used:  # two names that sanitise alike get distinct files
            candidate, suffix = f"{safe}-{suffix}", suffix + 1
        used.add(candidate)
        file_names[name] = f"convergence_{candidate}.png"
    return file_names


def _mean_curve(by_epoch: dict[int, dict[int, float]]) -> dict[int, float]:
    return {epoch: float(np.mean(list(by_seed.values()))) for epoch, by_seed in by_epoch.items()}


def _plot_convergence(config: ConfigSummary, config_curves: dict[str, dict[int, dict[int, float]]]) -> Figure:
    """Mean accuracy per epoch for each split, with the range over seeds shaded, and the kept
    epochs marked for a recipe that keeps its best epoch on validation."""
    seeds = {seed for by_epoch in config_curves.values() for by in by_epoch.values() for seed in by}
    fig, ax = new_figure((8, 5))
    handles, labels = [], []
    for split in SPLITS:
        if split not in config_curves:
            continue
        epochs = sorted(config_curves[split])
        values = [list(config_curves[split][epoch].values()) for epoch in epochs]
        colour = SPLIT_COLOURS[split]
        (line,) = ax.plot(epochs, [float(np.mean(v)) for v in values], marker="o", markersize=3,
                          color=colour)
        handle = line
        if len(seeds) > 1:
            band = ax.fill_between(epochs, [min(v) for v in values], [max(v) for v in values],
                                   color=colour, alpha=0.2, linewidth=0)
            handle = (band, line)  # one legend entry draws the band behind the line
        handles.append(handle)
        labels.append(SPLIT_LABELS[split])
    if config.keeps_best_val:  # where each seed's kept model comes from
        for i, epoch in enumerate(sorted(set((config.kept_epochs or {}).values()))):
            line = ax.axvline(epoch, color="grey", linestyle=":", linewidth=1.2)
            if i == 0:
                handles.append(line)
                labels.append("kept epoch (best validation)")
    seed_text = seed_count(len(seeds))
    legend_title = "line: mean; band: min–max over seeds" if len(seeds) > 1 else None
    ax.set_title(f"{config.name}: accuracy per epoch ({seed_text})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    _integer_epochs(ax, sorted({e for by_epoch in config_curves.values() for e in by_epoch}))
    ax.grid(True, alpha=0.3)
    ax.legend(handles, labels, title=legend_title, loc="best", fontsize="small",
              title_fontsize="small")
    return fig


def _plot_overlay(means: dict[str, dict[int, float]]) -> Figure:
    """Every configuration's mean test accuracy on one axes."""
    colours = _distinct_colours(len(means))
    fig, ax = new_figure((9 if len(means) > 8 else 8, 5))
    for colour, (name, curve) in zip(colours, means.items(), strict=True):
        epochs = sorted(curve)
        ax.plot(epochs, [curve[e] for e in epochs], marker="o", markersize=3, color=colour,
                label=name)
    ax.set_title("Test accuracy per epoch (mean over completed seeds)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    _integer_epochs(ax, sorted({e for curve in means.values() for e in curve}))
    ax.grid(True, alpha=0.3)
    if len(means) > 8:  # many sweep points: keep the legend off the curves
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    else:
        ax.legend(loc="lower right")
    return fig


def _plot_confusion(summary: Summary) -> Figure:
    """The best run's test confusion matrix with counts in the cells."""
    name, seed = summary.best.name, summary.best.seed
    matrix = np.array(summary.config(name).confusion_matrix[seed])
    accuracy = summary.best_test_accuracy
    fig, ax = new_figure((8.5, 7.5))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="images")
    ticks = range(len(CLASS_NAMES))
    ax.set_xticks(ticks, CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(ticks, CLASS_NAMES)
    threshold = matrix.max() / 2 if matrix.size else 0
    for row in range(matrix.shape[0]):
        for col in range(matrix.shape[1]):
            count = matrix[row, col]
            ax.text(col, row, f"{count:g}", ha="center", va="center", fontsize=8,
                    color="white" if count > threshold else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Test confusion matrix: {name}, seed {seed} (test accuracy {accuracy:.4f})")
    return fig


def _plot_per_class(per_class: dict[str, list[float]]) -> Figure:
    """Per-class test accuracy of each configuration: grouped bars, or a heatmap when many."""
    names = list(per_class)
    values = np.array([per_class[name] for name in names])
    title = "Per-class test accuracy (mean over completed seeds)"
    if len(names) > HEATMAP_ABOVE:
        fig, ax = new_figure((10, 1.5 + 0.45 * len(names)))
        low = values.min() if values.min() < 1.0 else 0.0
        image = ax.imshow(values, cmap="viridis", aspect="auto", vmin=low, vmax=1.0)
        fig.colorbar(image, ax=ax, label="test accuracy")
        ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), names)
        middle = (low + 1.0) / 2
        for row in range(values.shape[0]):
            for col in range(values.shape[1]):
                ax.text(col, row, f"{values[row, col]:.2f}", ha="center", va="center",
                        fontsize=7, color="black" if values[row, col] > middle else "white")
        ax.set_xlabel("class")
        ax.set_ylabel("configuration")
    else:
        fig, ax = new_figure((11, 5))
        width = 0.8 / len(names)
        positions = np.arange(len(CLASS_NAMES))
        colours = _distinct_colours(len(names))
        for index, (name, colour) in enumerate(zip(names, colours, strict=True)):
            offset = (index - (len(names) - 1) / 2) * width
            ax.bar(positions + offset, per_class[name], width, color=colour, label=name)
        ax.set_xticks(positions, CLASS_NAMES, rotation=30, ha="right")
        ax.set_ylim(0, 1.0)
        ax.set_xlabel("class")
        ax.set_ylabel("test accuracy")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    ax.set_title(title)
    return fig


def _per_class_means(summary: Summary) -> dict[str, list[float]]:
    """Mean per-class test accuracy over each configuration's completed seeds."""
    result = {}
    for config in summary.configs:
        rows = list(config.per_class_test_accuracy.values())
        if rows:
            result[config.name] = [float(v) for v in np.mean(np.array(rows), axis=0)]
    return result


def _distinct_colours(count: int) -> list:
    """Colours for configurations: Dark2 up to 8 (unlike the blue, orange and green that mean
    train, validation and test), tab20 up to 20, then evenly spaced viridis."""
    if count <= 8:
        return [matplotlib.colormaps["Dark2"](i) for i in range(count)]
    if count <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(count)]
    return [matplotlib.colormaps["viridis"](i / (count - 1)) for i in range(count)]


class ShownFigure(Figure):
    """A Figure that a notebook shows as a PNG (IPython asks for _repr_png_): made without
    pyplot, it has no backend that would show it."""

    def draw(self, renderer) -> None:
        """Every text as the characters it holds: no mathtext, also in the tick labels that are
        made while drawing."""
        for text in self.findobj(Text):
            text.set_parse_math(False)
        with matplotlib.rc_context(PLAIN_TEXT):
            super().draw(renderer)

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=DPI)
        return buffer.getvalue()


def new_figure(figsize: tuple[float, float]) -> tuple[Figure, Any]:
    """A figure of one axes, laid out tight whenever it is drawn (saved or shown)."""
    fig = ShownFigure(figsize=figsize, layout="tight")
    return fig, fig.subplots()


def save_figure(fig: Figure, path: Path) -> None:
    files.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))


def _integer_epochs(ax: Any, epochs: list[int]) -> None:
    """Whole epochs on the x axis (a 1-epoch run would otherwise get ticks like 0.96, 0.98)."""
    if len(epochs) <= 12:
        ax.set_xticks(epochs)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def seed_count(n: int) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")
