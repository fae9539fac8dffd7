"""The kernel choice (lenetlab/native/gate.py): the native step trains a recipe only where it
covers all of it, and anything else, a new optimiser or a new recipe field, trains on PyTorch's
path instead of failing there."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import replace

import pytest
import torch
from conftest import assert_one_line_error, run_cli

from lenetlab import native, optimizers, recipes
from lenetlab.recipes import RECIPES, Recipe
from lenetlab.training import train_trial

needs_native = pytest.mark.skipif(native.load() is None, reason="no native step here (no C compiler)")


@pytest.fixture
def rmsprop(monkeypatch):
    """RMSprop added as recipes.py tells a user to add an optimiser: its name there, its
    constructor in optimizers.py."""
    monkeypatch.setattr(recipes, "OPTIMIZERS", (*recipes.OPTIMIZERS, "rmsprop"))
    monkeypatch.setitem(optimizers.OPTIMIZERS, "rmsprop", lambda params, r: torch.optim.RMSprop(
        params, lr=r.lr, weight_decay=r.weight_decay))


@dataclasses.dataclass(frozen=True)
class CutoutRecipe(Recipe):
    """A recipe with a field the native step has never heard of, as a test-only subclass."""

    cutout: float = 0.0


@needs_native
def test_every_shipped_recipe_is_native():
    for name, recipe in RECIPES.items():
        assert native.native_gap(recipe) is None, name
        assert native.choose("auto", recipe, "cpu") == "native"


def test_what_the_native_step_lacks_is_named():
    assert "device cuda" in native.native_gap(RECIPES["baseline"], "cuda")
    assert "cutout = 0.2" in native.native_gap(CutoutRecipe("baseline", cutout=0.2))


@needs_native
def test_a_new_field_at_its_default_keeps_the_native_step():
    assert native.native_gap(CutoutRecipe("baseline")) is None


@needs_native
def test_a_new_optimizer_falls_back_and_native_refuses_it(rmsprop):
    recipe = replace(RECIPES["baseline"], optimizer="rmsprop")
    assert "RMSprop" in native.native_gap(recipe)
    assert native.choose("auto", recipe, "cpu") == "torch"
    with pytest.raises(recipes.SpecError, match="RMSprop"):
        native.choose("native", recipe, "cpu")


@needs_native
def test_a_warm_start_is_checked_in_both_phases(rmsprop, monkeypatch):
    l2 = replace(RECIPES["l2_regularization"], optimizer="rmsprop")
    monkeypatch.setitem(RECIPES, "l2_regularization", l2)
    warm = recipes.get_recipe("l2_optimized", warm_start=True)
    assert "RMSprop" in native.native_gap(warm)


@needs_native
def test_a_new_field_in_use_trains_on_pytorchs_path(small_splits):
    """A field the step does not know, set: the trial trains (no traceback) on PyTorch's path."""
    recipe = CutoutRecipe("baseline", epochs=1, cutout=0.2)
    output = train_trial(recipe, 0, small_splits)
    reference = train_trial(replace(RECIPES["baseline"], epochs=1), 0, small_splits, kernels="torch")
    assert output.kernels == "torch"
    assert output.history == reference.history  # this loop has no cutout: the plain torch run


@needs_native
def test_rmsprop_trains_under_the_default_kernels_with_pytorchs_numbers(rmsprop, tmp_path, data_dir):
    """The issue's case: `lenetlab train baseline --optimizer rmsprop` with the default kernels
    trains, says once why it is not native, and saves what --kernels torch saves."""
    common = ["train", "baseline", "--optimizer", "rmsprop", "--epochs", "1", "--train-subset", "640",
              "--data-dir", data_dir, "--quiet"]
    auto = run_cli(*common, "--out", tmp_path / "auto")
    assert auto.returncode == 0, auto.stderr
    notes = [line for line in auto.stderr.splitlines() if "note:" in line]
    assert len(notes) == 1 and "baseline trains with PyTorch's kernels" in notes[0] and "RMSprop" in notes[0]
    assert "torch kernels" in auto.stdout
    forced = run_cli(*common, "--out", tmp_path / "torch", "--kernels", "torch")
    assert forced.returncode == 0, forced.stderr
    name = recipes.file_name("baseline")
    weights = [(tmp_path / where / name).read_bytes() for where in ("auto", "torch")]
    assert hashlib.sha256(weights[0]).digest() == hashlib.sha256(weights[1]).digest()
    refused = run_cli(*common, "--out", tmp_path / "native", "--kernels", "native")
    assert_one_line_error(refused, "--kernels native", "RMSprop")
    assert not (tmp_path / "native").exists()
