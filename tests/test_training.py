"""The fast training loop on the real data: it learns, it is deterministic, it resumes exactly,
and it stops at the first non-finite loss."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import pytest
import torch
from conftest import KERNELS

from lenetlab import native, training
from lenetlab.evaluation import evaluate
from lenetlab.recipes import RECIPES, get_recipe, scale_epochs
from lenetlab.records import Diverged, final_accuracies
from lenetlab.training import phases, train_trial


def train(recipe, seed, splits, **kwargs):
    return train_trial(recipe, seed, splits, kernels=KERNELS, **kwargs)


@pytest.mark.slow
def test_short_run_learns_far_above_chance(small_splits):
    out = train(replace(RECIPES["baseline"], epochs=2), 0, small_splits)
    final = final_accuracies(out.history)
    assert final["test"] > 0.70 and final["val"] > 0.70  # chance is 0.10
    assert [r.split for r in out.history] == ["train", "val", "test"] * 2
    assert [r.epoch for r in out.history] == [1, 1, 1, 2, 2, 2]
    result = evaluate(out.model, small_splits.test_x, small_splits.test_y)
    assert result.accuracy == final["test"] == out.test.accuracy
    assert sum(map(sum, result.confusion_matrix)) == 10_000


@pytest.mark.slow
def test_same_seed_same_numbers_other_seed_other_numbers(small_splits):
    recipe = replace(RECIPES["dropout"], epochs=1)
    a = train(recipe, 3, small_splits)
    b = train(recipe, 3, small_splits)
    c = train(recipe, 4, small_splits)
    assert a.history == b.history
    assert a.history != c.history
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key])


@pytest.mark.slow
def test_resume_from_checkpoint_gives_the_uninterrupted_numbers(small_splits, tmp_path):
    recipe = replace(RECIPES["batch_norm"], epochs=2)
    whole = train(recipe, 1, small_splits)
    checkpoint = tmp_path / "ckpt.pt"
    first = train(recipe, 1, small_splits, checkpoint=checkpoint, stop_after_epoch=1)
    assert len(first.history) == 3 and checkpoint.is_file()
    resumed = train(recipe, 1, small_splits, checkpoint=checkpoint)
    assert resumed.history == whole.history
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key])


@pytest.mark.slow
def test_a_checkpoint_that_is_not_this_trials_state_is_ignored(small_splits, tmp_path):
    recipe = replace(RECIPES["baseline"], epochs=1)
    whole = train(recipe, 0, small_splits)
    checkpoint = tmp_path / "ckpt.pt"
    torch.save([1, 2], checkpoint)  # was an AttributeError in every resume of the trial
    assert train(recipe, 0, small_splits, checkpoint=checkpoint).history == whole.history
    checkpoint.write_bytes(b"truncated")
    assert train(recipe, 0, small_splits, checkpoint=checkpoint).history == whole.history


@pytest.mark.slow
def test_a_checkpoint_from_before_the_new_recipe_fields_resumes(small_splits, tmp_path):
    """Run folders started before activation, augmentation, ... existed carry recipes without
    those keys: they are the original's behaviour, so their checkpoints still resume."""
    from lenetlab.recipes import ORIGINAL_FIELDS

    recipe = replace(RECIPES["batch_norm"], epochs=2)
    whole = train(recipe, 1, small_splits)
    checkpoint = tmp_path / "ckpt.pt"
    train(recipe, 1, small_splits, checkpoint=checkpoint, stop_after_epoch=1)
    state = torch.load(checkpoint, weights_only=True)
    state["recipe"] = {k: v for k, v in state["recipe"].items() if k in ORIGINAL_FIELDS}
    del state["best"], state["average"]
    torch.save(state, checkpoint)
    resumed = train(recipe, 1, small_splits, checkpoint=checkpoint)
    assert resumed.history == whole.history
    assert [r.epoch for r in resumed.history if r.split == "train"] == [1, 2]


@pytest.mark.slow
def test_warm_start_runs_the_l2_phase_first(small_splits, tmp_path):
    recipe = scale_epochs(get_recipe("l2_optimized", warm_start=True), 0.1)
    assert [(p.recipe.weight_decay, p.first_epoch, p.last_epoch) for p in phases(recipe)] == [
        (0.01, 1, 1), (0.001, 2, 3)]
    checkpoint = tmp_path / "ckpt.pt"
    whole = train(recipe, 0, small_splits)
    train(recipe, 0, small_splits, checkpoint=checkpoint, stop_after_epoch=2)
    assert train(recipe, 0, small_splits, checkpoint=checkpoint).history == whole.history
    assert [r.epoch for r in whole.history if r.split == "test"] == [1, 2, 3]


def test_weight_decay_is_applied(small_splits):
    plain = train(replace(RECIPES["baseline"], epochs=1), 0, small_splits).model
    decayed = train(replace(RECIPES["baseline"], epochs=1, weight_decay=0.1), 0, small_splits).model
    norm = lambda m: sum(p.norm() ** 2 for p in m.parameters()).item()  # noqa: E731
    assert norm(decayed) < norm(plain)


def test_a_non_finite_loss_stops_training_where_it_happens(small_splits, tmp_path):
    """Issue 14, item 5: the first non-finite loss ends the trial, before a checkpoint of it."""
    checkpoint = tmp_path / "ckpt.pt"
    with pytest.raises(Diverged, match=r"^diverged at epoch 1, step \d+: "):
        train(replace(RECIPES["baseline"], epochs=2, lr=1e308), 0, small_splits, checkpoint=checkpoint)
    assert not checkpoint.exists()


# A short stand-in for the tuned recipe: every field beyond the original's at once (max pooling
# too, the layer the original lacks).
EVERYTHING = replace(RECIPES["tuned"], epochs=3, warmup_epochs=1, activation="relu", pool="max", translate=2,
                     flip=True, erasing=0.5, label_smoothing=0.1, ema=0.9, checkpoint="best_val")


# EVERYTHING with mixup and CutMix, each in some of the batches
MIXED = replace(EVERYTHING, mixup=0.4, cutmix=1.0, mix_prob=0.8)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [EVERYTHING, MIXED], ids=["everything", "mixing"])
def test_every_new_field_resumes_exactly(small_splits, tmp_path, recipe):
    """Augmentation, mixing, schedule, EMA and best_val state survive a checkpoint: same numbers."""
    whole = train(recipe, 2, small_splits)
    checkpoint = tmp_path / "ckpt.pt"
    train(recipe, 2, small_splits, checkpoint=checkpoint, stop_after_epoch=2)
    resumed = train(recipe, 2, small_splits, checkpoint=checkpoint)
    assert resumed.history == whole.history and resumed.kept_epoch == whole.kept_epoch
    assert resumed.test == whole.test and resumed.test_flip == whole.test_flip
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key])


@pytest.fixture(scope="module")
def tiny_splits(dataset):
    from lenetlab.data import make_splits

    return make_splits(dataset, split_seed=0, train_subset=256)


# On 256 training images at a constant lr of 0.01, seed 0's validation accuracy falls in the
# fifth epoch (0.49 -> 0.49- on both paths), so best_val has an earlier epoch to keep.
OVERFIT = replace(EVERYTHING, epochs=5, warmup_epochs=0, schedule="constant", lr=0.01, ema=0.0)


@pytest.mark.slow
def test_best_val_keeps_the_epoch_with_the_highest_validation_accuracy(tiny_splits, tmp_path):
    out = train(OVERFIT, 0, tiny_splits)
    val = {r.epoch: r.accuracy for r in out.history if r.split == "val"}
    assert out.kept_epoch == max(val, key=lambda e: (val[e], -e)) < 5  # the first of the best
    kept_test = next(r.accuracy for r in out.history if r.split == "test" and r.epoch == out.kept_epoch)
    assert out.test.accuracy == kept_test != out.history[-1].accuracy
    assert evaluate(out.model, tiny_splits.test_x, tiny_splits.test_y).accuracy == kept_test
    assert final_accuracies(out.history, out.kept_epoch)["val"] == max(val.values())
    assert out.test_flip is not None and 0.1 < out.test_flip <= 1
    # the kept epoch's model survives an interruption right after it
    checkpoint = tmp_path / "ckpt.pt"
    train(OVERFIT, 0, tiny_splits, checkpoint=checkpoint, stop_after_epoch=out.kept_epoch)
    resumed = train(OVERFIT, 0, tiny_splits, checkpoint=checkpoint)
    assert (resumed.kept_epoch, resumed.test, resumed.history) == (out.kept_epoch, out.test, out.history)
    for key, value in out.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key])


@pytest.mark.slow
def test_the_ema_model_is_the_one_evaluated_and_kept(small_splits):
    plain = train(replace(EVERYTHING, checkpoint="last", ema=0.0), 0, small_splits)
    averaged = train(replace(EVERYTHING, checkpoint="last", ema=0.9), 0, small_splits)
    assert plain.history[0] == averaged.history[0]  # the same training steps: train loss and accuracy
    assert [r for r in plain.history if r.split == "val"] != [r for r in averaged.history if r.split == "val"]
    last_test = averaged.history[-1].accuracy
    assert evaluate(averaged.model, small_splits.test_x, small_splits.test_y).accuracy == last_test


def test_the_ema_after_one_step_is_the_average_of_the_start_and_the_step(dataset):
    from lenetlab.data import make_splits
    from lenetlab.training import build_model

    one_step = make_splits(dataset, train_subset=64)  # batch 64: one step per epoch
    recipe = replace(EVERYTHING, epochs=1, warmup_epochs=0, checkpoint="last")
    start = build_model(recipe, 0).state_dict()
    stepped = train(replace(recipe, ema=0.0), 0, one_step).model.state_dict()
    averaged = train(replace(recipe, ema=0.5), 0, one_step).model.state_dict()
    for key, value in averaged.items():
        expected = (start[key] + stepped[key]) / 2 if value.is_floating_point() else stepped[key]
        assert torch.allclose(value, expected, atol=1e-6), key


@pytest.mark.parametrize("kernels", ["native", "torch"])
def test_mixup_and_cutmix_train_on_both_paths(small_splits, kernels):
    """One epoch on 3,000 real images with mixup, then CutMix, on each path: it learns, and on
    soft targets (whose entropy no prediction removes) its training loss stays well above
    the plain recipe's; accuracy counts each image's own label."""
    if kernels == "native" and native.load() is None:
        pytest.skip("no native step here (no C compiler)")
    base = replace(RECIPES["baseline"], epochs=1)
    plain = train_trial(base, 0, small_splits, kernels=kernels).history[0]
    for fields in ({"mixup": 0.4}, {"cutmix": 1.0}):
        out = train_trial(replace(base, **fields), 0, small_splits, kernels=kernels)
        train, val = out.history[:2]
        assert out.kernels == kernels and val.split == "val"
        assert val.accuracy > 0.5, (fields, val)  # chance: 0.1
        assert train.loss > plain.loss + 0.1, (fields, train, plain)


@pytest.mark.slow
@pytest.mark.skipif(native.load() is None, reason="no native step here (no C compiler)")
@pytest.mark.parametrize("recipe", [replace(EVERYTHING, epochs=2, ema=0.0),
                                    replace(MIXED, epochs=2, ema=0.0)], ids=["everything", "mixing"])
def test_new_fields_give_the_same_run_on_the_native_and_pytorch_paths(small_splits, monkeypatch, recipe):
    """Both float32 paths end as near the PyTorch path run in float64 as rounding takes them.

    Float rounding differs between the paths, and max pooling turns a rounding difference into
    another routed gradient, so the runs drift apart slowly (the per-step parity is
    test_native's), by an amount that depends on the CPU and the build. So the native run's
    metrics are held to SPREAD times the drift this run measures: how far torch's float32 run
    ends from its float64 one (the largest over the epochs of each split's; at least one image
    or one rounding per step). Wiring faults are far larger: without label smoothing the
    training loss falls by ~0.2, without augmentation the training accuracy rises by several
    points."""
    few = {name: getattr(small_splits, name)[:2000] for name in ("val_x", "val_y", "test_x", "test_y")}
    splits = dataclasses.replace(small_splits, **few)  # 2000 images to evaluate: three runs
    a = train_trial(recipe, 0, splits, kernels="native")
    b = train_trial(recipe, 0, splits, kernels="torch")
    build = training.build_model
    monkeypatch.setattr(training, "build_model", lambda recipe, seed: build(recipe, seed).double())
    images = {f.name: getattr(splits, f.name) for f in dataclasses.fields(splits) if f.name.endswith("_x")}
    splits64 = dataclasses.replace(splits, **{k: v.double() for k, v in images.items()})
    exact = train_trial(recipe, 0, splits64, kernels="torch")
    assert (a.kernels, b.kernels, exact.kernels) == ("native", "torch", "torch")
    assert next(exact.model.parameters()).dtype == torch.float64
    steps = len(splits.train_y) // recipe.batch_size * recipe.epochs
    for split in ("train", "val", "test"):
        rows = [(x, y, z) for x, y, z in zip(a.history, b.history, exact.history) if x.split == split]
        assert all((x.epoch, x.split) == (y.epoch, y.split) == (z.epoch, z.split) for x, y, z in rows)
        n = len(getattr(splits, f"{split}_y"))
        accuracy = SPREAD * max(max(abs(y.accuracy - z.accuracy) for _, y, z in rows), 1 / n)
        loss = SPREAD * max(max(abs(y.loss - z.loss) for _, y, z in rows), steps * ROUNDING * rows[0][2].loss)
        for x, y, z in rows:  # native, torch, float64
            assert abs(x.accuracy - z.accuracy) <= accuracy, (split, x.epoch, x.accuracy, y.accuracy,
                                                              z.accuracy)
            assert abs(x.loss - z.loss) <= loss, (split, x.epoch, x.loss, y.loss, z.loss)


SPREAD = 8  # as test_native's SPREAD_FACTOR
ROUNDING = 2.0 ** -24  # float32's unit roundoff
