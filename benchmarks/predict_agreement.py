"""How often `predict` on a picture made from a test image agrees with the network on the image itself.

For each shape below, test images (a seeded sample) are made into pictures shaped as people
take them and written as files; predict's own reading and conversion (prediction.load_image)
turn each back into a 28x28 image, and the network's class for it is compared with its class
for the original test image. The issue's target: at least 95% for every shape. Every picture
but the first is enlarged 4 times unless its shape says otherwise, each with a filter drawn
from Pillow's nearest, bilinear, bicubic and Lanczos (sharp and soft edges both), and each
shape alone is drawn on the data set's black background unless it says otherwise:

  28x28 PNG          the test image itself
  dark background    the light garment on black, as in the data set
  light background   negated: a dark garment on white, as in product photos
  margins 5-30%      a margin on each side, each drawn from 5-30% of the canvas
  non-square canvas  the canvas 1.25-2 times as long as the garment's square, the garment anywhere along it
  scale 2-10         enlarged 2 to 10 times instead of 4
  colour tint        RGB, each channel scaled by a factor drawn from 0.75-1
  JPEG 75-95         saved as an RGB JPEG of quality 75 to 95
  photograph         all at once: negated, enlarged 2-10 times, margins 5-30% (so rarely square),
                     tinted, JPEG 75-95

    python benchmarks/predict_agreement.py --images 10000   # trains the baseline first (about a minute)
    python benchmarks/predict_agreement.py --weights W.pth --images 2000
    python benchmarks/predict_agreement.py --weights W.pth --resampling nearest --tolerance 25 --sharpen 50

Without --weights, `lenetlab train baseline` (12 epochs, seed 0) trains the network first.
Per shape it prints the share that agrees, how many pictures were inverted (none of a dark
background, all of a light one), and the mean |difference| in grey levels between the image
the network saw and the original. --resampling, --tolerance and --sharpen replace
conversion's choices for one run: they are how those choices were measured.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from lenetlab import prediction
from lenetlab.data import load_fashion_mnist, normalise
from lenetlab.model import fast_forward, load_weights

TARGET = 0.95  # the bound on every shape
BASE_SCALE = 4
FILTERS = getattr(Image, "Resampling", Image)  # Pillow 9.1 moved them
ENLARGERS = (FILTERS.NEAREST, FILTERS.BILINEAR, FILTERS.BICUBIC, FILTERS.LANCZOS)
SHAPES = ("28x28 PNG", "dark background", "light background", "margins 5-30%", "non-square canvas",
          "scale 2-10", "colour tint", "JPEG 75-95", "photograph")


def enlarge(pixels: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    side = max(29, round(28 * scale))
    return np.asarray(Image.fromarray(pixels).resize((side, side), ENLARGERS[rng.integers(len(ENLARGERS))]))


def place(garment: np.ndarray, fill: int, margins) -> np.ndarray:
    """garment on a canvas of grey fill; margins (left, top, right, bottom) as shares of the canvas."""
    height, width = garment.shape[:2]
    left, top, right, bottom = margins
    canvas_w, canvas_h = round(width / (1 - left - right)), round(height / (1 - top - bottom))
    x, y = round(canvas_w * left), round(canvas_h * top)
    canvas = np.full((canvas_h, canvas_w) + garment.shape[2:], fill, np.uint8)
    canvas[y:y + height, x:x + width] = garment
    return canvas


def make_picture(shape: str, pixels: np.ndarray, rng: np.random.Generator, stem: Path) -> Path:
    """Write one picture of the shape made from a 28x28 test image; its path."""
    if shape == "28x28 PNG":
        Image.fromarray(pixels).save(stem.with_suffix(".png"))
        return stem.with_suffix(".png")
    scale = rng.uniform(2, 10) if shape in ("scale 2-10", "photograph") else BASE_SCALE
    picture = enlarge(pixels, scale, rng)
    fill = 0
    if shape in ("light background", "photograph"):
        picture, fill = 255 - picture, 255
    if shape in ("margins 5-30%", "photograph"):
        picture = place(picture, fill, rng.uniform(0.05, 0.30, 4))
    if shape == "non-square canvas":
        extra, before = rng.uniform(0.25, 1.0), rng.uniform()  # canvas 1.25-2 times the square
        a, b = extra * before / (1 + extra), extra * (1 - before) / (1 + extra)
        picture = place(picture, fill, (a, 0, b, 0) if rng.integers(2) else (0, a, 0, b))
    if shape in ("colour tint", "photograph"):
        picture = np.clip(np.rint(picture[..., None] * rng.uniform(0.75, 1.0, 3)), 0, 255).astype(np.uint8)
    if shape in ("JPEG 75-95", "photograph"):
        path = stem.with_suffix(".jpg")
        Image.fromarray(picture).convert("RGB").save(path, quality=int(rng.integers(75, 96)))
        return path
    Image.fromarray(picture).save(stem.with_suffix(".png"))
    return stem.with_suffix(".png")


def override(resampling: str | None, tolerance: float | None, sharpen: int) -> str:
    """Replace conversion's resampling, tolerance or sharpening for this run; what was used."""
    from lenetlab import conversion

    if resampling:
        conversion.RESAMPLING = getattr(FILTERS, resampling.upper())
    if tolerance is not None:
        conversion.TOLERANCE = tolerance
    if sharpen:
        fit = conversion.fit

        def sharpened(grey):  # Pillow's unsharp mask, radius 1 as in the paper's Gaussian operator
            small = Image.fromarray(fit(grey)).filter(ImageFilter.UnsharpMask(1, sharpen, 0))
            return np.asarray(small, dtype=np.uint8)
        conversion.fit = sharpened
    names = {v: k.lower() for k, v in vars(FILTERS).items() if k.isupper()}
    sharpening = f"unsharp mask radius 1, {sharpen}%" if sharpen else "none"
    return (f"resampling {names.get(conversion.RESAMPLING, conversion.RESAMPLING)}, tolerance "
            f"{conversion.TOLERANCE:g}, sharpening {sharpening}")


def train_baseline(data_dir: Path, folder: Path) -> Path:
    command = [sys.executable, "-m", "lenetlab", "train", "baseline", "--out", str(folder),
               "--data-dir", str(data_dir), "--quiet"]
    print("training:", " ".join(["lenetlab", *command[3:]]), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr)
    print(done.stdout.strip().splitlines()[-1], flush=True)
    return folder / "lenet5_baseline_fashionmnist.pth"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, help="a .pth to use (default: train the baseline)")
    parser.add_argument("--images", type=int, default=1000, help="test images per shape, 1 to 10,000 "
                        "(default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="draws the images and every picture's shape")
    parser.add_argument("--shapes", help="a comma-separated subset of the shapes (default: all)")
    parser.add_argument("--keep", type=Path, help="write the pictures here instead of a temporary folder")
    parser.add_argument("--resampling", choices=("nearest", "box", "bilinear", "bicubic", "lanczos"))
    parser.add_argument("--tolerance", type=float, help="the trim's tolerance, of 255")
    parser.add_argument("--sharpen", type=int, default=0, help="unsharp-mask percent after the resize")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get(
        "LENETLAB_DATA", Path(__file__).resolve().parents[2] / "shared/data/fashion-mnist")),
        help="folder with the Fashion-MNIST IDX files (default: $LENETLAB_DATA)")
    args = parser.parse_args()
    shapes = SHAPES if not args.shapes else tuple(s.strip() for s in args.shapes.split(","))
    unknown = set(shapes) - set(SHAPES)
    if unknown:
        parser.error(f"unknown shapes {sorted(unknown)}; known: {', '.join(SHAPES)}")
    if not 1 <= args.images <= 10_000:
        parser.error("--images: 1 to 10,000 (the test set)")
    torch.set_num_threads(1)
    data = load_fashion_mnist(args.data_dir, download=False, quiet=True)
    with tempfile.TemporaryDirectory() as scratch:
        weights = args.weights or train_baseline(args.data_dir, Path(scratch) / "models")
        model = load_weights(weights)
        chosen = override(args.resampling, args.tolerance, args.sharpen) if (
            args.resampling or args.tolerance is not None or args.sharpen) else None
        test = data.test_images.numpy()
        indices = np.random.default_rng(args.seed).choice(len(test), args.images, replace=False)
        with torch.inference_mode():
            reference = fast_forward(model.eval(), normalise(data.test_images[indices])).argmax(1).numpy()
        root = args.keep or Path(scratch) / "pictures"
        print(f"{args.images} test images (seed {args.seed}), {weights}"
              + (f"; {chosen}" if chosen else ""))
        print(f"{'shape':20} {'agree':>7} {'inverted':>9} {'mean |pixel diff|':>18} {'seconds':>8}")
        below = []
        for shape in shapes:
            start = time.perf_counter()
            folder = root / shape.replace(" ", "-").replace("%", "")
            folder.mkdir(parents=True, exist_ok=True)
            draws = [np.random.default_rng([args.seed, SHAPES.index(shape), int(i)]) for i in indices]
            paths = [make_picture(shape, test[i], rng, folder / f"{i:05d}") for i, rng in zip(indices, draws)]
            images = [prediction.load_image(path) for path in paths]
            classes = np.array([int(np.argmax(p.probabilities)) for p in prediction.predict(model, images)])
            agree = float(np.mean(classes == reference))
            inverted = sum(image.inverted for image in images)
            difference = np.mean([np.abs(im.pixels.astype(int) - test[i]).mean()
                                  for im, i in zip(images, indices)])
            seconds = time.perf_counter() - start
            print(f"{shape:20} {agree:7.1%} {inverted:9d} {difference:18.2f} {seconds:8.1f}", flush=True)
            if agree < TARGET:
                below.append(shape)
    print(f"target {TARGET:.0%} for every shape: " + (f"below on {', '.join(below)}" if below else "met"))
    return 1 if below else 0


if __name__ == "__main__":
    sys.exit(main())
