"""lenetlab study / sweep / report end to end on the real data (small subsets, one-epoch recipes)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from test_cli import assert_one_line_error, lenetlab

QUICK = ["--epochs-scale", "0.1", "--train-subset", "2000", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def study_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("runs")
    result = lenetlab("study", "--seeds", "2", "--variants", "baseline,dropout,l2_optimized",
                      "--out", out, "--name", "quick", "--data-dir", data_dir, "--workers", "2", *QUICK)
    assert result.returncode == 0, result.stderr
    return out / "quick", result


def test_study_writes_every_promised_file(study_run):
    run, result = study_run
    assert "report.md" in result.stdout
    for seed in (0, 1):
        for name in ("lenet5_baseline_fashionmnist", "lenet5_dropout_fashionmnist",
                     "lenet5v1_l2_optimized"):
            assert (run / "models" / f"seed{seed}" / f"{name}.pth").is_file()
            assert json.loads((run / "models" / f"seed{seed}" / f"{name}.json").read_text())["seed"] == seed
    summary = json.loads((run / "summary.json").read_text())
    for config in summary["configs"]:
        trial = run / "trials" / f"{config['name']}__seed{config['best_seed']}.json"
        best = run / "models" / Path(json.loads(trial.read_text())["weights"]).name
        assert best.is_file()
        assert best.read_bytes() == (run / "models" / f"seed{config['best_seed']}" / best.name).read_bytes()
        test = config["final"]["test"]
        assert test["n"] == 2 and test["ci95"][0] <= test["mean"] <= test["ci95"][1]
        assert test["mean"] == pytest.approx(sum(test["values"].values()) / 2)
    assert [c["name"] for c in summary["comparisons"]] == ["dropout", "l2_optimized"]
    assert summary["versions"]["torch"] and summary["data"]["sha256"] and summary["wall_time_s"] > 0
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


def test_report_renders_again_from_the_run_folder_alone(study_run, tmp_path):
    run, _ = study_run
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("metrics.csv", "summary.json"):
        (copy / name).write_bytes((run / name).read_bytes())
    result = lenetlab("report", copy)
    assert result.returncode == 0, result.stderr
    assert (copy / "report.md").read_text() == (run / "report.md").read_text()
    assert (copy / "plots" / "per_class_accuracy.png").is_file()
    (copy / "metrics.csv").write_text("config,variant\nbroken\n")
    assert_one_line_error(lenetlab("report", copy), "metrics.csv")


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _workers(study_pid: int) -> list[int]:
    """The trial processes of a running study: children of its forkserver."""
    forkserver = [pid for pid in _children(study_pid)
                  if b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    return [pid for server in forkserver for pid in _children(server)]


def _assert_gone(pids: list[int], timeout: float = 10) -> None:
    """Every process in pids has ended (a zombie awaiting its parent counts as ended)."""
    deadline = time.time() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                alive.append(pid)
        if not alive:
            return
        assert time.time() < deadline, f"processes {alive} outlived the study"
        time.sleep(0.2)


def _wait_for(path_glob: Path, pattern: str, process, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not list(path_glob.glob(pattern)):
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, f"no {pattern} after {timeout} s"
        time.sleep(0.2)


def _final_metrics(run: Path) -> list[list[str]]:
    with open(run / "metrics.csv") as handle:
        return sorted(csv.reader(handle))


RESUME_ARGS = ["--seeds", "1", "--variants", "baseline,batch_norm", "--epochs-scale", "0.25",
               "--train-subset", "2000", "--threads", "1", "--workers", "1", "--quiet"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("whole")
    result = lenetlab("study", *RESUME_ARGS, "--out", out, "--name", "whole", "--data-dir", data_dir)
    assert result.returncode == 0, result.stderr
    return out / "whole"


def test_killing_the_study_ends_its_workers(tmp_path, data_dir):
    # Twelve epochs: the trial would go on long after the kill if its worker survived.
    cmd = [sys.executable, "-m", "lenetlab", "study", "--seeds", "1", "--variants", "baseline",
           "--train-subset", "5000", "--threads", "1", "--quiet", "--out", str(tmp_path),
           "--name", "orphans", "--data-dir", str(data_dir)]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(tmp_path / "orphans", "checkpoints/*.pt", process)
    workers = _workers(process.pid)
    assert workers
    process.send_signal(signal.SIGKILL)
    process.wait()
    _assert_gone(workers, timeout=3)
    assert not list((tmp_path / "orphans").glob("trials/*.json"))


def test_study_killed_with_sigkill_resumes_to_the_same_numbers(tmp_path, data_dir, uninterrupted):
    cmd = [sys.executable, "-m", "lenetlab", "study", *RESUME_ARGS, "--out", str(tmp_path),
           "--name", "killed", "--data-dir", str(data_dir)]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run = tmp_path / "killed"
    _wait_for(run, "checkpoints/*.pt", process)  # the first epoch of the first trial is saved
    workers = _workers(process.pid)
    assert workers
    process.send_signal(signal.SIGKILL)
    process.wait()
    _assert_gone(workers)  # a worker outliving the study would race a later --resume
    assert not (run / "summary.json").exists()
    result = lenetlab("study", "--resume", run, "--data-dir", data_dir)
    assert result.returncode == 0, result.stderr
    assert _final_metrics(run) == _final_metrics(uninterrupted)


@pytest.mark.parametrize(("stop", "status", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                      (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_or_sigterm_stops_cleanly_and_says_how_to_resume(tmp_path, data_dir, uninterrupted,
                                                                stop, status, word):
    cmd = [sys.executable, "-m", "lenetlab", "study", *RESUME_ARGS, "--out", str(tmp_path),
           "--name", "interrupted", "--data-dir", str(data_dir)]
    # A shell running a job in the background ignores SIGINT for it, and Python keeps an
    # inherited "ignore"; restore the default, as for a command in a terminal's foreground.
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    run = tmp_path / "interrupted"
    _wait_for(run, "checkpoints/*.pt", process)
    workers = _workers(process.pid)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == status
    assert "Traceback" not in stderr and f"lenetlab study --resume {run}" in stderr
    assert stderr.strip().startswith(word)
    _assert_gone(workers)
    assert lenetlab("study", "--resume", run, "--data-dir", data_dir).returncode == 0
    assert _final_metrics(run) == _final_metrics(uninterrupted)


def test_a_killed_worker_fails_its_trial_only_and_resume_completes_it(tmp_path, data_dir, uninterrupted):
    cmd = [sys.executable, "-m", "lenetlab", "study", *RESUME_ARGS, "--out", str(tmp_path),
           "--name", "victim", "--data-dir", str(data_dir)]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "victim"
    _wait_for(run, "checkpoints/*.pt", process)
    workers = _workers(process.pid)
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)
    stdout, _ = process.communicate(timeout=300)
    assert process.returncode == 1  # finished, with a failure to report
    summary = json.loads((run / "summary.json").read_text())
    failures = [(c["name"], f) for c in summary["configs"] for f in c["failed"]]
    assert len(failures) == 1 and "killed by signal 9" in failures[0][1]["error"]
    assert summary["configs"][1]["completed_seeds"] == [0]  # the other trial completed
    assert "killed by signal 9" in (run / "report.md").read_text()
    assert "--resume" in stdout
    result = lenetlab("study", "--resume", run, "--data-dir", data_dir)
    assert result.returncode == 0, result.stderr
    assert _final_metrics(run) == _final_metrics(uninterrupted)


def test_damaged_trial_results_count_as_missing(study_run, tmp_path):
    from lenetlab.study import load_plan, read_results

    run, _ = study_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    plan = load_plan(copy)
    assert len(read_results(copy, plan)) == 6
    (copy / "trials" / "baseline__seed0.json").write_text("[]")
    (copy / "trials" / "dropout__seed1.json").write_text('{"key": "dropout__seed1", "status": "done"}')
    assert sorted(read_results(copy, plan)) == ["baseline__seed1", "dropout__seed0",
                                                 "l2_optimized__seed0", "l2_optimized__seed1"]


def test_damaged_run_folders_are_refused(tmp_path, data_dir):
    run = tmp_path / "damaged"
    run.mkdir()
    (run / "run.json").write_text("{not json")
    assert_one_line_error(lenetlab("study", "--resume", run), "run.json")
    (run / "run.json").write_text(json.dumps({"configs": [{"name": "x"}]}))
    assert_one_line_error(lenetlab("study", "--resume", run), "malformed")
    plan = {"kind": "study", "name": "damaged", "created": "now", "lenetlab_version": "0",
            "configs": [{"name": "baseline", "recipe": {"name": "baseline"}}], "seeds": ["x"],
            "options": {"threads": 1, "split_seed": 0, "device": "cpu"}}
    (run / "run.json").write_text(json.dumps(plan))
    assert_one_line_error(lenetlab("study", "--resume", run), "seeds")
    assert_one_line_error(lenetlab("report", run), "has not finished", "--resume")
    plan["seeds"] = [0]
    for damage, problem in [
        ({"elapsed_s": "x"}, "elapsed_s"),
        ({"configs": [{"name": "baseline", "recipe": {"name": "baseline",
                                                      "warm_start_from": "nosuch",
                                                      "warm_start_epochs": 2}}]}, "warm start"),
        ({"configs": plan["configs"] * 2}, "appears twice"),
        ({"options": {**plan["options"], "threads": 0}}, "options.threads"),
        ({"options": {**plan["options"], "device": "tpu"}}, "options.device"),
        ({"options": {**plan["options"], "train_subset": 0}}, "options.train_subset"),
    ]:
        (run / "run.json").write_text(json.dumps({**plan, **damage}))
        assert_one_line_error(lenetlab("study", "--resume", run), "malformed", problem)
    (run / "run.json").write_text(json.dumps(plan))
    assert_one_line_error(lenetlab("study", "--resume", run, "--seeds", "2"), "drop --seeds")
    assert_one_line_error(lenetlab("study", "--resume", run, "--split-seed", "0"), "drop --split-seed")
