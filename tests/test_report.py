"""render_report on small synthetic run folders: plots, tables, sentences and damaged input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from lenetlab.errors import RunDirError
from lenetlab.report import METRICS_HEADER, render_report
from lenetlab.stats import paired_difference, summarize

EPOCHS = 3
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def final_accuracy(base: float, split: str, seed: int, epoch: int = EPOCHS) -> float:
    """A made-up accuracy: rises by epoch, differs a little by seed, train above test."""
    offset = {"train": 0.03, "val": 0.005, "test": 0.0}[split]
    return round(base + offset + 0.01 * epoch + 0.002 * seed, 6)


def make_run(
    run_dir: Path,
    configs: list[dict],
    kind: str = "study",
    reference: str | None = "baseline",
) -> dict:
    """Write metrics.csv and summary.json for configs given as
    {"name", "base" (accuracy level), "seeds", "failed" (seeds that failed)}."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    entries = []
    for spec in configs:
        name, base, seeds = spec["name"], spec["base"], spec["seeds"]
        failed = spec.get("failed", [])
        completed = [seed for seed in seeds if seed not in failed]
        for seed in seeds:
            # a failed seed logs its first epoch before crashing; the report must ignore it
            last_epoch = 1 if seed in failed else EPOCHS
            for epoch in range(1, last_epoch + 1):
                for split in ("train", "val", "test"):
                    accuracy = final_accuracy(base, split, seed, epoch)
                    if seed in failed:
                        accuracy = 0.1
                    rows.append([name, spec.get("variant", name), seed, epoch, split,
                                 round(1.5 - accuracy, 6), accuracy])
        final = None
        if completed:
            final = {}
            for split in ("train", "val", "test"):
                values = {str(seed): final_accuracy(base, split, seed) for seed in completed}
                final[split] = {**summarize(list(values.values())), "values": values}
        entries.append({
            "name": name,
            "variant": spec.get("variant", name),
            "recipe": {"name": name, "epochs": EPOCHS, "batch_size": 64, "lr": 0.001,
                       "weight_decay": spec.get("weight_decay", 0.0), "optimizer": "adam",
                       "warm_start_from": None},
            "seeds": seeds,
            "completed_seeds": completed,
            "final": final,
            "best_seed": max(completed) if completed else None,
            "per_class_test_accuracy": {
                str(seed): [round(base + 0.01 * k, 4) for k in range(10)] for seed in completed
            },
            "confusion_matrix": {
                str(seed): [[90 if row == col else 1 for col in range(10)] for row in range(10)]
                for seed in completed
            },
            "failed": [{"seed": seed, "error": "RuntimeError: loss became nan\nat epoch 2"}
                       for seed in failed],
        })
    comparisons = []
    by_name = {entry["name"]: entry for entry in entries}
    if reference is not None and by_name[reference]["final"]:
        ref_values = by_name[reference]["final"]["test"]["values"]
        for entry in entries:
            if entry["name"] == reference or entry["final"] is None:
                continue
            diff = paired_difference(entry["final"]["test"]["values"], ref_values)
            comparisons.append({"name": entry["name"], "reference": reference, **diff})
    finished = [entry for entry in entries if entry["final"]]
    top = max(finished, key=lambda e: max(e["final"]["test"]["values"].values()))
    summary = {
        "lenetlab_version": "0.1.0", "kind": kind, "name": "synthetic-run",
        "created": "2024-10-08T12:00:00+00:00", "wall_time_s": 3725.5,
        "config": {"seeds": [0, 1], "device": "cpu"},
        "data": {"folder": "/data/fashion", "sha256": {"train-images-idx3-ubyte": "ab" * 32}},
        "versions": {"python": "3.12.1", "torch": "2.4.0"},
        "machine": {"platform": "Linux", "cpu_count": 2, "device": "cpu"},
        "reference": reference,
        "configs": entries,
        "comparisons": comparisons,
        "best": {"name": top["name"], "seed": top["best_seed"]},
    }
    with open(run_dir / "metrics.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(METRICS_HEADER)
        writer.writerows(rows)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


STUDY = [
    {"name": "baseline", "base": 0.85, "seeds": [0, 1]},
    {"name": "dropout", "base": 0.86, "seeds": [0, 1], "failed": [1]},
    {"name": "batch_norm", "base": 0.87, "seeds": [0, 1]},
]


@pytest.fixture(scope="module")
def study_run(tmp_path_factory) -> tuple[Path, dict, str]:
    run_dir = tmp_path_factory.mktemp("study")
    summary = make_run(run_dir, STUDY)
    report = render_report(run_dir)
    return run_dir, summary, report.read_text(encoding="utf-8")


def table_row(report: str, name: str) -> str:
    rows = [line for line in report.splitlines() if line.startswith(f"| {name} |")]
    assert rows, f"no table row for {name}"
    return rows[0]


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert 300 <= height <= 3000 and 400 <= width <= 3000, (path, image.shape)


def test_study_writes_every_plot(study_run):
    run_dir, _, _ = study_run
    plots = run_dir / "plots"
    for name in ("convergence_baseline.png", "convergence_dropout.png",
                 "convergence_batch_norm.png", "test_accuracy_overlay.png",
                 "confusion_matrix_best.png", "per_class_accuracy.png"):
        assert_png(plots / name)
    assert not [p for p in run_dir.rglob("*.tmp")], "temporary files left behind"


def test_image_links_point_at_files(study_run):
    run_dir, _, report = study_run
    links = [line[line.index("](") + 2:-1] for line in report.splitlines() if line.startswith("![")]
    assert len(links) == 6
    for link in links:
        assert link.startswith("plots/")
        assert (run_dir / link).is_file(), link


def test_table_shows_mean_and_half_interval_from_summarize(study_run):
    _, _, report = study_run
    # baseline test accuracies: seeds 0 and 1 -> 0.88 and 0.882
    stats = summarize([final_accuracy(0.85, "test", 0), final_accuracy(0.85, "test", 1)])
    half = (stats["ci95"][1] - stats["ci95"][0]) / 2
    assert f"{stats['mean']:.4f} ± {half:.4f}" in table_row(report, "baseline")
    # by hand: mean 0.881, std 0.0014142, t(1) 12.7062 -> half 0.0127062 * ... = 0.0127
    assert "| baseline | 2/2 | 0.9110 ± 0.0127 | 0.8860 ± 0.0127 | 0.8810 ± 0.0127 |" in report


def test_single_seed_shows_no_interval_and_failure(study_run):
    _, _, report = study_run
    row = table_row(report, "dropout")
    assert "| dropout | 1/2 |" in row
    assert "0.8900 (n/a, 1 seed)" in row
    assert "seed 1: RuntimeError: loss became nan at epoch 2" in row
    assert "## Failed trials" in report
    assert "- dropout, seed 1: `RuntimeError: loss became nan at epoch 2`" in report


def test_study_keeps_recipe_order_and_shows_published_figures(study_run):
    _, _, report = study_run
    order = [report.index(f"| {name} | 2/2") if name != "dropout" else report.index("| dropout |")
             for name in ("baseline", "dropout", "batch_norm")]
    assert order == sorted(order)
    assert "0.9321 | 0.8921" in table_row(report, "baseline")  # PUBLISHED baseline figures
    assert "never evaluated the test set" in report
    assert "**validation**" in report


def test_sentences_come_from_the_numbers(study_run):
    _, _, report = study_run
    assert "The highest mean test accuracy is **batch_norm**'s" in report
    # test means: baseline 0.881, dropout 0.890, batch_norm 0.901 -> all reach 0.88
    assert "for baseline, dropout and batch_norm;" in report
    # lower ends of the intervals: baseline 0.881 - 0.0127 < 0.88, batch_norm 0.901 - 0.0127 > 0.88
    assert "for batch_norm the whole 95% interval lies above it." in report
    assert "The best single run is batch_norm seed 1, with test accuracy 0.9020" in report
    # batch_norm - baseline is +0.02 on both seeds, dropout pairs only seed 0
    assert "| batch_norm | baseline | 2 | +0.0200 |" in report
    assert "excludes zero for batch_norm (better by 0.0200)" in report
    assert "dropout paired only one seed" in report
    dropout_row = next(line for line in report.splitlines()
                       if line.startswith("| dropout | baseline |"))
    assert dropout_row.endswith("| n/a, 1 seed | no |")


def test_provenance_at_the_end(study_run):
    _, _, report = study_run
    details = report[report.index("## Run details"):]
    assert "ab" * 32 in details
    assert "- torch: 2.4.0" in details
    assert "- cpu_count: 2" in details
    assert "3725.5 s (1 h 2 min 6 s)" in details
    assert "| baseline | baseline | 3 | 64 | 0.001 | 0 | adam | none |" in details


def test_sweep_ranks_by_test_accuracy_and_uses_heatmap(tmp_path):
    names = ["wd0.01", "wd0.001", "wd0.0001", "wd0", "wd0.1", "wd0.03", "wd0.003"]
    bases = [0.80, 0.87, 0.85, 0.84, 0.70, 0.83, 0.86]
    configs = [{"name": f"l2_regularization-{n}", "variant": "l2_regularization", "base": b,
                "seeds": [0, 1]} for n, b in zip(names, bases, strict=True)]
    make_run(tmp_path, configs, kind="sweep", reference=None)
    report = render_report(tmp_path).read_text(encoding="utf-8")
    ranked = [c["name"] for c in sorted(configs, key=lambda c: -c["base"])]
    positions = [report.index(table_row(report, name)) for name in ranked]
    assert positions == sorted(positions)
    assert "Published" not in report
    assert "No reference configuration was set" in report
    assert "It stays below 0.88 for" in report
    assert_png(tmp_path / "plots" / "per_class_accuracy.png")  # > 6 configs: heatmap
    for name in ranked:
        assert_png(tmp_path / "plots" / f"convergence_{name}.png")


def test_fully_failed_config_and_odd_names(tmp_path):
    configs = [
        {"name": "baseline", "base": 0.85, "seeds": [0, 1]},
        {"name": "lr 0.01/adam", "base": 0.80, "seeds": [0, 1]},
        {"name": "broken", "base": 0.80, "seeds": [0, 1], "failed": [0, 1]},
    ]
    make_run(tmp_path, configs)
    report = render_report(tmp_path).read_text(encoding="utf-8")
    assert "| broken | 0/2 | failed | failed | failed |" in report
    assert not (tmp_path / "plots" / "convergence_broken.png").exists()
    assert_png(tmp_path / "plots" / "convergence_lr_0.01_adam.png")
    assert "(plots/convergence_lr_0.01_adam.png)" in report


def test_interval_including_zero_is_reported_as_noise(tmp_path):
    make_run(tmp_path, STUDY)

    def widen(summary: dict) -> None:
        summary["comparisons"][1].update({"ci95": [-0.01, 0.05], "excludes_zero": False})

    edit_summary(tmp_path, widen)
    report = render_report(tmp_path).read_text(encoding="utf-8")
    assert "| batch_norm | baseline | 2 | +0.0200 | [-0.0100, +0.0500] | no |" in report
    assert "No comparison has a 95% interval that excludes zero." in report
    assert "For batch_norm the interval includes zero" in report


def test_rendering_twice_replaces_the_files(study_run):
    run_dir, _, first = study_run
    assert render_report(run_dir).read_text(encoding="utf-8") == first


def damage_missing_metrics(run_dir: Path) -> None:
    (run_dir / "metrics.csv").unlink()


def damage_missing_summary(run_dir: Path) -> None:
    (run_dir / "summary.json").unlink()


def damage_malformed_json(run_dir: Path) -> None:
    path = run_dir / "summary.json"
    path.write_text(path.read_text()[:-20], encoding="utf-8")


def damage_header(run_dir: Path) -> None:
    path = run_dir / "metrics.csv"
    path.write_text(path.read_text().replace("accuracy", "acc", 1), encoding="utf-8")


def damage_accuracy(run_dir: Path) -> None:
    path = run_dir / "metrics.csv"
    lines = path.read_text().splitlines()
    lines[3] = ",".join(lines[3].split(",")[:-1] + ["high"])
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def damage_empty_metrics(run_dir: Path) -> None:
    (run_dir / "metrics.csv").write_text("", encoding="utf-8")


def damage_short_row(run_dir: Path) -> None:
    with open(run_dir / "metrics.csv", "a", encoding="utf-8") as f:
        f.write("baseline,baseline,0,4,test\n")


def damage_duplicate_name(run_dir: Path) -> None:
    edit_summary(run_dir, lambda s: s["configs"][1].update({"name": "baseline"}))


def damage_missing_top_key(run_dir: Path) -> None:
    edit_summary(run_dir, lambda s: s.pop("comparisons"))


def damage_missing_nested_key(run_dir: Path) -> None:
    edit_summary(run_dir, lambda s: s["configs"][0]["final"]["test"].pop("ci95"))


def damage_string_value(run_dir: Path) -> None:
    edit_summary(run_dir, lambda s: s["configs"][0]["final"]["val"]["values"].update({"0": "x"}))


def damage_best(run_dir: Path) -> None:
    edit_summary(run_dir, lambda s: s["best"].update({"name": "nowhere"}))


def damage_data(run_dir: Path) -> None:
    edit_summary(run_dir, lambda s: s.update({"data": "x"}))


def damage_wall_time(run_dir: Path) -> None:
    edit_summary(run_dir, lambda s: s.update({"wall_time_s": float("inf")}))


def edit_summary(run_dir: Path, change) -> None:
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text())
    change(summary)
    path.write_text(json.dumps(summary), encoding="utf-8")


@pytest.mark.parametrize(
    ("damage", "file_name", "problem"),
    [
        (damage_missing_metrics, "metrics.csv", "missing"),
        (damage_missing_summary, "summary.json", "missing"),
        (damage_malformed_json, "summary.json", "not valid JSON"),
        (damage_header, "metrics.csv", "header"),
        (damage_accuracy, "metrics.csv", "accuracy 'high' is not a number"),
        (damage_empty_metrics, "metrics.csv", "empty file"),
        (damage_short_row, "metrics.csv", "has 5 fields, expected 7"),
        (damage_duplicate_name, "summary.json", "'baseline' appears twice"),
        (damage_missing_top_key, "summary.json", "missing key 'comparisons'"),
        (damage_missing_nested_key, "summary.json", "missing key 'ci95'"),
        (damage_string_value, "summary.json", "not a number"),
        (damage_best, "summary.json", "'nowhere'"),
        (damage_data, "summary.json", "data must be an object"),
        (damage_wall_time, "summary.json", "wall_time_s is inf"),
    ],
)
def test_damaged_run_folder_raises_one_line(tmp_path, damage, file_name, problem):
    make_run(tmp_path, STUDY)
    damage(tmp_path)
    with pytest.raises(RunDirError) as caught:
        render_report(tmp_path)
    message = str(caught.value)
    assert message.startswith(str(tmp_path / file_name) + ":")
    assert problem in message
    assert "\n" not in message
    assert not (tmp_path / "report.md").exists()


def test_missing_run_folder(tmp_path):
    with pytest.raises(RunDirError, match="not a folder"):
        render_report(tmp_path / "nothing-here")


def test_a_file_in_the_way_of_the_plots_is_one_line(tmp_path):
    make_run(tmp_path, STUDY)
    (tmp_path / "plots").write_text("not a folder")
    result = subprocess.run([sys.executable, "-m", "lenetlab", "report", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "plots" in result.stderr
