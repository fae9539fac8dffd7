"""lenetlab study / resume / report end to end on the real data (small subsets, short recipes):
the promised files, and runs stopped at any moment (kill -9, Ctrl-C, SIGTERM, a killed worker,
damaged files) that resume to the numbers of an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import (
    RESUME_ARGS,
    assert_gone,
    assert_one_line_error,
    metrics_text,
    run_cli,
    start_study,
    strict_json,
    trial_workers,
    wait_for,
)

from lenetlab import files
from lenetlab.model import load_weights
from lenetlab.recipes import RECIPES
from lenetlab.records import RunOptions
from lenetlab.rundir import RunPlan, read_plan, read_result, write_plan
from lenetlab.runner import read_results

QUICK = ["--epochs-scale", "0.1", "--train-subset", "2000", "--threads", "1", "--quiet"]
WEIGHTS = {"baseline": "lenet5_baseline_fashionmnist", "dropout": "lenet5_dropout_fashionmnist",
           "l2_optimized": "lenet5v1_l2_optimized"}


@pytest.fixture(scope="module")
def study_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("runs")
    # "a, b": a list as a user types it (issue 14, item 7)
    result = run_cli("study", "--seeds", "2", "--variants", "baseline, dropout, l2_optimized", "--out", out,
                     "--name", "quick", "--data-dir", data_dir, "--workers", "2", *QUICK)
    assert result.returncode == 0, result.stderr
    return out / "quick", result


@pytest.fixture
def study_copy(study_run, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(study_run[0], copy)
    return copy


@pytest.mark.slow
def test_study_writes_every_promised_file(study_run):
    run, result = study_run
    assert "report.md" in result.stdout
    plan = read_plan(run)
    for seed in (0, 1):
        for name in WEIGHTS.values():
            assert (run / "models" / f"seed{seed}" / f"{name}.pth").is_file()
            assert strict_json(run / "models" / f"seed{seed}" / f"{name}.json")["seed"] == seed
    summary = strict_json(run / "summary.json")
    for config in summary["configs"]:
        trial = strict_json(run / "trials" / f"{config['name']}__seed{config['best_seed']}.json")
        assert trial["run_id"] == plan.run_id
        best = run / "models" / Path(trial["weights"]).name
        assert best.read_bytes() == (run / trial["weights"]).read_bytes()
        test = config["final"]["test"]
        assert test["n"] == 2 and test["ci95"][0] <= test["mean"] <= test["ci95"][1]
        assert test["mean"] == pytest.approx(sum(test["values"].values()) / 2)
    assert [c["name"] for c in summary["comparisons"]] == ["dropout", "l2_optimized"]
    assert summary["versions"]["torch"] and summary["data"]["sha256"] and summary["wall_time_s"] > 0
    # every file the report rests on is checksummed: metrics.csv and each weights file
    assert len(summary["files_sha256"]) == 1 + 6 + 3
    assert summary["files_sha256"]["metrics.csv"] == files.sha256_file(run / "metrics.csv")
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics.columns) == ["config", "variant", "seed", "epoch", "split", "loss", "accuracy"]
    # baseline: 12 x 0.1 -> 1 epoch; l2_optimized: 20 x 0.1 -> 2 epochs; 3 splits; 2 seeds
    assert len(metrics) == 2 * 3 * (1 + 1 + 2)
    last = metrics[(metrics.config == "l2_optimized") & (metrics.epoch == 2) & (metrics.split == "test")]
    assert sorted(last.accuracy.round(6)) == sorted(round(v, 6) for v in
                                                    summary["configs"][2]["final"]["test"]["values"].values())
    for png in ("convergence_baseline.png", "test_accuracy_overlay.png", "confusion_matrix_best.png",
                "per_class_accuracy.png"):
        assert (run / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (run / "report.md").read_text()
    assert "plots/confusion_matrix_best.png" in report and "| 0.8921 |" in report
    assert "validation" in report.lower()
    assert "Not comparable with the published figures" in report  # 1/10 of the epochs, 2,000 images
    for path in run.rglob("*.json"):  # issue 14, item 5: strict JSON everywhere
        strict_json(path)


@pytest.mark.slow
def test_report_renders_again_from_the_run_folder_alone(study_run, study_copy):
    run, _ = study_run
    (study_copy / "report.md").unlink()
    shutil.rmtree(study_copy / "plots")
    result = run_cli("report", study_copy)
    assert result.returncode == 0, result.stderr
    assert (study_copy / "report.md").read_text() == (run / "report.md").read_text()
    assert (study_copy / "plots" / "per_class_accuracy.png").is_file()
    # issue 14, item 6: a metrics.csv cut short or edited is one line, not plots that disagree
    (study_copy / "metrics.csv").write_text(metrics_text(run).replace("test", "val", 1))
    assert_one_line_error(run_cli("report", study_copy), "metrics.csv", "damaged or edited")
    (study_copy / "metrics.csv").write_text(metrics_text(run)[:-100])
    assert_one_line_error(run_cli("report", study_copy), "metrics.csv", "damaged or edited")


@pytest.mark.slow
def test_damaged_or_foreign_trial_results_count_as_missing(study_copy):
    plan = read_plan(study_copy)
    assert len(read_results(study_copy, plan)) == 6
    (study_copy / "trials" / "baseline__seed0.json").write_text("[]")
    (study_copy / "trials" / "dropout__seed1.json").write_text('{"key": "dropout__seed1", "status": "done"}')
    # issue 14, item 1: a well-formed result of another run is never counted
    foreign = study_copy / "trials" / "l2_optimized__seed0.json"
    body = files.read_record(foreign, "trial")
    files.write_record(foreign, "trial", {**body, "run_id": "another-run"})
    # issue 14, item 6: nor one whose weights are not the ones it recorded
    weights = study_copy / "models" / "seed1" / "lenet5v1_l2_optimized.pth"
    weights.write_bytes(weights.read_bytes()[:5000])
    assert sorted(read_results(study_copy, plan)) == ["baseline__seed1", "dropout__seed0"]


@pytest.mark.slow
def test_resume_reruns_a_trial_with_damaged_weights_and_ignores_a_foreign_checkpoint(study_run, study_copy,
                                                                                     data_dir):
    """Issue 14, item 6: a truncated per-seed .pth is rerun, not copied to models/; a checkpoint
    that is not a dict (was: every resume failed) is ignored."""
    run, _ = study_run
    damaged = study_copy / "models" / "seed0" / "lenet5_baseline_fashionmnist.pth"
    damaged.write_bytes(damaged.read_bytes()[:10_000])
    (study_copy / "trials" / "dropout__seed1.json").unlink()
    (study_copy / "checkpoints").mkdir(exist_ok=True)
    torch.save([1, 2], study_copy / "checkpoints" / "dropout__seed1.pt")
    result = run_cli("resume", study_copy, "--data-dir", data_dir, "--quiet")
    assert result.returncode == 0, result.stderr
    assert "6 trial(s) done, 0 failed" in result.stdout
    assert metrics_text(study_copy) == metrics_text(run)
    plan = read_plan(study_copy)
    assert all(read_result(study_copy, trial, plan.run_id) for trial in plan.trials())
    load_weights(damaged)
    for name in WEIGHTS.values():
        load_weights(study_copy / "models" / f"{name}.pth")  # the best seeds' copies are whole
    assert run_cli("report", study_copy).returncode == 0


@pytest.mark.slow
def test_each_result_says_where_it_was_trained_and_the_report_flags_mixed_builds(study_copy, data_dir):
    """Issue 24, item 3: the host, CPU and build as the trainer saw them, in the result and the
    sidecar; a configuration whose seeds were trained by different builds is flagged."""
    import socket

    from lenetlab.provenance import cpu_model
    from lenetlab.records import TrainedOn

    plan = read_plan(study_copy)
    result = read_result(study_copy, plan.trials()[0], plan.run_id)
    where = result.trained_on
    assert where.host == socket.gethostname() and where.cpu == cpu_model()
    assert where.kernels == result.kernels
    if where.kernels == "native":
        assert where.vector_bytes in (16, 32, 64) and where.compiler
    sidecar = strict_json((study_copy / result.weights).with_suffix(".json"))
    assert sidecar["machine"]["host"] == where.host and sidecar["build"] == where.build
    assert "Mixed builds" not in (study_copy / "report.md").read_text()
    if where.kernels == "native":  # the report names the build beside the kernels
        assert f"Native build: `{where.build}`" in (study_copy / "report.md").read_text()
    # dropout's seed 1 as if trained on a host of another vector width; baseline's seed 0 as a
    # result written before lenetlab recorded where (it reads as unknown, not as another build)
    other = study_copy / "trials" / "dropout__seed1.json"
    body = files.read_record(other, "trial")
    elsewhere = TrainedOn(**{**body["trained_on"], "kernels": "native", "vector_bytes": 8, "compiler": "cc"})
    files.write_record(other, "trial", {**body, "trained_on": asdict(elsewhere)})
    old = study_copy / "trials" / "baseline__seed0.json"
    body = files.read_record(old, "trial")
    del body["trained_on"]
    files.write_record(old, "trial", body)
    assert read_result(study_copy, plan.trials()[0], plan.run_id).trained_on is None
    done = run_cli("resume", study_copy, "--data-dir", data_dir, "--quiet")  # nothing to train: finalize
    assert done.returncode == 0, done.stderr
    builds = {c["name"]: c["builds"] for c in strict_json(study_copy / "summary.json")["configs"]}
    assert len(builds["dropout"]) == 2 and elsewhere.build in builds["dropout"]
    assert elsewhere.build.startswith("native, 8-byte vectors, cc, ")
    assert len(builds["baseline"]) == 1 and len(builds["l2_optimized"]) == 1
    flagged = [line for line in (study_copy / "report.md").read_text().splitlines() if "Mixed builds" in line]
    assert len(flagged) == 1 and "dropout's seeds" in flagged[0] and "baseline" not in flagged[0]


def test_damaged_or_foreign_run_folders_are_refused(tmp_path):
    run = tmp_path / "damaged"
    run.mkdir()
    (run / "run.json").write_text("{not json")
    assert_one_line_error(run_cli("resume", run), "run.json", "unreadable")
    (run / "run.json").write_text(json.dumps({"configs": [{"name": "x"}]}))
    assert_one_line_error(run_cli("resume", run), "run.json", "not a lenetlab run-plan file")
    write_plan(run, RunPlan("study", "damaged", [("baseline", RECIPES["baseline"])], [0], RunOptions()))
    assert_one_line_error(run_cli("report", run), "has not finished", "lenetlab resume")
    edited = json.loads((run / "run.json").read_text())
    edited["seeds"] = [0, 1]
    (run / "run.json").write_text(json.dumps(edited))
    assert_one_line_error(run_cli("resume", run), "run.json", "damaged or edited")


# ----------------------------------------------------------------------------- stopped runs


@pytest.mark.slow
def test_study_killed_with_sigkill_resumes_to_the_same_numbers_and_keeps_its_time(tmp_path, data_dir,
                                                                                  uninterrupted):
    """kill -9 with one trial recorded and the next one midway; issue 14, item 7: the wall time
    of the resumed run counts the time before the kill too."""
    process = start_study(tmp_path, "killed", data_dir)
    run = tmp_path / "killed"
    wait_for(run, "trials/baseline__seed0.json", process)
    wait_for(run, "checkpoints/batch_norm__seed0.pt", process)  # its first epoch is saved
    workers = trial_workers(process.pid)
    assert workers
    process.kill()
    process.communicate()
    assert_gone(workers, timeout=3)  # a worker outliving the study would race the resume
    assert not (run / "summary.json").exists() and not (run / "trials" / "batch_norm__seed0.json").exists()
    plan = read_plan(run)
    before_kill = plan.elapsed_s
    assert before_kill > 0
    # The killed session's time (one small trial: about 1 s on a fast host) can be shorter than
    # the resume's own start-up, so comparing it with the resume's clock would depend on the host.
    # With a recorded time longer than anything here, whether the resume adds to it shows.
    plan.elapsed_s = before_kill + 1000.0
    write_plan(run, plan)
    started = time.perf_counter()
    result = run_cli("resume", run, "--data-dir", data_dir, "--quiet")
    resumed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    assert metrics_text(run) == metrics_text(uninterrupted)
    wall_time = strict_json(run / "summary.json")["wall_time_s"]
    # was: the resumed part alone; it adds the resumed session's training, no more than its clock
    assert plan.elapsed_s < wall_time <= plan.elapsed_s + resumed


@pytest.mark.slow
@pytest.mark.parametrize(("stop", "status", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                      (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_or_sigterm_stops_cleanly_and_says_how_to_resume(tmp_path, data_dir, uninterrupted,
                                                                stop, status, word):
    process = start_study(tmp_path, "interrupted", data_dir)
    run = tmp_path / "interrupted"
    wait_for(run, "checkpoints/*.pt", process)
    workers = trial_workers(process.pid)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == status
    assert "Traceback" not in stderr and f"lenetlab resume {run}" in stderr
    assert stderr.strip().startswith(word)
    assert_gone(workers)
    assert run_cli("resume", run, "--data-dir", data_dir, "--quiet").returncode == 0
    assert metrics_text(run) == metrics_text(uninterrupted)


@pytest.mark.slow
def test_a_killed_worker_fails_its_trial_only_and_resume_completes_it(tmp_path, data_dir, uninterrupted):
    run = tmp_path / "victim"
    killed: list[int] = []

    def kill_the_worker() -> None:  # the study runs in this process; its workers are grandchildren
        wait_for(run, "checkpoints/*.pt")
        killed.extend(trial_workers(os.getpid()))
        for pid in killed:
            os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_the_worker, daemon=True)
    killer.start()
    result = run_cli("study", *RESUME_ARGS, "--out", tmp_path, "--name", "victim", "--data-dir", data_dir)
    killer.join()
    assert len(killed) == 1
    assert result.returncode == 1  # finished, with a failure to report
    summary = strict_json(run / "summary.json")
    failures = [(c["name"], f) for c in summary["configs"] for f in c["failed"]]
    assert len(failures) == 1 and "killed by signal 9" in failures[0][1]["error"]
    assert summary["configs"][1]["completed_seeds"] == [0]  # the other trial completed
    assert "killed by signal 9" in (run / "report.md").read_text()
    assert f"rerun the failed trials with: lenetlab resume {run}" in result.stdout
    result = run_cli("resume", run, "--data-dir", data_dir, "--quiet")
    assert result.returncode == 0, result.stderr
    assert metrics_text(run) == metrics_text(uninterrupted)
