"""The report of run folders built by the real aggregation code (runner.finalize) from made-up
trial results: plots, tables, sentences, and damaged files refused in one line."""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import replace
from pathlib import Path

import matplotlib.image
import pytest
from conftest import assert_one_line_error, run_cli
from support.runs import DATA, STUDY, WEIGHTS, fake_result, make_run

from lenetlab import files, runner
from lenetlab import plots as plots_module
from lenetlab import report as report_module
from lenetlab.errors import RunDirError
from lenetlab.provenance import library_versions
from lenetlab.recipes import RECIPES, Recipe
from lenetlab.records import RunOptions, Summary, Trial
from lenetlab.report import render_report
from lenetlab.rundir import RunPlan, read_plan, write_plan
from lenetlab.stats import summarize
from lenetlab.trials import record_trial

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
@pytest.fixture(scope="module")
def study_run(tmp_path_factory) -> tuple[Path, dict, str]:
    run_dir = tmp_path_factory.mktemp("study") / "run"
    summary = make_run(run_dir, STUDY)
    return run_dir, summary, (run_dir / "report.md").read_text(encoding="utf-8")


@pytest.fixture
def no_drawing(monkeypatch):
    """For tests of the text alone: skip drawing the PNGs (a few seconds per run folder)."""
    monkeypatch.setattr(report_module, "write_plots", lambda summary, curves, plots_dir: [])


@pytest.fixture
def study_copy(study_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(study_run[0], copy)
    return copy


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


def paragraph(report: str, start: str) -> str:
    return next(p for p in report.split("\n\n") if p.startswith(start))


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


def test_summary_and_metrics_come_from_the_trial_results(study_run):
    run_dir, summary, _ = study_run
    # the typed summary is summary.json's content, key order included (the file's bytes stay as they were)
    body = files.read_record(run_dir / "summary.json", "summary")
    assert json.dumps(summary.to_dict()) == json.dumps(body) and Summary.from_dict(body) == summary
    baseline = summary.configs[0]
    assert baseline.final["test"].values == {0: 0.88, 1: 0.882}
    assert baseline.best_seed == 1 and baseline.completed_seeds == [0, 1]
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[0] == "config,variant,seed,epoch,split,loss,accuracy"
    # 12 epochs x 3 splits for each of 5 completed trials; dropout seed 1 failed and has no rows
    assert len(rows) - 1 == 5 * 12 * 3
    assert "dropout,dropout,0,12,test,0.610000,0.890000" in rows
    assert not [r for r in rows if r.startswith("dropout,dropout,1,")]


def test_table_shows_mean_and_half_interval_from_summarize(study_run):
    _, _, report = study_run
    stats = summarize([0.88, 0.882])  # baseline's final test accuracies, seeds 0 and 1
    half = (stats["ci95"][1] - stats["ci95"][0]) / 2
    assert f"{stats['mean']:.4f} ± {half:.4f}" in table_row(report, "baseline")
    # by hand: mean 0.881, std 0.0014142, t(1) 12.7062 -> half 0.0127
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
    order = [report.index(table_row(report, name)) for name in ("baseline", "dropout", "batch_norm")]
    assert order == sorted(order)
    assert "0.9321 | 0.8921" in table_row(report, "baseline")  # PUBLISHED baseline figures
    assert "never evaluated the test set" in report
    assert "**validation**" in report
    assert "Not comparable with the published figures" not in report  # the published recipes, all data


def test_sentences_come_from_the_numbers(study_run):
    _, _, report = study_run
    assert "The highest mean test accuracy is **batch_norm**'s" in report
    # the target is named before it is used
    assert "The original study aimed at a test accuracy of 0.88 (88%)." in report
    # test means: baseline 0.881, dropout 0.890, batch_norm 0.901 -> all reach 0.88
    # lower ends of the intervals: baseline 0.881 - 0.0127 < 0.88, batch_norm 0.901 - 0.0127 > 0.88
    assert ("Mean test accuracy reaches it for baseline, dropout and batch_norm; "
            "for batch_norm the whole 95% interval lies above it.") in report
    assert "The best single run is batch_norm seed 1, with test accuracy 0.9020" in report
    # batch_norm - baseline is +0.02 on both seeds, dropout pairs only seed 0
    assert "| batch_norm | baseline | 2 | +0.0200 |" in report
    assert "excludes zero for batch_norm (better by 0.0200)" in report
    assert "dropout paired only one seed" in report
    dropout_row = next(line for line in report.splitlines() if line.startswith("| dropout | baseline |"))
    assert dropout_row.endswith("| n/a, 1 seed | no |")


def test_provenance_at_the_end(study_run):
    _, _, report = study_run
    details = report[report.index("## Run details"):]
    assert "ab" * 32 in details
    assert f"- torch: {library_versions()['torch']}" in details
    assert "3725.5 s (1 h 2 min 6 s)" in details
    assert "| baseline | baseline | False | False | 0.5 | 12 | 64 | 0.001 | 0 | adam | none | 0 |" in details
    assert "Trained with the torch kernels" in details


def test_one_seed_names_the_target_and_no_interval(tmp_path, no_drawing):
    make_run(tmp_path / "run", [{"name": "baseline", "base": 0.90}, {"name": "dropout", "base": 0.85}],
             seeds=(0,))
    report = (tmp_path / "run" / "report.md").read_text()
    sentences = paragraph(report, "The highest mean test accuracy")
    assert "aimed at a test accuracy of 0.88" in sentences
    assert "95% interval" not in sentences  # one seed gives none to speak of
    assert "Mean test accuracy reaches it for baseline; with one seed there is no interval" in sentences
    assert "It stays below 0.88 for dropout." in sentences


@pytest.mark.parametrize(("options", "epochs", "how"), [
    (RunOptions(train_subset=2000), None, "trained on 2,000 images only"),
    (RunOptions(), 3, "trained fewer or more epochs (--epochs-scale)"),
])
def test_shortened_runs_are_not_compared_with_the_published_figures(tmp_path, no_drawing, options, epochs,
                                                                    how):
    recipe = replace(RECIPES["baseline"], epochs=epochs) if epochs else None
    make_run(tmp_path / "run", [{"name": "baseline", "base": 0.88, "recipe": recipe}], options=options)
    report = (tmp_path / "run" / "report.md").read_text()
    caveat = paragraph(report, "**Not comparable with the published figures:**")
    assert how in caveat and "12 epochs" in caveat


def test_a_one_epoch_run_has_whole_epochs_on_the_x_axis(tmp_path, monkeypatch):
    """Issue 14, item 7: a 1-epoch run's curves had ticks like 0.96, 0.98."""
    ticks = {}

    def keep_ticks(fig, path):
        ticks[path.name] = list(fig.axes[0].get_xticks())

    monkeypatch.setattr(plots_module, "save_figure", keep_ticks)
    make_run(tmp_path, [{"name": "baseline", "base": 0.88, "recipe": replace(RECIPES["baseline"], epochs=1)}],
             seeds=(0,))
    assert ticks["convergence_baseline.png"] == [1] and ticks["test_accuracy_overlay.png"] == [1]


def test_sweep_ranks_by_test_accuracy_and_uses_heatmap(tmp_path):
    names = ["wd0.01", "wd0.001", "wd0.0001", "wd0", "wd0.1", "wd0.03", "wd0.003"]
    bases = [0.80, 0.87, 0.85, 0.84, 0.70, 0.83, 0.86]
    base_recipe = RECIPES["l2_regularization"]
    configs = [{"name": f"l2_regularization-{n}", "base": b, "recipe": replace(base_recipe, epochs=3)}
               for n, b in zip(names, bases, strict=True)]
    make_run(tmp_path, configs, kind="sweep", reference=None)
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
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
        {"name": "baseline", "base": 0.85},
        {"name": "lr 0.01/adam", "base": 0.80, "recipe": Recipe("baseline", epochs=2, lr=0.01)},
        {"name": "broken", "base": 0.80, "recipe": Recipe("baseline", epochs=2), "failed": [0, 1]},
    ]
    make_run(tmp_path, configs, kind="sweep")
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| broken | 0/2 | failed | failed | failed |" in report
    assert not (tmp_path / "plots" / "convergence_broken.png").exists()
    assert_png(tmp_path / "plots" / "convergence_lr_0.01_adam.png")
    assert "(plots/convergence_lr_0.01_adam.png)" in report


def test_interval_including_zero_is_reported_as_noise(tmp_path, no_drawing):
    # batch_norm - baseline: +0.04 on seed 0, -0.01 on seed 1 -> mean +0.015, interval across zero
    configs = [{"name": "baseline", "base": 0.88},
               {"name": "batch_norm", "base": 0.90, "offsets": {0: 0.02, 1: -0.03}}]
    summary = make_run(tmp_path, configs)
    comparison = summary.comparisons[0]
    assert comparison.ci95[0] < 0 < comparison.ci95[1] and not comparison.excludes_zero
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| batch_norm | baseline | 2 | +0.0150 |" in report
    assert "No comparison has a 95% interval that excludes zero." in report
    assert "For batch_norm the interval includes zero" in report


def test_rendering_again_gives_the_same_report(study_run):
    run_dir, _, first = study_run
    assert render_report(run_dir).read_text(encoding="utf-8") == first


def test_results_of_another_run_are_not_counted(tmp_path, no_drawing):
    """A trial file carrying another run's identity (a stray process, a copied folder) is left out."""
    make_run(tmp_path, [{"name": "baseline", "base": 0.88}])
    plan = read_plan(tmp_path)
    stray = Trial("baseline", plan.configs[0][1], 1)  # its file replaces this run's own result
    record_trial(tmp_path, fake_result(stray, "another-run", 0.5, plan.options), WEIGHTS, DATA.checksums)
    summary = runner.finalize(tmp_path, plan, DATA)
    assert summary.configs[0].completed_seeds == [0]
    assert summary.configs[0].final["test"].values == {0: 0.88}


# ----------------------------------------------------------------------------- damaged folders


def cut_metrics(run_dir: Path) -> Path:
    path = run_dir / "metrics.csv"
    path.write_text("\n".join(path.read_text().splitlines()[:40]) + "\n")
    return path


def edit_metrics(run_dir: Path) -> Path:
    path = run_dir / "metrics.csv"
    path.write_text(path.read_text().replace("0.880000", "0.980000", 1))
    return path


def drop_metrics(run_dir: Path) -> Path:
    (run_dir / "metrics.csv").unlink()
    return run_dir / "metrics.csv"


def edit_mean(run_dir: Path) -> Path:
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text())
    summary["configs"][0]["final"]["test"]["mean"] = 0.99
    path.write_text(json.dumps(summary, indent=2))
    return path


def cut_summary(run_dir: Path) -> Path:
    path = run_dir / "summary.json"
    path.write_text(path.read_text()[:-20])
    return path


def drop_summary(run_dir: Path) -> Path:
    (run_dir / "summary.json").unlink()
    return run_dir  # as if the run had not finished


def foreign_summary(run_dir: Path) -> Path:
    path = run_dir / "summary.json"
    path.write_text(json.dumps({"kind": "study", "configs": []}))
    return path


def cut_best_weights(run_dir: Path) -> Path:
    path = run_dir / "models" / "lenet5_batchnorm_fashionmnist.pth"
    path.write_bytes(path.read_bytes()[:1000])
    return path


@pytest.mark.parametrize(("damage", "problem"), [
    (cut_metrics, "damaged or edited"),
    (edit_metrics, "damaged or edited"),
    (drop_metrics, "missing"),
    (edit_mean, "damaged or edited"),
    (cut_summary, "unreadable"),
    (drop_summary, "has not finished"),
    (foreign_summary, "not a lenetlab summary file"),
    (cut_best_weights, "damaged or edited"),
])
def test_a_damaged_run_folder_is_one_line_never_a_wrong_report(study_copy, damage, problem):
    run_dir = study_copy
    before = {p: p.stat().st_mtime_ns for p in [run_dir / "report.md", *(run_dir / "plots").iterdir()]}
    path = damage(run_dir)
    with pytest.raises(RunDirError) as caught:
        render_report(run_dir)
    message = str(caught.value)
    assert message.startswith(f"{path}:") and problem in message and "\n" not in message
    assert_one_line_error(run_cli("report", run_dir), str(path), problem)
    assert before == {p: p.stat().st_mtime_ns for p in before}  # nothing re-rendered


def test_report_on_a_folder_that_is_no_finished_run(tmp_path):
    assert_one_line_error(run_cli("report", tmp_path / "nothing-here"), "nothing-here")
    run_dir = tmp_path / "my run"
    plan = RunPlan("study", "my run", [("baseline", RECIPES["baseline"])], [0], RunOptions())
    write_plan(run_dir, plan)
    line = assert_one_line_error(run_cli("report", run_dir), "has not finished")
    assert shlex.split(line.split("finish it with: ", 1)[1]) == ["lenetlab", "resume", str(run_dir)]


def test_a_file_in_the_way_of_the_plots_is_one_line(study_copy):
    shutil.rmtree(study_copy / "plots")
    (study_copy / "plots").write_text("not a folder")
    assert_one_line_error(run_cli("report", study_copy), "plots")
