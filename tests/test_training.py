"""The fast training loop on the real data: it learns, it is deterministic, it resumes exactly."""

from __future__ import annotations

import torch

from lenetlab.evaluation import evaluate
from lenetlab.recipes import RECIPES, get_recipe, scale_epochs
from lenetlab.training import phases, train_trial


def test_short_run_learns_far_above_chance(small_splits):
    out = train_trial(RECIPES["baseline"].with_changes(epochs=2), 0, small_splits)
    final = {r["split"]: r["accuracy"] for r in out.history if r["epoch"] == 2}
    assert final["test"] > 0.70 and final["val"] > 0.70  # chance is 0.10
    assert [r["split"] for r in out.history] == ["train", "val", "test"] * 2
    result = evaluate(out.model, small_splits.test_x, small_splits.test_y)
    assert result.accuracy == final["test"]
    assert sum(map(sum, result.confusion_matrix)) == 10_000


def test_same_seed_same_numbers_other_seed_other_numbers(small_splits):
    recipe = RECIPES["dropout"].with_changes(epochs=1)
    a = train_trial(recipe, 3, small_splits)
    b = train_trial(recipe, 3, small_splits)
    c = train_trial(recipe, 4, small_splits)
    assert a.history == b.history
    assert a.history != c.history
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key])


def test_resume_from_checkpoint_gives_the_uninterrupted_numbers(small_splits, tmp_path):
    recipe = RECIPES["batch_norm"].with_changes(epochs=3)
    whole = train_trial(recipe, 1, small_splits)
    checkpoint = tmp_path / "ckpt.pt"
    first = train_trial(recipe, 1, small_splits, checkpoint=checkpoint, stop_after_epoch=1)
    assert len(first.history) == 3 and checkpoint.is_file()
    resumed = train_trial(recipe, 1, small_splits, checkpoint=checkpoint)
    assert resumed.history == whole.history


def test_warm_start_runs_the_l2_phase_first(small_splits, tmp_path):
    recipe = scale_epochs(get_recipe("l2_optimized", warm_start=True), 0.1)
    assert [(p.recipe.weight_decay, p.first_epoch, p.last_epoch) for p in phases(recipe)] == [
        (0.01, 1, 1), (0.001, 2, 3)]
    checkpoint = tmp_path / "ckpt.pt"
    whole = train_trial(recipe, 0, small_splits)
    train_trial(recipe, 0, small_splits, checkpoint=checkpoint, stop_after_epoch=2)
    assert train_trial(recipe, 0, small_splits, checkpoint=checkpoint).history == whole.history
    assert [r["epoch"] for r in whole.history if r["split"] == "test"] == [1, 2, 3]


def test_weight_decay_is_applied(small_splits):
    plain = train_trial(RECIPES["baseline"].with_changes(epochs=1), 0, small_splits).model
    decayed = train_trial(RECIPES["baseline"].with_changes(epochs=1, weight_decay=0.1), 0,
                          small_splits).model
    norm = lambda m: sum(p.norm() ** 2 for p in m.parameters()).item()  # noqa: E731
    assert norm(decayed) < norm(plain)
