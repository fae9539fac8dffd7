"""`lenetlab runs DIR`: one line per run folder, with its state, on folders made by the real
aggregation code (test_report.make_run) and then interrupted, held, damaged or failed."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import assert_one_line_error, run_cli
from support.runs import STUDY, make_run

from lenetlab.rundir import hold


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "a-finished"
    summary = make_run(run_dir, [{"name": "baseline", "base": 0.88}, {"name": "batch_norm", "base": 0.90}])
    return run_dir, summary


def _copy(finished, tmp_path, name):
    copy = tmp_path / "runs" / name
    shutil.copytree(finished[0], copy)
    return copy


def _lines(folder):
    result = run_cli("runs", folder)
    assert result.returncode == 0, result.stderr
    return {line.split()[0]: line for line in result.stdout.splitlines()}


def test_each_state_on_its_line(finished, tmp_path):
    _copy(finished, tmp_path, "a-finished")
    interrupted = _copy(finished, tmp_path, "b-interrupted")
    (interrupted / "trials" / "batch_norm__seed1.json").unlink()
    (interrupted / "summary.json").unlink()
    damaged = _copy(finished, tmp_path, "c-damaged")
    plan = json.loads((damaged / "run.json").read_text())
    plan["seeds"] = [0, 1, 2]  # edited by hand: its checksum no longer matches
    (damaged / "run.json").write_text(json.dumps(plan))
    held = _copy(finished, tmp_path, "d-held")
    (tmp_path / "runs" / "not-a-run").mkdir()
    with hold(held):
        lines = _lines(tmp_path / "runs")
    assert set(lines) == {"a-finished", "b-interrupted", "c-damaged", "d-held"}
    summary = finished[1]
    best = summary.best_config
    assert lines["a-finished"].endswith(
        f"study  2 config(s) x 2 seed(s)  4 done, 0 failed  best {best.name} "
        f"{best.final['test'].mean:.4f}  finished")
    assert "3 done, 0 failed" in lines["b-interrupted"]
    assert lines["b-interrupted"].endswith("interrupted: lenetlab resume finishes it")
    assert "damaged" in lines["c-damaged"] and "run.json" in lines["c-damaged"]
    assert lines["d-held"].endswith(f"in use by process {os.getpid()}")


def test_failures_say_resume_reruns_them(tmp_path):
    make_run(tmp_path / "runs" / "failing", STUDY)  # dropout seed 1 failed
    line = _lines(tmp_path / "runs")["failing"]
    assert "5 done, 1 failed" in line and "finished, with failures: lenetlab resume reruns them" in line


def test_empty_and_missing_folders(tmp_path):
    result = run_cli("runs", tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"no run folders under {tmp_path}"
    assert_one_line_error(run_cli("runs", tmp_path / "nowhere"), "nowhere", "no such folder")
