"""The report: tables, comparisons and sentences computed from a run's summary, with its plots,
as report.md and as report.html (the same text, one self-contained page).

finalize() hands the summary to render_report in memory; `lenetlab report RUN_DIR` reads
summary.json and metrics.csv back (summary.read_summary checks them against the checksums
recorded when they were written). Every sentence is computed from the numbers; nothing
about which variant is better is written in advance.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import shlex
from pathlib import Path
from typing import Any

from . import files
from .errors import RunDirError
from .markup import Md, code, md, plain, to_html
from .plots import seed_count, write_plots
from .recipes import ORIGINAL_FIELDS, PUBLISHED, RECIPES, extensions
from .records import SPLITS, ConfigSummary, Stat, Summary
from .rundir import plan_path
from .summary import Curves, read_summary

TARGET_ACCURACY = 0.88  # the original study's goal for test accuracy


def render_report(run_dir: Path, summary: Summary | None = None, curves: Curves | None = None) -> Path:
    """Write the plots and report.md of a run folder; read its files when not given them."""
    run_dir = Path(run_dir)
    if summary is None:
        if not run_dir.is_dir():
            raise RunDirError(f"{run_dir}: not a folder")
        if not (run_dir / "summary.json").exists() and plan_path(run_dir).is_file():
            raise RunDirError(f"{run_dir}: the run has not finished (no summary.json yet); "
                              f"finish it with: lenetlab resume {shlex.quote(str(run_dir))}")
        summary, curves = read_summary(run_dir)
    plots = write_plots(summary, curves, run_dir / "plots")
    path = run_dir / "report.md"
    text = build_markdown(summary, plots)
    files.write_text(path, text)
    files.write_text(run_dir / "report.html", build_html(text, summary.name, run_dir))
    return path


# report.html: no script, no request. Plots are embedded (data: URIs), so the page is one file
# to open, keep or send; print rules keep each plot, table row and heading with what follows it.
_STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
       color: #1b1b1b; }
table { border-collapse: collapse; margin: 1rem 0; font-variant-numeric: tabular-nums; }
/* a table wider than the page (the recipes: a column per field) scrolls in its own box, so the
   page itself never scrolls sideways */
@media screen { table { display: block; max-width: 100%; overflow-x: auto; } }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; }
th { background: #f2f2f2; }
img { max-width: 100%; height: auto; display: block; }
code { background: #f2f2f2; padding: 0 0.2rem; }
pre { background: #f2f2f2; padding: 0.5rem; overflow-x: auto; }
@media print {
  body { max-width: none; margin: 0; font-size: 11pt; }
  img, tr, figure { break-inside: avoid; page-break-inside: avoid; }
  img { max-height: 24cm; }
  h1, h2, h3 { break-after: avoid; page-break-after: avoid; }
}
"""
_IMG = re.compile(r'<img alt="([^"]*)" src="([^"]+\.png)"\s*/?>')


def embedded_png(path: Path, alt: str, style: str = "") -> str:
    """An <img> carrying the PNG file itself (a data URI): the page needs no other file. alt is
    HTML already (escaped)."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    style = f' style="{style}"' if style else ""
    return f'<img alt="{alt}"{style} src="data:image/png;base64,{data}">'


def build_html(text: str, title: str, run_dir: Path) -> str:
    """report.md's text as one HTML page, its plots read from run_dir and embedded."""
    own_plots = {f"plots/{png.name}" for png in (run_dir / "plots").glob("*.png")}
    body = to_html(text, image_sources=own_plots)

    def embed(match: re.Match) -> str:
        plot = run_dir / html.unescape(match[2])
        if not plot.is_file():  # write_plots just wrote every plot it lists; keep the link otherwise
            return match[0]
        return embedded_png(plot, match[1])

    body = _IMG.sub(embed, body)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(plain(title))}: lenetlab report</title>\n<style>{_STYLE}</style>\n"
            f"</head>\n<body>\n{body}\n</body>\n</html>\n")


def build_markdown(summary: Summary, plots: list[tuple[str, str]]) -> str:
    """The whole report.md text: results first, provenance last."""
    kind = summary.kind
    configs = _ordered_configs(summary)
    lines = [Md("# {}: lenetlab {} report").format(summary.name, kind), "",
             Md("Created {} by lenetlab {}.").format(summary.created, summary.lenetlab_version), ""]
    lines += _how_to_read(kind)
    lines += _results_section(summary, configs)
    lines += _comparisons_section(summary)
    lines += _failures_section(configs)
    lines += _plots_section(plots)
    lines += _provenance_section(summary)
    return "\n".join(lines).rstrip() + "\n"


def _ordered_configs(summary: Summary) -> list[ConfigSummary]:
    """A study keeps its recipe order; a sweep is ranked by mean test accuracy, failures last."""
    configs = list(summary.configs)
    if summary.kind == "sweep":
        configs.sort(key=lambda c: -c.final["test"].mean if c.final else math.inf)
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
        "Each configuration was trained once per random seed. Accuracies are those of the kept "
        "model: the last epoch's, or, for a recipe with checkpoint best_val, the epoch's with the "
        "highest validation accuracy (the test set chooses nothing). They are written as *mean ± "
        "half-width of the 95% confidence interval of the "
        "mean* (Student t over seeds). A configuration with one completed seed has no interval "
        "and shows *n/a, 1 seed*. Validation accuracy is measured on images held out from the "
        "training set; test accuracy on the separate 10,000 Fashion-MNIST test images. "
        "Comparisons pair two configurations seed by seed; a difference whose interval excludes "
        "zero is larger than the seed-to-seed noise at the 95% level, one whose interval "
        f"includes zero is not. {order}",
        "",
    ]


def _results_section(summary: Summary, configs: list[ConfigSummary]) -> list[str]:
    study = summary.kind == "study"
    published = study and any(c.name in PUBLISHED for c in configs)
    any_failed = any(c.failed for c in configs)
    flip = any(c.test_flip for c in configs)
    kept = any(c.keeps_best_val for c in configs)
    header = ["Configuration", "Seeds completed", "Train", "Validation", "Test"]
    if flip:
        header.append("Test, flip-averaged")
    if kept:
        header.append("Kept epochs")
    if published:
        header += ["Published train (1 run)", "Published validation (1 run)"]
    if any_failed:
        header.append("Failures")
    lines = ["## Results", "", _table_row(header), _table_row(["---"] * len(header))]
    for config in configs:
        cells = [md(config.name), f"{len(config.completed_seeds)}/{len(config.seeds)}"]
        if config.final is None:
            cells += ["failed"] * 3
        else:
            cells += [_format_stat(config.final[split]) for split in SPLITS]
        if flip:
            cells.append(_format_stat(config.test_flip) if config.test_flip else "")
        if kept:
            epochs = (config.kept_epochs or {}).values()
            cells.append(", ".join(str(e) for e in epochs) if config.keeps_best_val else "last")
        if published:
            figures = PUBLISHED.get(config.name)
            cells += [f"{v:.4f}" for v in figures] if figures else ["", ""]
        if any_failed:
            errors = [_short(f"seed {f.seed}: {f.error}") for f in config.failed]
            cells.append("; ".join(errors))
        lines.append(_table_row(cells))
    lines.append("")
    if flip:
        lines += ["Flip-averaged test accuracy averages the predicted probabilities of each test image "
                  "and its mirror image, for recipes trained with flips; it is reported beside, not "
                  "instead of, the plain test accuracy.", ""]
    if published:
        lines += [
            "The published columns are the original study's figures: one run per variant, and "
            "its “test” figures were **validation** accuracy (the notebook never evaluated the "
            "test set). Compare them with the Validation column, not with Test.",
            "",
        ]
        shortened = _shortened(summary, configs)
        if shortened:
            lines += [Md("**Not comparable with the published figures:** this run {}, while "
                         "the original trained 12 epochs (20 for l2\\_optimized) on all 54,000 training "
                         "images.").format(shortened), ""]
    lines += _result_sentences(configs)
    if summary.best is not None:
        lines += [
            Md("The best single run is {} seed {}, with test accuracy {:.4f}; its confusion matrix is "
               "among the plots.").format(summary.best.name, summary.best.seed, summary.best_test_accuracy),
            "",
        ]
    return lines


def _shortened(summary: Summary, configs: list[ConfigSummary]) -> str:
    """How this run was made smaller than the original's recipes, or '' when it was not."""
    ways = []
    subset = summary.settings.options.train_subset
    if subset:
        ways.append(f"trained on {subset:,} images only")
    if any(c.recipe.epochs != RECIPES[c.name].epochs for c in configs if c.name in RECIPES):
        ways.append("trained fewer or more epochs (--epochs-scale)")
    return " and ".join(ways)


def _result_sentences(configs: list[ConfigSummary]) -> list[str]:
    """What the numbers say: the top configuration and which reach the target accuracy."""
    finished = [c for c in configs if c.final is not None]
    if not finished:
        return ["No configuration completed a seed, so there are no results.", ""]
    top = max(finished, key=lambda c: c.final["test"].mean)
    top_test = top.final["test"]
    sentences = [
        Md("The highest mean test accuracy is **{}**'s: {} over {}.").format(
            top.name, _format_stat(top_test), seed_count(top_test.n))
    ]
    reaching = [c for c in finished if c.final["test"].mean >= TARGET_ACCURACY]
    confident = [
        c.name for c in reaching
        if c.final["test"].n >= 2 and c.final["test"].ci95[0] >= TARGET_ACCURACY
    ]
    missing = [c.name for c in finished if c not in reaching]
    sentences.append(f"The original study aimed at a test accuracy of {TARGET_ACCURACY:.2f} (88%).")
    single_seeds = all(c.final["test"].n < 2 for c in reaching)
    if reaching and single_seeds:
        sentences.append(Md("Mean test accuracy reaches it for {}; with one seed there is no interval "
                            "to say how sure that is.").format(_join([c.name for c in reaching])))
    elif reaching:
        if len(confident) == len(reaching):
            interval_text = ", and for each of them the whole 95% interval lies above it."
        elif confident:
            interval_text = Md("; for {} the whole 95% interval lies above it.").format(_join(confident))
        else:
            interval_text = "; for none of them does the whole 95% interval lie above it."
        sentences.append(Md("Mean test accuracy reaches it for {}{}").format(
            _join([c.name for c in reaching]), Md(interval_text)))
    if missing:
        sentences.append(Md("It stays below {:.2f} for {}.").format(TARGET_ACCURACY, _join(missing)))
    return [Md(" ").join(map(Md, sentences)), ""]


def _comparisons_section(summary: Summary) -> list[str]:
    lines = ["## Comparisons with the reference", ""]
    comparisons = summary.comparisons
    if not comparisons:
        reason = (
            Md("No reference configuration was set")
            if summary.reference is None
            else Md("No configuration could be paired with the reference {!r}").format(summary.reference)
        )
        return lines + [Md("{}, so there are no paired comparisons.").format(reason), ""]
    header = ["Configuration", "Reference", "Paired seeds", "Test accuracy difference",
              "95% interval", "Excludes zero"]
    lines += [_table_row(header), _table_row(["---"] * len(header))]
    for c in comparisons:
        interval = "n/a, 1 seed" if c.n < 2 else f"[{c.ci95[0]:+.4f}, {c.ci95[1]:+.4f}]"
        lines.append(_table_row([
            md(c.name), md(c.reference), str(c.n), f"{c.mean_diff:+.4f}", interval,
            "yes" if c.excludes_zero else "no",
        ]))
    lines += ["", "Differences are configuration minus reference, in test accuracy "
              "(+0.0100 is one percentage point better).", ""]
    excluded = [c for c in comparisons if c.excludes_zero]
    included = [c for c in comparisons if not c.excludes_zero and c.n >= 2]
    single = [c.name for c in comparisons if c.n < 2]
    sentences = []
    if excluded:
        described = [Md("{} ({} by {:.4f})").format(c.name, "better" if c.mean_diff > 0 else "worse",
                                                     abs(c.mean_diff)) for c in excluded]
        sentences.append(Md("The 95% interval excludes zero for {}.").format(_join(described)))
    else:
        sentences.append("No comparison has a 95% interval that excludes zero.")
    if included:
        sentences.append(Md("For {} the interval includes zero: the difference is within the "
                            "seed-to-seed noise of this run.").format(_join([c.name for c in included])))
    if single:
        sentences.append(Md("{} paired only one seed, which gives no interval.").format(_join(single)))
    return lines + [Md(" ").join(map(Md, sentences)), ""]


def _failures_section(configs: list[ConfigSummary]) -> list[str]:
    failures = [(c.name, f) for c in configs for f in c.failed]
    if not failures:
        return []
    lines = ["## Failed trials", ""]
    for name, failure in failures:
        # one line, in a code span where it fits in one
        error = " ".join(str(failure.error).split())
        lines.append(Md("- {}, seed {}: {}").format(name, failure.seed, code(error)))
    return lines + [""]


def _plots_section(plots: list[tuple[str, str]]) -> list[str]:
    lines = ["## Plots", ""]
    if not plots:
        return lines + ["No plots: no seed completed.", ""]
    for caption, relative_path in plots:
        lines += [Md("### {}").format(caption), "", Md("![{}]({})").format(caption, Md(relative_path)), ""]
    return lines


def _provenance_section(summary: Summary) -> list[str]:
    """How the run was made: configuration, data, software, machine and time."""
    lines = ["## Run details", ""]
    lines += _recipe_table(summary.configs)
    lines += ["### Run configuration", "", "```json", json.dumps(summary.settings.to_dict(), indent=2),
              "```", ""]
    lines += [Md("Trained with the {} kernels (native: lenetlab's own CPU training step; torch: "
                 "PyTorch's).").format(Md(" and ").join(summary.kernels) or "no"), ""]
    # the native builds, whose rounding the numbers carry (TrainedOn.build; none in older results)
    builds = sorted({b for c in summary.configs for b in c.builds if b != "torch"})
    if builds:
        lines += [Md("Native build{}: {} (the same seed on the same build gives the same numbers).").format(
            Md("s" if len(builds) > 1 else ""), Md("; ").join(code(b) for b in builds)), ""]
    mixed = [c for c in summary.configs if len(c.builds) > 1]
    if mixed:  # its seeds differ by where they ran, not only by seed
        lines += [Md("**Mixed builds:** {}: their spread includes the builds' rounding, not only the "
                     "seeds'.").format(Md("; ").join(
                         Md("{}'s seeds were trained by different builds ({})").format(
                             c.name, Md(" | ").join(c.builds)) for c in mixed)), ""]
    lines += ["### Data", "", Md("Folder: {}").format(code(summary.data_folder)), "",
              _table_row(["File", "SHA-256"]), _table_row(["---", "---"])]
    lines += [_table_row([md(file), code(digest)]) for file, digest in summary.data_sha256.items()]
    lines.append("")
    for title, values in (("Versions", summary.versions), ("Machine", summary.machine)):
        lines += [f"### {title}", ""] + [Md("- {}: {}").format(name, value) for name, value in values.items()]
        lines += [""]
    lines += ["### Wall time", "", md(_format_duration(summary.wall_time_s)), ""]
    return lines


def _recipe_table(configs: list[ConfigSummary]) -> list[str]:
    """One row per configuration; a column per field of the original's recipes, and one per
    newer field that some configuration sets (the others keep the original's behaviour)."""
    newer: dict[str, None] = {}
    for config in configs:
        newer.update(dict.fromkeys(extensions(config.recipe)))
    keys = [key for key in ORIGINAL_FIELDS if key != "name"] + list(newer)
    lines = ["### Recipes", "", _table_row(["Configuration", "Variant", *keys]),
             _table_row(["---"] * (len(keys) + 2))]
    for config in configs:
        lines.append(_table_row([md(config.name), md(config.variant),
                                 *(md(_format_value(getattr(config.recipe, key))) for key in keys)]))
    return lines + [""]


# ---------------------------------------------------------------------------
# Small formatting helpers
# ---------------------------------------------------------------------------


def _format_stat(stats: Stat) -> str:
    """mean ± half-width of the 95% interval, or the mean alone for a single seed."""
    if stats.n < 2:
        return f"{stats.mean:.4f} (n/a, 1 seed)"
    low, high = stats.ci95
    return f"{stats.mean:.4f} ± {(high - low) / 2:.4f}"


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


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _join(items: list[str]) -> Md:
    """a, b and c, each item escaped unless it is Markdown already."""
    items = [md(item) for item in items]
    if len(items) <= 1:
        return Md("").join(items)
    return Md("{} and {}").format(Md(", ").join(items[:-1]), items[-1])


def _table_row(cells: list) -> Md:
    """A table row: cells that are Md are kept as they are; numbers and our own headers are text
    (escaped like any value, which also escapes the column separator)."""
    return Md("| {} |").format(Md(" | ").join(cell if isinstance(cell, Md) else md(cell) for cell in cells))
