"""Run folders under two processes at once, a full disk and a diverging recipe (issue 14)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import (
    RESUME_ARGS,
    Ran,
    assert_one_line_error,
    lenetlab,
    metrics_text,
    run_cli,
    start_study,
    strict_json,
    wait_for,
)

from lenetlab.rundir import read_plan


@pytest.mark.slow
def test_two_processes_never_share_a_run_folder(tmp_path, data_dir):
    """Item 1: two studies with different plans started at the same moment on one folder (was:
    both exit 0, run.json of one, metrics.csv rows of the other); a resume while one runs."""
    plans = {"baseline,batch_norm": None, "baseline,dropout": None}
    for variants in plans:
        args = [*RESUME_ARGS[:2], "--variants", variants, *RESUME_ARGS[4:]]
        plans[variants] = start_study(tmp_path, "X", data_dir, args=args)
    run = tmp_path / "X"
    wait_for(run, "run.json")
    refused = run_cli("resume", run, "--data-dir", data_dir, "--quiet")  # was: every trial twice
    line = assert_one_line_error(refused, "in use by process")
    holder = int(re.search(r"in use by process (\d+)", line).group(1))
    outcome = {}
    for variants, process in plans.items():
        out, err = process.communicate(timeout=300)
        outcome[process.pid] = (variants, Ran(process.returncode, out, err))
    assert holder in outcome
    winner, won = outcome.pop(holder)
    assert won.returncode == 0, won.stderr
    [(_, lost)] = outcome.values()
    assert_one_line_error(lost, f"in use by process {holder}")
    # The folder holds the winner's run alone, and its files check out.
    expected = winner.split(",")
    assert [name for name, _ in read_plan(run).configs] == expected
    assert [c["name"] for c in strict_json(run / "summary.json")["configs"]] == expected
    assert {row.split(",")[0] for row in metrics_text(run).splitlines()[1:]} == set(expected)
    assert run_cli("report", run).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB file system (a tmpfs), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a small tmpfs here ({exc})")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or done.returncode}): "
                    "the full-disk test needs root or CAP_SYS_ADMIN")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_resume_completes_the_run(small_disk, tmp_path, data_dir,
                                                              uninterrupted):
    """Item 2: was five worker tracebacks, or torch's `unexpected pos ...` in every trial."""
    result = lenetlab("study", *RESUME_ARGS, "--out", small_disk, "--name", "full", "--data-dir", data_dir)
    run = small_disk / "full"
    line = assert_one_line_error(result, "the disk is full", "once fixed: lenetlab resume")
    written = Path(re.match(r"lenetlab: error: (.+): cannot write, the disk is full", line).group(1))
    assert run in written.parents  # names the file that could not be written
    assert not (run / "summary.json").exists()
    # Room again: remount larger, or else move the run folder to a roomy place.
    larger = subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], capture_output=True)
    if larger.returncode != 0:
        shutil.copytree(run, tmp_path / "roomy" / "full")
        run = tmp_path / "roomy" / "full"
        line = line.replace(str(small_disk), str(tmp_path / "roomy"))
    argv = shlex.split(line.split("once fixed: ", 1)[1])
    assert argv == ["lenetlab", "resume", str(run)]
    resumed = run_cli(*argv[1:], "--data-dir", data_dir, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert metrics_text(run) == metrics_text(uninterrupted)


def _row(report: str, name: str) -> str:
    return next(line for line in report.splitlines() if line.startswith(f"| {name} |"))


@pytest.mark.slow
def test_a_diverging_configuration_is_a_failed_trial_and_the_hints_paste_back(tmp_path, data_dir):
    """Item 5: was test accuracy 0.1000 and NaN in the trial files. Item 7: a name with a space
    gives resume lines that a shell reads back as one argument."""
    sweep = ["sweep", "--lr", "0.001,1e308", "--epochs", "1", "--seeds", "1", "--train-subset", "500",
             "--threads", "1", "--quiet", "--out", tmp_path, "--name", "lr check", "--data-dir", data_dir]
    result = run_cli(*sweep)
    run = tmp_path / "lr check"
    assert result.returncode == 1, result.stderr  # finished, with a failed trial
    configs = {c["name"]: c for c in strict_json(run / "summary.json")["configs"]}
    diverged = configs["baseline-ep1-lr1e+308"]
    assert diverged["final"] is None and diverged["completed_seeds"] == []
    assert re.match(r"diverged at epoch 1, step \d+: ", diverged["failed"][0]["error"])
    assert configs["baseline-ep1-lr0.001"]["final"]["test"]["n"] == 1
    report = (run / "report.md").read_text()
    row = _row(report, "baseline-ep1-lr1e+308")
    assert "| 0/1 | failed | failed | failed |" in row and "0.1000" not in row
    assert "- baseline-ep1-lr1e+308, seed 0: `diverged at epoch 1, step" in report
    for path in run.rglob("*.json"):
        strict_json(path)

    line = next(x for x in result.stdout.splitlines() if x.startswith("rerun the failed trials with: "))
    argv = shlex.split(line.split(": ", 1)[1])
    assert argv == ["lenetlab", "resume", str(run)]
    again = run_cli(*argv[1:], "--data-dir", data_dir, "--quiet")
    assert again.returncode == 1 and f"sweep {run}: 1 trial(s) done, 1 failed" in again.stdout

    refused = assert_one_line_error(run_cli(*sweep), "already holds a run")
    hint = refused.split("resume it with: ", 1)[1].rsplit(", or choose", 1)[0]
    assert shlex.split(hint) == ["lenetlab", "resume", str(run)]
