"""Aggregate a run's trial results: metrics.csv (this module owns its header) and summary.json.

summary.json (records.Summary) holds, per configuration, the final accuracies over seeds (mean, std, 95%
interval), per-seed values, per-class accuracy, confusion matrices and failures; paired
comparisons with the reference; provenance; and the SHA-256 of metrics.csv and of every
weights file, so a later `lenetlab report` can tell a damaged run folder from an intact one.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from . import files
from .errors import RunDirError
from .provenance import library_versions, machine_info
from .recipes import Recipe, file_name
from .records import SPLITS, Best, Comparison, ConfigSummary, Failure, RunSettings, Stat, Summary, TrialResult
from .rundir import RunPlan
from .stats import paired_difference, summarize

METRICS_HEADER = ["config", "variant", "seed", "epoch", "split", "loss", "accuracy"]

# Per-epoch accuracies: curves[config][split][epoch][seed] = accuracy
Curves = dict[str, dict[str, dict[int, dict[int, float]]]]


def metrics_csv(results: list[TrialResult]) -> str:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(METRICS_HEADER)
    for result in results:
        if result.done:
            for row in result.history:
                writer.writerow([result.trial.config, result.trial.recipe.name, result.trial.seed,
                                 row.epoch, row.split, f"{row.loss:.6f}", f"{row.accuracy:.6f}"])
    return buffer.getvalue()


def curves_from_csv(text: str) -> Curves:
    curves: Curves = {}
    for config, _variant, seed, epoch, split, _loss, accuracy in list(csv.reader(io.StringIO(text)))[1:]:
        by_epoch = curves.setdefault(config, {}).setdefault(split, {})
        by_epoch.setdefault(int(epoch), {})[int(seed)] = float(accuracy)
    return curves


def _stat(values: dict[int, float]) -> Stat:
    return Stat(**summarize(list(values.values())), values=values)


def summarize_config(name: str, recipe: Recipe, seeds: list[int], mine: list[TrialResult]) -> ConfigSummary:
    """One configuration's final accuracies over seeds (mean, std, 95% CI), failures, best seed."""
    done = [r for r in mine if r.done]
    flips = {r.trial.seed: r.test_flip for r in done if r.test_flip is not None}
    return ConfigSummary(
        name=name, variant=recipe.name, recipe=recipe, seeds=seeds,
        completed_seeds=[r.trial.seed for r in done],
        final=({split: _stat({r.trial.seed: r.final(split) for r in done}) for split in SPLITS}
               if done else None),
        best_seed=max(done, key=lambda r: r.final("test")).trial.seed if done else None,
        per_class_test_accuracy={r.trial.seed: r.test.per_class_accuracy for r in done},
        confusion_matrix={r.trial.seed: r.test.confusion_matrix for r in done},
        kernels=sorted({r.kernels for r in done}),
        # the builds that trained its seeds, as each trainer saw it (older results: none)
        builds=sorted({r.trained_on.build for r in done if r.trained_on}),
        failed=[Failure(r.trial.seed, r.error) for r in mine if not r.done],
        kept_epochs={r.trial.seed: r.kept_epoch for r in done} if done else None,
        test_flip=_stat(flips) if flips else None)


def compare(configs: list[ConfigSummary], reference: str | None) -> list[Comparison]:
    """Each configuration against the reference, paired by seed, on final test accuracy."""
    ref = next((c for c in configs if c.name == reference and c.final), None)
    if ref is None:
        return []
    comparisons = []
    for config in configs:
        if config is ref or not config.final:
            continue
        diff = paired_difference(config.final["test"].values, ref.final["test"].values)
        if diff is not None:
            comparisons.append(Comparison(config.name, reference, **diff))
    return comparisons


def _keep_best_weights(run_dir: Path, configs: list[ConfigSummary], results: dict[str, TrialResult]) -> dict:
    """The best seed's weights of each configuration at models/<original name>, for the old
    snippets; their digests by relative path."""
    weights = {}
    for config in configs:
        if config.best_seed is not None:
            best = next(r for r in results.values()
                        if r.trial.config == config.name and r.trial.seed == config.best_seed)
            source = run_dir / best.weights
            for suffix in (".pth", ".json"):
                content = source.with_suffix(suffix).read_bytes()
                files.atomic_write(run_dir / "models" / source.with_suffix(suffix).name, content)
            weights[f"models/{file_name(config.name)}"] = best.weights_sha256
    return weights


def write_summary(run_dir: Path, plan: RunPlan, results: dict[str, TrialResult],
                  checksums: dict[str, str], data_folder: str) -> tuple[Summary, Curves]:
    """Write metrics.csv, the best seed's weights under the original names and summary.json;
    return the summary and the curves of the metrics.csv just written."""
    metrics = metrics_csv(list(results.values()))
    files.write_text(run_dir / "metrics.csv", metrics)
    configs = [summarize_config(name, recipe, plan.seeds,
                                [r for r in results.values() if r.trial.config == name])
               for name, recipe in plan.configs]
    weights = {r.weights: r.weights_sha256 for r in results.values() if r.done}
    weights.update(_keep_best_weights(run_dir, configs, results))
    best = max((c for c in configs if c.final), key=lambda c: c.final["test"].mean, default=None)
    summary = Summary(
        lenetlab_version=plan.lenetlab_version, kind=plan.kind, name=plan.name, created=plan.created,
        wall_time_s=plan.elapsed_s, settings=RunSettings(plan.seeds, plan.options, plan.engine, plan.workers),
        data_folder=data_folder, data_sha256=checksums, versions=library_versions(),
        machine=machine_info(plan.options.device), reference=plan.reference, configs=configs,
        comparisons=compare(configs, plan.reference), best=Best(best.name, best.best_seed) if best else None,
        files_sha256={"metrics.csv": files.sha256_of_text(metrics), **weights})
    files.write_record(run_dir / "summary.json", "summary", summary.to_dict())
    return summary, curves_from_csv(metrics)


def load_summary(run_dir: Path) -> Summary:
    """summary.json as a Summary, through the stamped reader (its files are not checked here)."""
    path = Path(run_dir) / "summary.json"
    try:
        return Summary.from_dict(files.read_record(path, "summary"))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RunDirError(f"{path}: not a summary this lenetlab reads "
                          f"({type(exc).__name__}: {exc})") from None


def read_summary(run_dir: Path) -> tuple[Summary, Curves]:
    """summary.json and the curves of metrics.csv, both checked against what recorded them."""
    run_dir = Path(run_dir)
    summary = load_summary(run_dir)
    for relative, digest in summary.files_sha256.items():
        if files.sha256_file(run_dir / relative) != digest:
            raise RunDirError(f"{run_dir / relative}: missing, damaged or edited since the run "
                              f"wrote it (its SHA-256 is not the one summary.json recorded)")
    try:
        return summary, curves_from_csv((run_dir / "metrics.csv").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as exc:
        raise RunDirError(f"{run_dir / 'metrics.csv'}: not the metrics lenetlab writes ({exc})") from None
