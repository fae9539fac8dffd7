"""Weights never execute: a .pth or checkpoint whose pickle calls a function when loaded (the
classic __reduce__ payload) is refused by every command that reads weights, and a resumed
trial treats such a checkpoint as damaged and trains again; the payload never runs."""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from PIL import Image

from lenetlab.model import LeNet5V1
from lenetlab.recipes import RECIPES, with_fields
from lenetlab.training import train_trial


class Payload:
    """Unpickling this runs `touch MARKER` (os.system), as a hostile file would run anything."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile_files(folder: Path, marker: Path) -> list[Path]:
    """The payload as torch.save writes it (zip), inside a state_dict, and as a legacy pickle;
    each with the sidecar `lenetlab train` writes, so that only the weights are hostile."""
    folder.mkdir(parents=True, exist_ok=True)
    whole = folder / "payload.pth"
    torch.save(Payload(marker), whole)
    inside = folder / "inside.pth"
    torch.save({**LeNet5V1().state_dict(), "extra": Payload(marker)}, inside)
    legacy = folder / "legacy.pth"
    legacy.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    for weights in (whole, inside, legacy):
        sidecar = {"config": "baseline", "recipe": asdict(RECIPES["baseline"]), "seed": 0, "metrics": [],
                   "test_accuracy": 0.5, "architecture": {"activation": "tanh", "pool": "avg"}}
        weights.with_suffix(".json").write_text(json.dumps(sidecar), encoding="utf-8")
    return [whole, inside, legacy]


def test_the_payload_runs_when_loaded_without_weights_only(tmp_path):
    """The files are real payloads: plain unpickling runs them (so the tests below can fail)."""
    marker = tmp_path / "ran"
    legacy = hostile_files(tmp_path / "w", marker)[2]
    pickle.loads(legacy.read_bytes())
    assert marker.exists()


@pytest.fixture
def picture(tmp_path) -> Path:
    path = tmp_path / "shirt.png"
    Image.new("L", (28, 28), 30).save(path)
    return path


@pytest.mark.parametrize("command", ["evaluate", "predict", "export", "log-mlflow"])
def test_no_command_runs_a_pickled_payload(command, tmp_path, picture, data_dir):
    marker = tmp_path / "ran"
    for weights in hostile_files(tmp_path / "w", marker):
        args = {
            "evaluate": ["evaluate", weights, "--data-dir", data_dir],
            "predict": ["predict", weights, picture],
            "export": ["export", weights, "--onnx", tmp_path / "m.onnx", "--data-dir", data_dir],
            "log-mlflow": ["log-mlflow", weights, "--mlflow", f"sqlite:///{tmp_path / 'mlflow.db'}"],
        }[command]
        line = assert_one_line_error(run_cli(*args), str(weights))
        assert not marker.exists(), f"{command} ran the payload of {weights.name}"
        if command != "export" or "onnx" not in line:  # without the onnx extra export stops earlier
            assert "not" in line, line
    assert not (tmp_path / "m.onnx").exists()


def test_a_checkpoint_with_a_payload_is_damaged_and_the_trial_trains_again(tmp_path, small_splits):
    marker = tmp_path / "ran"
    recipe = with_fields(RECIPES["baseline"], {"epochs": 2})
    for hostile in hostile_files(tmp_path / "w", marker):
        checkpoint = tmp_path / "trial.ckpt"
        checkpoint.write_bytes(hostile.read_bytes())
        out = train_trial(recipe, 0, small_splits, checkpoint=checkpoint, kernels="torch")
        assert not marker.exists(), f"the checkpoint {hostile.name} ran its payload"
        assert sorted({row.epoch for row in out.history}) == [1, 2]  # trained from the first epoch
        # and what it saved in its place is lenetlab's own checkpoint, read back as one
        assert torch.load(checkpoint, weights_only=True)["epoch"] == 2
