"""Turn a picture into a Fashion-MNIST image the way the data set's own images were made.

Xiao, Rasul and Vollgraf (2017, section 2) made each image from a product photo: trim the
edges close to the corner pixels' colour, resize the longest edge to 28, sharpen, extend the
shorter edge to 28 with the photo centred, negate, 8-bit grey. prepare() follows it, one
function a step, on uint8 pixels, (height, width) grey or (height, width, 3) RGB:

    background  the colour the corners show (their median, so a garment in one corner does not count)
    trim        the edges within TOLERANCE of that colour cut off
    to_grey     ITU-R 601 luma, as Pillow's convert("L")
    invert      light on dark: negated when the background is light (decided on the corners)
    stretch     the background's level made black, the brightest pixel white
    fit         the longest edge resized to 28 (RESAMPLING)
    centre      on a black 28x28 canvas, the odd pixel left and top as in the data set

The choices below were measured with benchmarks/predict_agreement.py (2,000 test images per
shape; docs/prediction.md has the table). No sharpening step: an unsharp mask of radius 1 after the
resize lowered agreement on every shape, by 0.1-0.5 points at 50% and 1.1-1.6 at 100%.
A picture that is already 28x28 is used as it is (inverted if its background is light): the
data set's own images keep their exact pixels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIZE = 28
INVERT_CHOICES = ("auto", "yes", "no")
_RESAMPLING = getattr(Image, "Resampling", Image)  # Pillow 9.1 moved the filters
# Subsampling (NEAREST, the paper's) agreed as often, within half a point on every shape; Lanczos
# is kept for what the benchmark cannot show: it averages the pixels subsampling skips (noise, weave).
RESAMPLING = _RESAMPLING.LANCZOS
# Of 255, on the channel that differs most from the background. 25 and 40 agreed best (96.2% over
# the shapes; 13, the paper's 5%, and 55: 95.9%), and at 40 the images came closer to the originals.
TOLERANCE = 40


def background(pixels: np.ndarray) -> np.ndarray:
    """The background's colour as the four corners show it: their median, per channel."""
    corners = np.stack([pixels[0, 0], pixels[0, -1], pixels[-1, 0], pixels[-1, -1]])
    return np.median(corners.astype(np.float64), axis=0)


def luma(colour: np.ndarray) -> float:
    """The grey level of a colour (a scalar for grey pictures), with the weights to_grey uses."""
    colour = np.atleast_1d(colour)
    return float(colour[0]) if colour.size == 1 else float(np.dot(colour, (0.299, 0.587, 0.114)))


def is_light(colour: np.ndarray) -> bool:
    """Whether a background colour is light: a dark garment photographed on white, say."""
    return luma(colour) > 127.5


def trim(pixels: np.ndarray, colour: np.ndarray, tolerance: float = TOLERANCE) -> np.ndarray:
    """The smallest box holding every pixel that differs from colour by more than tolerance on
    some channel; the whole picture when none does (one colour: nothing to tell apart)."""
    reference = np.clip(np.rint(colour), 0, 255).astype(np.uint8)
    # uint8 both ways round rather than a signed copy: a photograph is large
    differs = (np.maximum(pixels, reference) - np.minimum(pixels, reference)) > tolerance
    if differs.ndim == 3:
        differs = differs.any(axis=2)
    rows, cols = np.flatnonzero(differs.any(axis=1)), np.flatnonzero(differs.any(axis=0))
    if rows.size == 0:
        return pixels
    return pixels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def to_grey(pixels: np.ndarray) -> np.ndarray:
    """(height, width) uint8 luma; grey pixels as they are."""
    if pixels.ndim == 2:
        return pixels
    return np.asarray(Image.fromarray(pixels, "RGB").convert("L"), dtype=np.uint8)


def stretch(grey: np.ndarray, level: float) -> np.ndarray:
    """level (the background's grey) made black and the brightest pixel white, as in the data
    set, whose 70,000 images all reach 254 or 255: a tinted or grey background would otherwise
    stay a grey frame round the garment, and a tint would dim it."""
    top = float(grey.max())
    if top <= level:  # nothing but background
        return np.zeros_like(grey)
    if level <= 0 and top >= 255:
        return grey
    stretched = (grey.astype(np.float64) - level) * (255.0 / (top - level))
    return np.clip(np.rint(stretched), 0, 255).astype(np.uint8)


def fit(grey: np.ndarray) -> np.ndarray:
    """The longest edge resized to SIZE, the other in proportion (half a pixel rounds up)."""
    height, width = grey.shape
    scale = SIZE / max(height, width)
    new = (min(SIZE, max(1, int(width * scale + 0.5))), min(SIZE, max(1, int(height * scale + 0.5))))
    if new == (width, height):
        return grey
    return np.asarray(Image.fromarray(grey).resize(new, RESAMPLING), dtype=np.uint8)


def centre(grey: np.ndarray) -> np.ndarray:
    """On a black SIZE x SIZE canvas, centred; an odd pixel of margin goes left and top, as the
    data set's images have it."""
    height, width = grey.shape
    out = np.zeros((SIZE, SIZE), dtype=np.uint8)
    top, left = (SIZE - height + 1) // 2, (SIZE - width + 1) // 2
    out[top:top + height, left:left + width] = grey
    return out


def prepare(pixels: np.ndarray, invert: str = "auto") -> tuple[np.ndarray, bool]:
    """A picture of any size -> 28x28 uint8 like Fashion-MNIST, and whether it was inverted."""
    if invert not in INVERT_CHOICES:
        raise ValueError(f"invert must be one of {INVERT_CHOICES}, not {invert!r}")
    colour = background(pixels)
    inverted = invert == "yes" or (invert == "auto" and is_light(colour))
    if pixels.shape[:2] == (SIZE, SIZE):
        grey = to_grey(pixels)
        return (255 - grey if inverted else grey), inverted
    grey = to_grey(trim(pixels, colour, TOLERANCE))  # read now: the benchmark can replace it
    level = luma(colour)
    if inverted:
        grey, level = 255 - grey, 255 - level
    if level < 127.5:  # a light background kept (--invert no) is left alone, not made black
        grey = stretch(grey, level)
    return centre(fit(grey)), inverted
