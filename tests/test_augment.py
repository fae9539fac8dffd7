"""Augmentation on real images and the learning-rate schedules against PyTorch's own."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lenetlab.augment import Augmentation, augment
from lenetlab.recipes import RECIPES
from lenetlab.training import BACKGROUND, learning_rate


@pytest.fixture(scope="module")
def batch(small_splits):
    return small_splits.train_x[:512].clone()


def candidates(image: torch.Tensor, pad: int) -> list[torch.Tensor]:
    """Every image translation by up to pad pixels and flip may make of one (1, 28, 28) image."""
    padded = torch.nn.functional.pad(image, (pad,) * 4, value=BACKGROUND)
    out = []
    for dy in range(-pad, pad + 1):
        for dx in range(-pad, pad + 1):
            crop = padded[:, pad + dy:pad + dy + 28, pad + dx:pad + dx + 28]
            out += [crop, crop.flip(2)]
    return out


def test_translation_and_flip_give_each_image_one_of_its_allowed_moves(batch):
    out = augment(batch, Augmentation(translate=2, flip=True), torch.Generator().manual_seed(0), BACKGROUND)
    assert out.shape == batch.shape and out.is_contiguous()
    moves = []
    for image, moved in zip(batch, out):
        options = candidates(image, 2)
        hits = [i for i, c in enumerate(options) if torch.equal(c, moved)]
        assert hits, "an output image is no translation/flip of its input"
        moves.append(hits[0])
    # 25 shifts x 2 flips: on 512 images, a fair draw reaches nearly all of them
    assert len(set(moves)) >= 45


def test_flip_alone_mirrors_about_half_the_images(batch):
    out = augment(batch, Augmentation(flip=True), torch.Generator().manual_seed(1), BACKGROUND)
    flipped = sum(torch.equal(o, b.flip(2)) and not torch.equal(o, b) for o, b in zip(out, batch))
    same = sum(torch.equal(o, b) for o, b in zip(out, batch))
    assert flipped + same == len(batch)
    assert 200 < flipped < 312  # Binomial(512, 0.5): 256 +- 56 is over 4.9 sigma


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_erasing_blanks_one_rectangle_in_about_p_of_the_images(batch, p):
    out = augment(batch, Augmentation(erasing=p), torch.Generator().manual_seed(2), BACKGROUND)
    erased = 0
    for image, result in zip(batch, out):
        changed = (image != result)[0]
        if not torch.equal(image, result):
            erased += 1
            assert (result[0][changed] == 0).all()
        # where anything changed, the changed pixels lie in one rectangle filled with 0
        rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
        if len(rows):
            box = result[0, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            area = box.numel()
            assert (box == 0).all() and 0.02 * 784 * 0.5 <= area <= 0.33 * 784 * 1.5
    if p == 0:
        assert erased == 0
    else:  # Binomial(512, p) within 4.5 sigma, less a few images whose patch was already all 0
        assert abs(erased - p * len(batch)) <= 4.5 * (len(batch) * p * (1 - p)) ** 0.5 + 5


def test_same_generator_seed_same_batch_other_seed_other_batch(batch):
    aug = Augmentation(translate=3, flip=True, erasing=0.5)
    a = augment(batch, aug, torch.Generator().manual_seed(5), BACKGROUND)
    b = augment(batch, aug, torch.Generator().manual_seed(5), BACKGROUND)
    c = augment(batch, aug, torch.Generator().manual_seed(6), BACKGROUND)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(augment(batch, Augmentation(), torch.Generator(), BACKGROUND), batch)


def lrs_of(recipe, total, warmup):
    return [learning_rate(recipe, step, total, warmup) for step in range(total)]


def test_onecycle_is_pytorchs_one_cycle_schedule():
    recipe = replace(RECIPES["tuned"], lr=3e-3, schedule="onecycle")
    for total, warmup in ((120, 36), (50, 2), (7, 0)):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=recipe.lr)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=total,
                                                        pct_start=max(warmup, 1e-9) / total,
                                                        cycle_momentum=False)
        expected = []
        for _ in range(total):
            expected.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        ours = lrs_of(recipe, total, warmup)
        assert ours == pytest.approx(expected, rel=1e-9, abs=1e-12), (total, warmup)
    assert lrs_of(recipe, 50, 1)[0] == recipe.lr  # a one-step rise (PyTorch divides by zero there)


def test_warmup_then_constant_or_cosine():
    base = replace(RECIPES["baseline"], lr=0.01)
    assert lrs_of(base, 30, 0) == [0.01] * 30  # the original recipes: untouched
    warm = lrs_of(base, 30, 10)
    assert warm[:10] == pytest.approx([0.001 * (i + 1) for i in range(10)]) and warm[10:] == [0.01] * 20
    cosine = lrs_of(replace(base, schedule="cosine"), 110, 10)
    assert cosine[9] == pytest.approx(0.01) and cosine[10] == pytest.approx(0.01)
    assert all(a > b for a, b in zip(cosine[10:], cosine[11:]))  # falls steadily after the warm-up
    assert cosine[60] == pytest.approx(0.005) and cosine[-1] < 0.01 * 0.001
