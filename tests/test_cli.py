"""The lenetlab command as a user runs it: output, saved files, and one-line errors with exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lenetlab.model import LeNet5V1


def lenetlab(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "lenetlab", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, cwd=cwd, timeout=600)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_variants_lists_the_five_recipes():
    result = lenetlab("variants")
    assert result.returncode == 0
    for name in ("baseline", "dropout", "l2_regularization", "batch_norm", "l2_optimized",
                 "lenet5v1_l2_optimized.pth"):
        assert name in result.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("models")
    result = lenetlab("train", "batch_norm", "--epochs", "1", "--train-subset", "3000", "--seed", "5",
                      "--out", out, "--data-dir", data_dir, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    return out, result


def test_train_prints_epochs_and_saves_original_names(trained):
    out, result = trained
    assert "epoch  1/1" in result.stdout and "test" in result.stdout
    weights = out / "lenet5_batchnorm_fashionmnist.pth"
    sidecar = json.loads(weights.with_suffix(".json").read_text())
    assert sidecar["variant"] == "batch_norm" and sidecar["seed"] == 5
    assert len(sidecar["metrics"]) == 3 and set(sidecar["data_sha256"]) == {
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte"}
    state = torch.load(weights, weights_only=True)
    LeNet5V1(use_batch_norm=True).load_state_dict(state)  # loads in the original class


def test_evaluate_reproduces_the_trained_test_accuracy(trained, data_dir):
    out, result = trained
    sidecar = json.loads((out / "lenet5_batchnorm_fashionmnist.json").read_text())
    evaluated = lenetlab("evaluate", out / "lenet5_batchnorm_fashionmnist.pth", "--json",
                         "--data-dir", data_dir)
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    assert report["variant"] == "batch_norm"
    assert report["test_accuracy"] == pytest.approx(sidecar["test_accuracy"], abs=1e-9)
    assert len(report["per_class_accuracy"]) == 10 and "Ankle boot" in report["per_class_accuracy"]
    assert sum(map(sum, report["confusion_matrix"])) == 10_000
    text = lenetlab("evaluate", out / "lenet5_batchnorm_fashionmnist.pth", "--data-dir", data_dir)
    assert f"{sidecar['test_accuracy']:.4f}" in text.stdout and "Trouser" in text.stdout


@pytest.mark.parametrize("flags", [(False, False), (True, False), (False, True), (True, True)])
def test_evaluate_detects_every_flag_combination(tmp_path, data_dir, flags):
    path = tmp_path / "original.pth"
    torch.save(LeNet5V1(*flags).state_dict(), path)
    report = json.loads(lenetlab("evaluate", path, "--json", "--data-dir", data_dir).stdout)
    assert (report["use_dropout"], report["use_batch_norm"]) == flags


def test_bad_inputs_get_one_line_and_exit_2(tmp_path, data_dir):
    assert_one_line_error(lenetlab("evaluate", tmp_path / "nope.pth"), "nope.pth", "no such file")
    (tmp_path / "text.pth").write_text("not torch")
    assert_one_line_error(lenetlab("evaluate", tmp_path / "text.pth"), "text.pth", "not a torch")
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pth")
    assert_one_line_error(lenetlab("evaluate", tmp_path / "other.pth"), "not a LeNet5V1 state_dict")
    assert_one_line_error(lenetlab("train", "resnet"), "unknown variant 'resnet'")
    assert_one_line_error(lenetlab("train", "baseline", "--epochs", "0"), "--epochs")
    assert_one_line_error(lenetlab("train", "baseline", "--lr", "abc"), "--lr")
    assert_one_line_error(lenetlab("train", "baseline", "--seed", "-1"), "--seed")
    assert_one_line_error(lenetlab("evaluate", tmp_path / "text.pth", "--device", "cuda:x"), "text.pth")
    assert_one_line_error(lenetlab("train", "baseline", "--device", "tpu", "--data-dir", data_dir),
                          "--device tpu")
    assert_one_line_error(lenetlab("train", "baseline", "--data-dir", tmp_path), str(tmp_path),
                          "missing")
    assert_one_line_error(lenetlab("study", "--variants", "baseline,nope"), "unknown variant 'nope'")
    assert_one_line_error(lenetlab("report", tmp_path / "norun"), "norun")
    assert_one_line_error(lenetlab("study", "--resume", tmp_path), "not a lenetlab run")
    assert_one_line_error(lenetlab("frobnicate"), "invalid choice")


def test_mistakes_are_refused_before_any_work_or_folder(tmp_path, data_dir):
    in_the_way = tmp_path / "afile"
    in_the_way.write_text("x")
    result = lenetlab("train", "baseline", "--epochs", "1", "--train-subset", "500", "--out",
                      in_the_way, "--data-dir", data_dir, "--quiet")
    assert_one_line_error(result, "afile", "a file is in the way")
    assert "epoch" not in result.stdout  # refused before training, not after
    assert_one_line_error(lenetlab("study", "--out", in_the_way, "--data-dir", data_dir), "afile")
    assert_one_line_error(lenetlab("study", "--variants", ","), "comma-separated list")
    assert_one_line_error(lenetlab("study", "--name", "..", "--out", tmp_path), "--name")
    assert_one_line_error(lenetlab("train", "baseline", "--train-subset", "100000", "--data-dir",
                                   data_dir), "--train-subset 100000", "only 54,000")
    # A start that fails leaves no run folder that would block a retry.
    for mistake, fragment in [(["--data-dir", tmp_path / "nodata"], "nodata"),
                              (["--device", "tpu", "--data-dir", data_dir], "--device tpu"),
                              (["--train-subset", "60000", "--data-dir", data_dir], "only 54,000")]:
        result = lenetlab("study", "--out", tmp_path / "runs", "--name", "first", *mistake)
        assert_one_line_error(result, fragment)
        assert not (tmp_path / "runs" / "first").exists()
    spec = tmp_path / "one.toml"
    spec.write_text("seeds = 1\n[grid]\nlr = [0.001]\n")
    assert_one_line_error(lenetlab("sweep", spec, "--seeds", "2", "--epochs", "1"), "one.toml",
                          "--seeds, --epochs")


def test_weights_that_are_not_a_state_dict_say_what_they_are(tmp_path, data_dir):
    assert_one_line_error(lenetlab("evaluate", tmp_path), "a folder")
    torch.save(LeNet5V1(), tmp_path / "whole.pth")  # the whole module, pickled
    assert_one_line_error(lenetlab("evaluate", tmp_path / "whole.pth"), "whole.pth",
                          "save model.state_dict() instead")
    result = lenetlab("evaluate", data_dir / "t10k-labels-idx1-ubyte.gz")
    assert_one_line_error(result, "not a torch weights file")
    assert "\x1b" not in result.stderr
