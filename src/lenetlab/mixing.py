"""Mixup and CutMix of a training batch: an epoch's draws, the mixed images and their soft targets.

Each batch is mixed with a permutation of itself (its partner for each image), as the papers
do (Zhang et al. 2018, Yun et al. 2019). One coin per batch (probability prob) says whether
it is mixed; when both mixup and CutMix are on, a second fair coin per batch picks which.
Mixup blends every pixel, x = lam x_i + (1 - lam) x_partner with lam ~ Beta(mixup, mixup);
CutMix pastes the partner's box of about 1 - lam of the image (lam ~ Beta(cutmix, cutmix)),
lam then being 1 - box area / 784. The target is lam onehot(y_i) + (1 - lam) onehot(y_partner),
label smoothing composing on top as F.cross_entropy does. Accuracy counts y_i, the image's own.

The draws come from one generator seeded by (seed, epoch) (numpy's: torch draws no Beta from
a generator), made once per epoch in Python for both training paths, like augment.py's. The
native step mixes while packing its input (native/augment_pack.c) with the arithmetic of
apply() below, and a test holds the two bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 28  # image height and width
CLASSES = 10


@dataclass(frozen=True)
class Mixing:
    mixup: float = 0.0  # Beta(alpha, alpha)'s alpha for mixup; 0: off
    cutmix: float = 0.0  # likewise for CutMix; 0: off
    prob: float = 1.0  # probability that a batch is mixed

    @property
    def active(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.prob > 0


@dataclass
class MixDraws:
    """One epoch's mixing, per image in data order (batches never share a partner)."""

    partner: torch.Tensor  # (n,) int64: the image mixed in, as an index into its batch (itself: none)
    lam: torch.Tensor  # (n,) float32: the weight of the image's own label (mixup: of its pixels)
    box: torch.Tensor  # (n, 4) int64: CutMix's pasted rows [y0, y1) and columns [x0, x1); empty: none

    def images(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """The batch x (images start, start + 1, ... of the epoch, augmented already), mixed:
        a new tensor. Where the box is empty and lam is not 1, lam x + (1 - lam) x_partner
        (each product rounded, as torch rounds it); inside a box the partner's pixels."""
        stop = start + len(x)
        partner, lam, box = self.partner[start:stop], self.lam[start:stop], self.box[start:stop]
        other = x[partner]
        w = lam.view(-1, 1, 1, 1)
        empty = (box[:, 0] == box[:, 1]) | (box[:, 2] == box[:, 3])
        blend = (empty & (lam != 1)).view(-1, 1, 1, 1)
        x = torch.where(blend, w * x + (1 - w) * other, x)
        pixels = torch.arange(SIZE, device=x.device)
        rows = (pixels >= box[:, 0:1]) & (pixels < box[:, 1:2])
        cols = (pixels >= box[:, 2:3]) & (pixels < box[:, 3:4])
        inside = (rows[:, :, None] & cols[:, None, :])[:, None]
        return torch.where(inside, other, x).contiguous()

    def targets(self, y: torch.Tensor, start: int) -> torch.Tensor:
        """The soft targets (B, 10) of the batch's labels y: lam onehot(y) + (1 - lam) onehot(y_partner)."""
        return self.blend(F.one_hot(y, CLASSES).to(self.lam.dtype), start)

    def blend(self, targets: torch.Tensor, start: int) -> torch.Tensor:
        """The batch's soft targets (B, 10) mixed as its images are: lam t + (1 - lam) t_partner
        (a teacher's targets, teaching.py; targets() is this on one-hot labels)."""
        stop = start + len(targets)
        lam = self.lam[start:stop, None]
        return lam * targets + (1 - lam) * targets[self.partner[start:stop]]


def draw(mix: Mixing, n: int, batch: int, seed: int, device: torch.device | str = "cpu") -> MixDraws:
    """An epoch's mixing of n images in batches of batch (the last one shorter), drawn from
    numpy's generator seeded by seed, in a fixed order (vectorised over the batches)."""
    rng = np.random.default_rng(seed)
    starts = np.arange(0, n, batch)
    sizes = np.minimum(batch, n - starts)
    nb = len(starts)
    mixed = rng.random(nb) < mix.prob
    use_cut = np.full(nb, mix.cutmix > 0)
    if mix.mixup > 0 and mix.cutmix > 0:
        use_cut = rng.random(nb) < 0.5
    alpha = np.where(use_cut, mix.cutmix, mix.mixup)
    lam = rng.beta(np.where(alpha > 0, alpha, 1.0), np.where(alpha > 0, alpha, 1.0))
    centre = rng.integers(0, SIZE, (nb, 2))  # CutMix's box centre (y, x)
    keys = rng.random(n)  # each batch's permutation: its images sorted by these
    which = np.repeat(np.arange(nb), sizes)
    order = np.lexsort((keys, which))  # within each batch, by key
    partner = order - np.repeat(starts, sizes)
    # CutMix's box: sides sqrt(1 - lam) of the image's, centred at centre, clipped to it
    cut = (SIZE * np.sqrt(1.0 - lam)).astype(np.int64) // 2
    y0, y1 = np.clip(centre[:, 0] - cut, 0, SIZE), np.clip(centre[:, 0] + cut, 0, SIZE)
    x0, x1 = np.clip(centre[:, 1] - cut, 0, SIZE), np.clip(centre[:, 1] + cut, 0, SIZE)
    box = np.stack([y0, y1, x0, x1], 1) * (mixed & use_cut)[:, None]
    lam = np.where(use_cut, 1.0 - (y1 - y0) * (x1 - x0) / (SIZE * SIZE), lam)
    lam = np.where(mixed, lam, 1.0)
    partner = np.where(np.repeat(mixed, sizes), partner, np.arange(n) - np.repeat(starts, sizes))
    return MixDraws(torch.from_numpy(partner).to(device),
                    torch.from_numpy(np.repeat(lam, sizes).astype(np.float32)).to(device),
                    torch.from_numpy(np.repeat(box, sizes, axis=0)).to(device))
