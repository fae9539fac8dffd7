"""Data augmentation of a training batch on its device: translation, horizontal flip, random erasing.

Vectorised over the batch (no DataLoader, no per-image Python): translation and flip are one
gather with per-image index offsets, erasing one mask built by broadcasting. The random numbers
come from the generator the caller passes, seeded by (seed, epoch) like the data order, so an
epoch's augmentation is the same on every run and after a resume, and on both training paths.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

SIZE = 28  # image height and width

# Random erasing's rectangle, as torchvision's RandomErasing draws it: 2-33% of the image's
# area, aspect ratio 0.3 to 3.3 (log-uniform), filled with 0 (the data set's mean after
# normalisation).
ERASE_AREA = (0.02, 0.33)
ERASE_LOG_RATIO = (math.log(0.3), math.log(3.3))


@dataclass(frozen=True)
class Augmentation:
    translate: int = 0  # pixels, 0 to SIZE - 1: shift each image by up to this much, both axes
    flip: bool = False  # mirror half the images left-right
    erasing: float = 0.0  # probability of erasing one random rectangle of an image

    @property
    def active(self) -> bool:
        return self.translate > 0 or self.flip or self.erasing > 0


@functools.lru_cache(maxsize=8)
def _moves(pad: int, flip: bool, device: torch.device) -> torch.Tensor:
    """(moves, SIZE * SIZE) flat indices into an image with one background pixel appended (index
    SIZE * SIZE): row k is the k-th move (shift dy, dx in -pad..pad, then mirrored or not)
    gathered from the original. Built once; per batch, one draw picks each image's row."""
    y = torch.arange(SIZE, device=device)
    rows = []
    for mirrored in (False, True) if flip else (False,):
        for dy in range(-pad, pad + 1):
            for dx in range(-pad, pad + 1):
                src_y = (y + dy)[:, None].expand(SIZE, SIZE)
                src_x = (y.flip(0) if mirrored else y)[None, :] + dx
                inside = (src_y >= 0) & (src_y < SIZE) & (src_x >= 0) & (src_x < SIZE)
                rows.append(torch.where(inside, src_y * SIZE + src_x, SIZE * SIZE).reshape(-1))
    return torch.stack(rows)


@dataclass
class EpochDraws:
    """One epoch's random moves and erasing rectangles, drawn at once for every image of the
    epoch in data order (drawing per batch cost more in per-call overhead than the work)."""

    aug: Augmentation
    background: float
    move: torch.Tensor | None  # (n,) row of _moves per image
    rows: torch.Tensor | None  # (n, SIZE) 1 where the image's erased rectangle spans the row
    cols: torch.Tensor | None  # (n, SIZE) likewise for columns

    def apply(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """The batch x of images start, start + 1, ... of the epoch, augmented (a new tensor).
        The native step does the same while packing its input (native/augment_pack.c's augment_image,
        which decodes a move as _moves orders them); a test holds the two bit-identical."""
        b, stop = len(x), start + len(x)
        if self.move is not None:
            table = _moves(self.aug.translate, self.aug.flip, x.device)
            flat = torch.cat([x.reshape(b, -1), x.new_full((b, 1), self.background)], 1)
            x = flat.gather(1, table[self.move[start:stop]]).view(b, 1, SIZE, SIZE)
        if self.rows is not None:  # x * (1 - rows cols^T): 0 inside the rectangle
            x = x * (1.0 - self.rows[start:stop, None, :, None] * self.cols[start:stop, None, None, :])
        return x.contiguous()


def draw(aug: Augmentation, n: int, generator: torch.Generator, background: float,
         device: torch.device | str = "cpu") -> EpochDraws:
    """Draw an epoch's augmentation of n images from generator (in a fixed order).

    Translation pads with background (the normalised value of a black pixel, as the data set's
    own background) and crops at a random offset of up to aug.translate pixels per axis; flip
    mirrors with probability 1/2; erasing blanks one rectangle with probability aug.erasing.
    """
    move = rows = cols = None
    if aug.translate > 0 or aug.flip:
        moves = len(_moves(aug.translate, aug.flip, torch.device(device)))
        move = torch.randint(0, moves, (n,), generator=generator, device=device)
    if aug.erasing > 0:
        u = torch.rand((n, 5), generator=generator, device=device)
        area = (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * u[:, 0]) * SIZE * SIZE
        ratio = torch.exp(ERASE_LOG_RATIO[0] + (ERASE_LOG_RATIO[1] - ERASE_LOG_RATIO[0]) * u[:, 1])
        h = torch.sqrt(area * ratio).round().clamp(1, SIZE)
        w = torch.sqrt(area / ratio).round().clamp(1, SIZE)
        top = ((SIZE - h + 1) * u[:, 2]).floor()
        left = ((SIZE - w + 1) * u[:, 3]).floor()
        on = (u[:, 4] < aug.erasing).float()
        pixels = torch.arange(SIZE, device=device, dtype=torch.float32)
        rows = ((pixels >= top[:, None]) & (pixels < (top + h)[:, None])).float() * on[:, None]
        cols = ((pixels >= left[:, None]) & (pixels < (left + w)[:, None])).float()
    return EpochDraws(aug, background, move, rows, cols)


def augment(x: torch.Tensor, aug: Augmentation, generator: torch.Generator,
            background: float) -> torch.Tensor:
    """x augmented with fresh draws from generator: draw() and apply() for one batch."""
    return draw(aug, len(x), generator, background, x.device).apply(x, 0)
