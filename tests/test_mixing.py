"""Mixup and CutMix: an epoch's draws, the mixed images and soft targets, the recipe fields' checks."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_one_line_error, run_cli

from lenetlab import mixing
from lenetlab.recipes import FIELDS, RECIPES, with_fields
from lenetlab.training import derived_seed

BOTH = mixing.Mixing(0.4, 1.0, 0.8)


def _batches(n: int, batch: int):
    return [(start, min(start + batch, n)) for start in range(0, n, batch)]


def test_each_batch_is_mixed_with_a_permutation_of_itself_and_the_draws_repeat():
    draws = mixing.draw(BOTH, 1000, 64, seed=5)
    again = mixing.draw(BOTH, 1000, 64, seed=5)
    other = mixing.draw(BOTH, 1000, 64, seed=6)
    for name in ("partner", "lam", "box"):
        assert torch.equal(getattr(draws, name), getattr(again, name))
    assert not torch.equal(draws.lam, other.lam)
    for start, stop in _batches(1000, 64):  # the last batch 40 images
        partner = draws.partner[start:stop]
        assert sorted(partner.tolist()) == list(range(stop - start))
        # one coin per batch: its images share their weight and box
        assert (draws.lam[start:stop] == draws.lam[start]).all()
        assert (draws.box[start:stop] == draws.box[start]).all()


def test_the_coins_pick_the_mixed_batches_and_their_kind():
    """mix_prob of the batches are mixed (with a permutation of themselves); with both on, each
    kind in about half of those. An unmixed batch is its own partner, weight 1, no box."""
    draws = mixing.draw(BOTH, 64 * 2000, 64, seed=1)
    firsts = torch.arange(0, 64 * 2000, 64)
    lam, box = draws.lam[firsts], draws.box[firsts]
    cut = (box[:, 1] > box[:, 0]) & (box[:, 3] > box[:, 2])
    mixed = (draws.partner.view(2000, 64) != torch.arange(64)).any(1)
    assert abs(mixed.float().mean().item() - 0.8) < 0.03
    assert abs(cut.float().mean().item() - 0.4) < 0.03
    assert (lam[~mixed] == 1).all() and not cut[~mixed].any()
    only_mixup = mixing.draw(mixing.Mixing(0.4), 64 * 100, 64, seed=1)
    assert (only_mixup.box == 0).all() and (only_mixup.lam < 1).all()


def test_cutmix_pastes_the_partners_box_and_weighs_its_area():
    draws = mixing.draw(mixing.Mixing(cutmix=1.0), 256, 128, seed=3)
    x = torch.randn(256, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (256,), generator=torch.Generator().manual_seed(1))
    for start, stop in _batches(256, 128):
        mixed = draws.images(x[start:stop], start)
        targets = draws.targets(y[start:stop], start)
        for i in (0, 17, 127):
            j = start + i
            y0, y1, x0, x1 = draws.box[j].tolist()
            partner = x[start + draws.partner[j]]
            inside = torch.zeros(28, 28, dtype=torch.bool)
            inside[y0:y1, x0:x1] = True
            assert torch.equal(mixed[i, 0][inside], partner[0][inside])
            assert torch.equal(mixed[i, 0][~inside], x[j, 0][~inside])
            assert draws.lam[j].item() == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 784, abs=1e-7)
            assert targets[i].sum().item() == pytest.approx(1.0)
            assert targets[i, y[j]] >= draws.lam[j] - 1e-7


def test_mixup_blends_images_and_labels_by_the_same_weight():
    draws = mixing.draw(mixing.Mixing(mixup=0.4), 64, 64, seed=2)
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.arange(64) % 10
    mixed, targets = draws.images(x, 0), draws.targets(y, 0)
    lam, partner = draws.lam[0].item(), draws.partner
    assert 0 < lam < 1
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[partner], atol=1e-6)
    own = targets.gather(1, y[:, None])[:, 0]
    same = y == y[partner]
    assert torch.allclose(own[~same], torch.full_like(own[~same], lam))
    assert torch.allclose(own[same], torch.ones_like(own[same]))


def test_the_mixing_stream_is_its_own():
    """Stream 3 of derived_seed: not one of the data order's, dropout's or augmentation's."""
    seeds = {derived_seed(0, 1, stream) for stream in range(4)}
    assert len(seeds) == 4


def test_the_fields_default_to_off_for_every_recipe():
    for recipe in RECIPES.values():
        assert (recipe.mixup, recipe.cutmix, recipe.mix_prob) == (0.0, 0.0, 1.0)
    assert not mixing.Mixing().active and mixing.Mixing(cutmix=0.5).active
    recipe = with_fields(RECIPES["baseline"], {"mixup": 0.2, "cutmix": 1, "mix_prob": 0.5})
    assert (recipe.mixup, recipe.cutmix, recipe.mix_prob) == (0.2, 1.0, 0.5)
    assert [FIELDS[k].short for k in ("mixup", "cutmix", "mix_prob")] == ["mix", "cut", "mp"]


@pytest.mark.parametrize(("flag", "value"), [("--mixup", "-1"), ("--cutmix", "101"), ("--mix-prob", "0"),
                                             ("--mix-prob", "1.5"), ("--mixup", "nan")])
def test_a_bad_value_is_one_line_and_exit_2(flag, value, tmp_path):
    result = run_cli("train", "baseline", flag, value, "--out", tmp_path / "runs")
    assert_one_line_error(result, flag.lstrip("-").replace("-", "_").split("_")[0])
