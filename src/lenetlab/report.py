"""Turn a finished run folder into plots and a Markdown report.

The report is built from two files only, `metrics.csv` (one row per configuration,
seed, epoch and split) and `summary.json` (final statistics, comparisons and
provenance), so it can be rebuilt at any time with `lenetlab report RUN_DIR`.
Both files are checked first: a damaged run folder gives one RunDirError line that
names the file, never a traceback from deep inside the plotting code.

Every sentence in the report is computed from the numbers in those files; nothing
about which variant is better is written in advance.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from . import files
from .data import CLASS_NAMES
from .errors import RunDirError
from .recipes import PUBLISHED

METRICS_HEADER = ["config", "variant", "seed", "epoch", "split", "loss", "accuracy"]
SPLITS = ("train", "val", "test")
SPLIT_LABELS = {"train": "train", "val": "validation", "test": "test"}
# The original notebook drew training in blue and evaluation in orange; test is added in green.
SPLIT_COLOURS = {"train": "tab:blue", "val": "tab:orange", "test": "tab:green"}
TARGET_ACCURACY = 0.88  # the original study's goal for test accuracy
HEATMAP_ABOVE = 6  # more configurations than this: per-class accuracy as a heatmap
DPI = 120

SUMMARY_KEYS = ("kind", "name", "reference", "configs", "comparisons", "best")
CONFIG_KEYS = (
    "name", "variant", "recipe", "seeds", "completed_seeds", "final", "best_seed",
    "per_class_test_accuracy", "confusion_matrix", "failed",
)
STAT_KEYS = ("mean", "std", "ci95", "n", "values")
COMPARISON_KEYS = ("name", "reference", "seeds", "mean_diff", "std", "ci95", "n", "excludes_zero")


def render_report(run_dir: Path) -> Path:
    """Validate the run folder, write its plots and report.md, and return report.md's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: not a folder")
    if not (run_dir / "summary.json").exists() and (run_dir / "run.json").is_file():
        raise RunDirError(f"{run_dir}: the run has not finished (no summary.json yet); "
                          f"finish it with lenetlab study --resume {run_dir} "
                          f"(or sweep --resume)")
    summary = load_summary(run_dir / "summary.json")
    curves = load_metrics(run_dir / "metrics.csv")
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    plots = write_plots(summary, curves, plots_dir)
    report_path = run_dir / "report.md"
    text = build_markdown(summary, plots)
    _write_atomic(report_path, lambda f: f.write(text.encode("utf-8")))
    return report_path


# ---------------------------------------------------------------------------
# Reading and checking the two input files
# ---------------------------------------------------------------------------

# Per-epoch accuracies: curves[config][split][epoch][seed] = accuracy
Curves = dict[str, dict[str, dict[int, dict[int, float]]]]


def load_metrics(path: Path) -> Curves:
    """Read metrics.csv into per-epoch accuracies, refusing a wrong header or a bad value."""
    rows = csv.reader(io.StringIO(_read_text(path), newline=""))
    try:
        return _read_metric_rows(rows, path)
    except csv.Error as error:
        raise RunDirError(f"{path}: line {rows.line_num}: not valid CSV ({error})") from None


def _read_metric_rows(rows: Any, path: Path) -> Curves:
    """Check the header, then every row's fields, naming the line of the first bad one."""
    header = next(rows, None)
    if header is None:
        raise RunDirError(f"{path}: empty file, expected the header {','.join(METRICS_HEADER)}")
    if header != METRICS_HEADER:
        raise RunDirError(
            f"{path}: header is {','.join(header)}, expected {','.join(METRICS_HEADER)}"
        )
    curves: Curves = {}
    for row in rows:
        line_number = rows.line_num
        if not row:
            continue
        if len(row) != len(METRICS_HEADER):
            raise RunDirError(
                f"{path}: line {line_number} has {len(row)} fields, expected {len(METRICS_HEADER)}"
            )
        config, _variant, seed, epoch, split, loss, accuracy = row
        where = f"{path}: line {line_number}"
        if split not in SPLITS:
            raise RunDirError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
        seed_number = _parse_int(seed, "seed", where)
        epoch_number = _parse_int(epoch, "epoch", where)
        _parse_float(loss, "loss", where)  # a diverged run may log nan; it must still be a number
        value = _parse_float(accuracy, "accuracy", where)
        if not 0.0 <= value <= 1.0:
            raise RunDirError(f"{where}: accuracy {accuracy!r} is not between 0 and 1")
        by_epoch = curves.setdefault(config, {}).setdefault(split, {})
        by_epoch.setdefault(epoch_number, {})[seed_number] = value
    return curves


def load_summary(path: Path) -> dict:
    """Read summary.json and check every key the report relies on."""
    text = _read_text(path)
    try:
        summary = json.loads(text)
    except json.JSONDecodeError as error:
        raise RunDirError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(summary, dict):
        raise RunDirError(f"{path}: expected a JSON object at the top level")
    _require_keys(summary, SUMMARY_KEYS, "", path)
    if summary["kind"] not in ("study", "sweep"):
        raise RunDirError(f"{path}: kind is {summary['kind']!r}, expected 'study' or 'sweep'")
    if not isinstance(summary["configs"], list) or not summary["configs"]:
        raise RunDirError(f"{path}: 'configs' must be a non-empty list")
    names = set()
    for index, config in enumerate(summary["configs"]):
        _check_config(config, f"configs[{index}]", path)
        if config["name"] in names:  # plots and comparisons find configurations by name
            raise RunDirError(f"{path}: configuration name {config['name']!r} appears twice")
        names.add(config["name"])
    if not isinstance(summary["comparisons"], list):
        raise RunDirError(f"{path}: 'comparisons' must be a list")
    for index, comparison in enumerate(summary["comparisons"]):
        where = f"comparisons[{index}]"
        _require_keys(comparison, COMPARISON_KEYS, where, path)
        if not isinstance(comparison["name"], str):
            raise RunDirError(f"{path}: {where}.name must be a string")
        for key in ("mean_diff", "std", "n"):
            _check_number(comparison[key], f"{where}.{key}", path)
        _check_interval(comparison["ci95"], f"{where}.ci95", path)
    if summary["best"] is not None:
        _check_best(summary, path)
    _check_provenance(summary, path)
    return summary


def _check_provenance(summary: dict, path: Path) -> None:
    """The optional run details: objects where the report reads keys, a finite wall time."""
    for key in ("data", "versions", "machine"):
        if summary.get(key) is not None and not isinstance(summary[key], dict):
            raise RunDirError(f"{path}: {key} must be an object")
    checksums = (summary.get("data") or {}).get("sha256")
    if checksums is not None and not isinstance(checksums, dict):
        raise RunDirError(f"{path}: data.sha256 must be an object")
    wall = summary.get("wall_time_s")
    if wall is not None and (isinstance(wall, bool) or not isinstance(wall, (int, float))
                             or not math.isfinite(wall) or wall < 0):
        raise RunDirError(f"{path}: wall_time_s is {wall!r}, not a duration in seconds")


def _check_config(config: Any, where: str, path: Path) -> None:
    """One entry of 'configs': its keys, final statistics and per-seed test results."""
    _require_keys(config, CONFIG_KEYS, where, path)
    if not isinstance(config["name"], str) or not config["name"]:
        raise RunDirError(f"{path}: {where}.name must be a non-empty string")
    where = f"{where} ({config['name']!r})"
    if not isinstance(config["variant"], str) or not isinstance(config["recipe"], dict):
        raise RunDirError(f"{path}: {where}: variant must be a string and recipe an object")
    for key in ("seeds", "completed_seeds", "failed"):
        if not isinstance(config[key], list):
            raise RunDirError(f"{path}: {where}.{key} must be a list")
    for index, failure in enumerate(config["failed"]):
        _require_keys(failure, ("seed", "error"), f"{where}.failed[{index}]", path)
    if config["final"] is not None:
        _require_keys(config["final"], SPLITS, f"{where}.final", path)
        for split in SPLITS:
            stat_where = f"{where}.final.{split}"
            stats = config["final"][split]
            _require_keys(stats, STAT_KEYS, stat_where, path)
            for key in ("mean", "std", "n"):
                _check_number(stats[key], f"{stat_where}.{key}", path)
            _check_interval(stats["ci95"], f"{stat_where}.ci95", path)
            if not isinstance(stats["values"], dict):
                raise RunDirError(f"{path}: {stat_where}.values must be an object keyed by seed")
            for seed, value in stats["values"].items():
                _check_number(value, f"{stat_where}.values[{seed}]", path)
    for key in ("seeds", "completed_seeds"):
        for seed in config[key]:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise RunDirError(f"{path}: {where}.{key} holds {seed!r}, not a whole number")
    per_class = config["per_class_test_accuracy"]
    for seed, accuracies in _as_dict(per_class, f"{where}.per_class_test_accuracy", path).items():
        seed_where = f"{where}.per_class_test_accuracy[{seed}]"
        if not isinstance(accuracies, list) or len(accuracies) != len(CLASS_NAMES):
            raise RunDirError(f"{path}: {seed_where} must be a list of {len(CLASS_NAMES)} numbers")
        for value in accuracies:
            _check_number(value, seed_where, path)
    matrices = _as_dict(config["confusion_matrix"], f"{where}.confusion_matrix", path)
    for seed, matrix in matrices.items():
        size = len(CLASS_NAMES)
        if not (
            isinstance(matrix, list)
            and len(matrix) == size
            and all(isinstance(row, list) and len(row) == size for row in matrix)
        ):
            raise RunDirError(f"{path}: {where}.confusion_matrix[{seed}] must be {size}x{size}")
        for row in matrix:
            for count in row:
                _check_number(count, f"{where}.confusion_matrix[{seed}]", path)


def _check_best(summary: dict, path: Path) -> None:
    """'best' must name a configuration and a seed whose confusion matrix is recorded."""
    best = summary["best"]
    _require_keys(best, ("name", "seed"), "best", path)
    config = _config_named(summary, best["name"])
    if config is None:
        raise RunDirError(f"{path}: best names {best['name']!r}, which is not in 'configs'")
    if str(best["seed"]) not in config["confusion_matrix"]:
        raise RunDirError(
            f"{path}: best is {best['name']!r} seed {best['seed']}, "
            "which has no confusion matrix"
        )


def _require_keys(obj: Any, keys: tuple[str, ...], where: str, path: Path) -> None:
    if not isinstance(obj, dict):
        raise RunDirError(f"{path}: {where or 'top level'} must be a JSON object")
    for key in keys:
        if key not in obj:
            location = f" in {where}" if where else ""
            raise RunDirError(f"{path}: missing key {key!r}{location}")


def _check_number(value: Any, where: str, path: Path) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RunDirError(f"{path}: {where} is {value!r}, not a number")


def _check_interval(value: Any, where: str, path: Path) -> None:
    if not isinstance(value, list) or len(value) != 2:
        raise RunDirError(f"{path}: {where} must be a list [low, high]")
    for end in value:
        _check_number(end, where, path)


def _as_dict(value: Any, where: str, path: Path) -> dict:
    if not isinstance(value, dict):
        raise RunDirError(f"{path}: {where}: expected an object keyed by seed, got {value!r}")
    return value


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise RunDirError(f"{path}: missing (is this a lenetlab run folder?)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RunDirError(f"{path}: not UTF-8 text") from None
    except OSError as error:
        raise RunDirError(f"{path}: cannot be read ({error.strerror})") from None


def _parse_int(text: str, field: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise RunDirError(f"{where}: {field} {text!r} is not a whole number") from None


def _parse_float(text: str, field: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise RunDirError(f"{where}: {field} {text!r} is not a number") from None


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------


def write_plots(summary: dict, curves: Curves, plots_dir: Path) -> list[tuple[str, str]]:
    """Draw every plot the data allows; return (caption, path relative to the run folder)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    plots: list[tuple[str, str]] = []
    file_names = _plot_file_names([config["name"] for config in summary["configs"]])

    for config in summary["configs"]:
        config_curves = _completed_curves(config, curves)
        if config_curves:
            name = file_names[config["name"]]
            _plot_convergence(config, config_curves, plots_dir / name)
            plots.append((f"{config['name']}: accuracy per epoch", f"plots/{name}"))

    means = {
        config["name"]: _mean_curve(_completed_curves(config, curves).get("test", {}))
        for config in summary["configs"]
    }
    means = {name: curve for name, curve in means.items() if curve}
    if means:
        _plot_overlay(means, plots_dir / "test_accuracy_overlay.png")
        plots.append(("Mean test accuracy per epoch", "plots/test_accuracy_overlay.png"))

    if summary["best"] is not None:
        _plot_confusion(summary, plots_dir / "confusion_matrix_best.png")
        plots.append(("Confusion matrix of the best run", "plots/confusion_matrix_best.png"))

    per_class = _per_class_means(summary)
    if per_class:
        _plot_per_class(per_class, plots_dir / "per_class_accuracy.png")
        plots.append(("Per-class test accuracy", "plots/per_class_accuracy.png"))
    return plots


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


def _completed_curves(config: dict, curves: Curves) -> dict[str, dict[int, dict[int, float]]]:
    """The config's curves restricted to seeds that completed (a failed seed may have logged
    some epochs before it stopped; those would bias the mean)."""
    completed = {int(seed) for seed in config["completed_seeds"]}
    result = {}
    for split, by_epoch in curves.get(config["name"], {}).items():
        kept = {
            epoch: {seed: value for seed, value in by_seed.items() if seed in completed}
            for epoch, by_seed in by_epoch.items()
        }
        kept = {epoch: by_seed for epoch, by_seed in kept.items() if by_seed}
        if kept:
            result[split] = kept
    return result


def _mean_curve(by_epoch: dict[int, dict[int, float]]) -> dict[int, float]:
    return {epoch: float(np.mean(list(by_seed.values()))) for epoch, by_seed in by_epoch.items()}


def _plot_convergence(
    config: dict, config_curves: dict[str, dict[int, dict[int, float]]], path: Path
) -> None:
    """Mean accuracy per epoch for each split, with the range over seeds shaded."""
    import matplotlib.pyplot as plt

    seeds = {seed for by_epoch in config_curves.values() for by in by_epoch.values() for seed in by}
    fig, ax = plt.subplots(figsize=(8, 5))
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
    seed_text = _seed_count(len(seeds))
    legend_title = "line: mean; band: min–max over seeds" if len(seeds) > 1 else None
    ax.set_title(f"{config['name']}: accuracy per epoch ({seed_text})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    ax.legend(handles, labels, title=legend_title, loc="best", fontsize="small",
              title_fontsize="small")
    _save_figure(fig, path)


def _plot_overlay(means: dict[str, dict[int, float]], path: Path) -> None:
    """Every configuration's mean test accuracy on one axes."""
    import matplotlib.pyplot as plt

    colours = _distinct_colours(len(means))
    fig, ax = plt.subplots(figsize=(9 if len(means) > 8 else 8, 5))
    for colour, (name, curve) in zip(colours, means.items(), strict=True):
        epochs = sorted(curve)
        ax.plot(epochs, [curve[e] for e in epochs], marker="o", markersize=3, color=colour,
                label=name)
    ax.set_title("Test accuracy per epoch (mean over completed seeds)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    if len(means) > 8:  # many sweep points: keep the legend off the curves
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    else:
        ax.legend(loc="lower right")
    _save_figure(fig, path)


def _plot_confusion(summary: dict, path: Path) -> None:
    """The best run's test confusion matrix with counts in the cells."""
    import matplotlib.pyplot as plt

    name, seed = summary["best"]["name"], summary["best"]["seed"]
    config = _config_named(summary, name)
    matrix = np.array(config["confusion_matrix"][str(seed)])
    accuracy = _best_test_accuracy(summary)
    fig, ax = plt.subplots(figsize=(8.5, 7.5))
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
    _save_figure(fig, path)


def _plot_per_class(per_class: dict[str, list[float]], path: Path) -> None:
    """Per-class test accuracy of each configuration: grouped bars, or a heatmap when many."""
    import matplotlib.pyplot as plt

    names = list(per_class)
    values = np.array([per_class[name] for name in names])
    title = "Per-class test accuracy (mean over completed seeds)"
    if len(names) > HEATMAP_ABOVE:
        fig, ax = plt.subplots(figsize=(10, 1.5 + 0.45 * len(names)))
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
        fig, ax = plt.subplots(figsize=(11, 5))
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
    _save_figure(fig, path)


def _per_class_means(summary: dict) -> dict[str, list[float]]:
    """Mean per-class test accuracy over each configuration's completed seeds."""
    result = {}
    for config in summary["configs"]:
        completed = {str(seed) for seed in config["completed_seeds"]}
        rows = [acc for seed, acc in config["per_class_test_accuracy"].items() if seed in completed]
        if rows:
            result[config["name"]] = [float(v) for v in np.mean(np.array(rows), axis=0)]
    return result


def _distinct_colours(count: int) -> list:
    """Colours for configurations: Dark2 up to 8 (unlike the blue, orange and green that mean
    train, validation and test), tab20 up to 20, then evenly spaced viridis."""
    import matplotlib

    if count <= 8:
        return [matplotlib.colormaps["Dark2"](i) for i in range(count)]
    if count <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(count)]
    return [matplotlib.colormaps["viridis"](i / (count - 1)) for i in range(count)]


def _save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        _write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
    finally:
        plt.close(fig)


def _write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write through a temporary file in the same folder, so a reader never sees half a file."""
    files.atomic_write(path, write, binary=True)


# ---------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------


def build_markdown(summary: dict, plots: list[tuple[str, str]]) -> str:
    """The whole report.md text: results first, provenance last."""
    kind = summary["kind"]
    configs = _ordered_configs(summary)
    lines = [f"# {summary['name']}: lenetlab {kind} report", ""]
    created = summary.get("created")
    version = summary.get("lenetlab_version")
    if created or version:
        lines += [f"Created {created or 'at an unrecorded time'} by lenetlab "
                  f"{version or '(version not recorded)'}.", ""]
    lines += _how_to_read(kind)
    lines += _results_section(summary, configs)
    lines += _comparisons_section(summary)
    lines += _failures_section(configs)
    lines += _plots_section(plots)
    lines += _provenance_section(summary)
    return "\n".join(lines).rstrip() + "\n"


def _ordered_configs(summary: dict) -> list[dict]:
    """A study keeps its recipe order; a sweep is ranked by mean test accuracy, failures last."""
    configs = list(summary["configs"])
    if summary["kind"] == "sweep":
        configs.sort(key=lambda c: -c["final"]["test"]["mean"] if c["final"] else math.inf)
    return configs


def _how_to_read(kind: str) -> list[str]:
    order = (
        "Configurations are listed in the study's recipe order."
        if kind == "study"
        else "Configurations are ranked by mean test accuracy, highest first."
    )
    return [
        "## How to read this report",
        "",
        "Each configuration was trained once per random seed. Accuracies are those after "
        "the last epoch, written as *mean ± half-width of the 95% confidence interval of the "
        "mean* (Student t over seeds). A configuration with one completed seed has no interval "
        "and shows *n/a, 1 seed*. Validation accuracy is measured on images held out from the "
        "training set; test accuracy on the separate 10,000 Fashion-MNIST test images. "
        "Comparisons pair two configurations seed by seed; a difference whose interval excludes "
        "zero is larger than the seed-to-seed noise at the 95% level, one whose interval "
        f"includes zero is not. {order}",
        "",
    ]


def _results_section(summary: dict, configs: list[dict]) -> list[str]:
    study = summary["kind"] == "study"
    published = study and any(c["name"] in PUBLISHED for c in configs)
    any_failed = any(c["failed"] for c in configs)
    header = ["Configuration", "Seeds completed", "Train", "Validation", "Test"]
    if published:
        header += ["Published train (1 run)", "Published validation (1 run)"]
    if any_failed:
        header.append("Failures")
    lines = ["## Results", "", _table_row(header), _table_row(["---"] * len(header))]
    for config in configs:
        cells = [config["name"], f"{len(config['completed_seeds'])}/{len(config['seeds'])}"]
        if config["final"] is None:
            cells += ["failed"] * 3
        else:
            cells += [_format_stat(config["final"][split]) for split in SPLITS]
        if published:
            figures = PUBLISHED.get(config["name"])
            cells += [f"{v:.4f}" for v in figures] if figures else ["", ""]
        if any_failed:
            errors = [_short(f"seed {f['seed']}: {f['error']}") for f in config["failed"]]
            cells.append("; ".join(errors))
        lines.append(_table_row(cells))
    lines.append("")
    if published:
        lines += [
            "The published columns are the original study's figures: one run per variant, and "
            "its “test” figures were **validation** accuracy (the notebook never evaluated the "
            "test set). Compare them with the Validation column, not with Test.",
            "",
        ]
    lines += _result_sentences(configs)
    if summary["best"] is not None:
        best = summary["best"]
        lines += [
            f"The best single run is {best['name']} seed {best['seed']}, with test accuracy "
            f"{_best_test_accuracy(summary):.4f}; its confusion matrix is among the plots.",
            "",
        ]
    return lines


def _result_sentences(configs: list[dict]) -> list[str]:
    """What the numbers say: the top configuration and which reach the target accuracy."""
    finished = [c for c in configs if c["final"] is not None]
    if not finished:
        return ["No configuration completed a seed, so there are no results.", ""]
    top = max(finished, key=lambda c: c["final"]["test"]["mean"])
    top_test = top["final"]["test"]
    sentences = [
        f"The highest mean test accuracy is **{top['name']}**'s: {_format_stat(top_test)} "
        f"over {_seed_count(top_test['n'])}."
    ]
    reaching = [c for c in finished if c["final"]["test"]["mean"] >= TARGET_ACCURACY]
    confident = [
        c["name"] for c in reaching
        if c["final"]["test"]["n"] >= 2 and c["final"]["test"]["ci95"][0] >= TARGET_ACCURACY
    ]
    missing = [c["name"] for c in finished if c not in reaching]
    if reaching:
        if len(confident) == len(reaching):
            interval_text = ", and for each of them the whole 95% interval lies above it."
        elif confident:
            interval_text = f"; for {_join(confident)} the whole 95% interval lies above it."
        else:
            interval_text = "; for none of them does the whole 95% interval lie above it."
        sentences.append(
            f"Mean test accuracy reaches the original study's target of {TARGET_ACCURACY:.2f} "
            f"for {_join([c['name'] for c in reaching])}{interval_text}"
        )
    if missing:
        sentences.append(f"It stays below {TARGET_ACCURACY:.2f} for {_join(missing)}.")
    return [" ".join(sentences), ""]


def _comparisons_section(summary: dict) -> list[str]:
    lines = ["## Comparisons with the reference", ""]
    comparisons = summary["comparisons"]
    if not comparisons:
        reason = (
            "No reference configuration was set"
            if summary["reference"] is None
            else f"No configuration could be paired with the reference {summary['reference']!r}"
        )
        return lines + [f"{reason}, so there are no paired comparisons.", ""]
    header = ["Configuration", "Reference", "Paired seeds", "Test accuracy difference",
              "95% interval", "Excludes zero"]
    lines += [_table_row(header), _table_row(["---"] * len(header))]
    for c in comparisons:
        interval = "n/a, 1 seed" if c["n"] < 2 else f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]"
        lines.append(_table_row([
            c["name"], c["reference"], str(c["n"]), f"{c['mean_diff']:+.4f}", interval,
            "yes" if c["excludes_zero"] else "no",
        ]))
    lines += ["", "Differences are configuration minus reference, in test accuracy "
              "(+0.0100 is one percentage point better).", ""]
    excluded = [c for c in comparisons if c["excludes_zero"]]
    included = [c for c in comparisons if not c["excludes_zero"] and c["n"] >= 2]
    single = [c["name"] for c in comparisons if c["n"] < 2]
    sentences = []
    if excluded:
        described = [f"{c['name']} ({'better' if c['mean_diff'] > 0 else 'worse'} by "
                     f"{abs(c['mean_diff']):.4f})" for c in excluded]
        sentences.append(f"The 95% interval excludes zero for {_join(described)}.")
    else:
        sentences.append("No comparison has a 95% interval that excludes zero.")
    if included:
        sentences.append(
            f"For {_join([c['name'] for c in included])} the interval includes zero: the "
            "difference is within the seed-to-seed noise of this run."
        )
    if single:
        sentences.append(f"{_join(single)} paired only one seed, which gives no interval.")
    return lines + [" ".join(sentences), ""]


def _failures_section(configs: list[dict]) -> list[str]:
    failures = [(c["name"], f) for c in configs for f in c["failed"]]
    if not failures:
        return []
    lines = ["## Failed trials", ""]
    for name, failure in failures:
        # one line, in a code span so that *, _ or < in a traceback stay literal
        error = " ".join(str(failure["error"]).split()).replace("`", "'")
        lines.append(f"- {name}, seed {failure['seed']}: `{error}`")
    return lines + [""]


def _plots_section(plots: list[tuple[str, str]]) -> list[str]:
    lines = ["## Plots", ""]
    if not plots:
        return lines + ["No plots: no seed completed.", ""]
    for caption, relative_path in plots:
        lines += [f"### {caption}", "", f"![{caption}]({relative_path})", ""]
    return lines


def _provenance_section(summary: dict) -> list[str]:
    """How the run was made: configuration, data, software, machine and time."""
    lines = ["## Run details", ""]
    lines += _recipe_table(summary["configs"])
    if summary.get("config") is not None:
        lines += ["### Run configuration", "", "```json",
                  json.dumps(summary["config"], indent=2, default=str), "```", ""]
    data = summary.get("data") or {}
    lines += ["### Data", "", f"Folder: `{data.get('folder', 'not recorded')}`", ""]
    checksums = data.get("sha256") or {}
    if checksums:
        lines += [_table_row(["File", "SHA-256"]), _table_row(["---", "---"])]
        lines += [_table_row([file, f"`{digest}`"]) for file, digest in checksums.items()]
        lines.append("")
    for title, key in (("Versions", "versions"), ("Machine", "machine")):
        entries = summary.get(key) or {}
        lines += [f"### {title}", ""]
        lines += [f"- {name}: {value}" for name, value in entries.items()] or ["- not recorded"]
        lines.append("")
    wall = summary.get("wall_time_s")
    wall_text = _format_duration(wall) if isinstance(wall, (int, float)) else "not recorded"
    lines += ["### Wall time", "", wall_text, ""]
    return lines


def _recipe_table(configs: list[dict]) -> list[str]:
    """One row per configuration, one column per hyperparameter any recipe has."""
    keys: list[str] = []
    for config in configs:
        keys += [key for key in config["recipe"] if key not in keys and key != "name"]
    lines = ["### Recipes", "", _table_row(["Configuration", "Variant", *keys]),
             _table_row(["---"] * (len(keys) + 2))]
    for config in configs:
        recipe = config["recipe"]
        lines.append(_table_row([config["name"], config["variant"],
                                 *(_format_value(recipe.get(key, "")) for key in keys)]))
    return lines + [""]


# ---------------------------------------------------------------------------
# Small formatting helpers
# ---------------------------------------------------------------------------


def _format_stat(stats: dict) -> str:
    """mean ± half-width of the 95% interval, or the mean alone for a single seed."""
    if stats["n"] < 2:
        return f"{stats['mean']:.4f} (n/a, 1 seed)"
    low, high = stats["ci95"]
    return f"{stats['mean']:.4f} ± {(high - low) / 2:.4f}"


def _format_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _format_duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    clock = f"{hours} h {minutes} min {rest} s" if hours else f"{minutes} min {rest} s"
    return f"{seconds:.1f} s ({clock})"


def _seed_count(n: int) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")


def _best_test_accuracy(summary: dict) -> float:
    """The best run's test accuracy as recorded, or from its confusion matrix if not recorded."""
    name, seed = summary["best"]["name"], str(summary["best"]["seed"])
    config = _config_named(summary, name)
    if config["final"] is not None and seed in config["final"]["test"]["values"]:
        return float(config["final"]["test"]["values"][seed])
    matrix = np.array(config["confusion_matrix"][seed])
    return float(np.trace(matrix) / matrix.sum()) if matrix.sum() else 0.0


def _config_named(summary: dict, name: str) -> dict | None:
    return next((c for c in summary["configs"] if c["name"] == name), None)


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _table_row(cells: list[str]) -> str:
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"
