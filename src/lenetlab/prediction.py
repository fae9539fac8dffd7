"""Classify pictures with trained weights: find, load and check image files, predict, show what was seen.

Every input is loaded and checked before any is predicted: one bad file stops the call with
an ImageError naming it, and nothing is printed for the others. A picture is read as its
first frame (GIF, WebP), turned as its EXIF orientation says, transparent pixels laid on
white, 16-bit and float scaled to 8 bits; conversion.prepare then makes it a Fashion-MNIST
image the way the data set's own were made, and it is normalised exactly as training and
`evaluate` do.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from . import files
from .conversion import prepare
from .data import CLASS_NAMES, normalise
from .errors import ImageError
from .markup import plain
from .model import LeNet5V1, fast_forward

MAX_SIDE = 100_000  # a side of this many pixels or more is refused as a decompression bomb
MAX_PIXELS = 50_000_000  # a 50-megapixel camera's pictures; more is refused as a decompression bomb
# Pictures are shrunk by a whole factor to at most this many pixels a side before the conversion
# (which makes 28x28 of them): a 50-megapixel photo then costs tens of MB of memory, not GBs.
WORK_SIDE = 2048


@dataclass
class Inputs:
    """The image files of a call, in order, and the files skipped in its folders."""

    files: list[Path]
    skipped: list[Path]


@dataclass
class PreparedImage:
    """One picture as the network sees it: 28x28 uint8, light garment on black."""

    path: Path | str  # the file, or the label of a picture given in memory
    pixels: np.ndarray
    inverted: bool
    size: tuple[int, int]  # (width, height) of the file's picture


@dataclass
class Prediction:
    """The ten class probabilities of one image, in CLASS_NAMES order, and the 28x28 uint8
    image they were computed from (light garment on black)."""

    path: Path | str  # the file, or the label of a picture given in memory
    probabilities: list[float]
    inverted: bool
    pixels: np.ndarray

    @property
    def blank(self) -> bool:
        """The image the network saw is one colour (a blank or uniform picture): its
        probabilities are the network's answer to no garment at all."""
        return bool(self.pixels.min() == self.pixels.max())

    def top(self, k: int) -> list[tuple[str, float]]:
        order = sorted(range(len(CLASS_NAMES)), key=lambda i: -self.probabilities[i])
        return [(CLASS_NAMES[i], self.probabilities[i]) for i in order[:k]]


def collect(paths: list[str | Path]) -> Inputs:
    """The files to classify: each path given, or every file of a folder (sorted, not recursive).

    A missing path is an ImageError. In a folder, files that Pillow does not recognise as
    an image (empty files included) are skipped and returned in Inputs.skipped; a file given
    by name is checked later, by load_image, and is an error when it is not an image.
    """
    files: list[Path] = []
    skipped: list[Path] = []
    for given in map(Path, paths):
        if given.is_dir():
            found = 0
            for entry in sorted(p for p in given.iterdir() if p.is_file()):
                if _is_image(entry):
                    files.append(entry)
                    found += 1
                else:
                    skipped.append(entry)
            if not found:
                raise ImageError(f"{given}: a folder with no image files")
        elif given.is_file():
            files.append(given)
        elif given.exists():
            raise ImageError(f"{given}: not a regular file or folder")
        else:
            raise ImageError(f"{given}: no such file or folder")
    return Inputs(files, skipped)


def _is_image(path: Path) -> bool:
    """Whether Pillow recognises the file's format (its header only; a damaged image still counts)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a bomb, damaged metadata: load_image decides, with one line
        try:
            with Image.open(path):
                return True
        except UnidentifiedImageError:
            return False
        except Exception:  # recognised, but refused (a bomb, a damaged header): load_image names it
            return True


def load_image(path: Path, invert: str = "auto") -> PreparedImage:
    """Open, check and preprocess one image file; ImageError naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: an empty file (0 bytes), not an image")
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    said: list[str] = []
    failure: Exception | None = None
    with handle, warnings.catch_warnings(), _decoder_messages(said):
        warnings.simplefilter("ignore")  # Pillow's notes on damaged metadata (EXIF): not a second line
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(handle) as im:
                size = im.size
                _check_size(path, size)
                im.seek(0)  # the first frame of a GIF or an animated WebP
                if im.format == "JPEG":  # decoded at a reduced scale, where the format can
                    im.draft(None, (WORK_SIDE, WORK_SIDE))
                im.load()
                picture = _to_pixels(_upright(_shrunk(im)), sixteen_bit=im.mode.startswith("I;16"))
        except ImageError:
            raise
        except UnidentifiedImageError:
            raise ImageError(f"{path}: not an image file (PNG, JPEG, BMP, GIF, WebP, ... expected)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(f"{path}: refused as a possible decompression bomb ({exc})") from None
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError ... for damaged files
            failure = exc
    if failure is not None:  # out here, said holds what the decoder wrote
        own = str(failure).strip().splitlines()
        text = said[0] if said else own[0] if own else type(failure).__name__
        raise ImageError(f"{path}: a truncated or corrupt image ({text[:100]})")
    pixels, inverted = prepare(picture, invert)
    return PreparedImage(path, pixels, inverted, size)


def prepare_picture(im: Image.Image, label: str, invert: str = "auto") -> PreparedImage:
    """A picture already in memory (the Python API's PIL images and arrays), prepared as a file's
    is; label names it in errors and predictions."""
    _check_size(label, im.size)
    picture = _to_pixels(_upright(_shrunk(im)), sixteen_bit=im.mode.startswith("I;16"))
    pixels, inverted = prepare(picture, invert)
    return PreparedImage(label, pixels, inverted, im.size)


@contextlib.contextmanager
def _decoder_messages(said: list[str]):
    """While a picture is decoded, what C libraries write to the process's stderr (libtiff's
    "LZWDecode: Not enough data ...") goes into said, line by line, instead of becoming a second
    line beside lenetlab's own."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no stderr to guard
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines = sink.read().decode(errors="replace").splitlines()
            said += [line.strip() for line in lines if line.strip()]


def _check_size(path: Path | str, size: tuple[int, int]) -> None:
    width, height = size
    if min(width, height) < 1 or max(width, height) >= MAX_SIDE:
        raise ImageError(f"{path}: {width}x{height} pixels, refused (a side must be 1 to "
                         f"{MAX_SIDE - 1:,} pixels; larger ones are decompression bombs)")
    if width * height > MAX_PIXELS:
        raise ImageError(f"{path}: {width}x{height} pixels, refused as a possible decompression bomb "
                         f"(more than {MAX_PIXELS:,} pixels)")


def _shrunk(im: Image.Image) -> Image.Image:
    """im reduced by a whole factor (the mean of each block) to at most WORK_SIDE pixels a side."""
    factor = -(-max(im.size) // WORK_SIDE)
    if factor <= 1:
        return im
    if im.mode == "1":  # modes reduce() does not take, as modes it does, the same colours
        im = im.convert("L")
    elif im.mode in ("P", "PA"):
        im = im.convert("RGBA")
    elif im.mode.startswith("I;16"):
        im = im.convert("I")
    return im.reduce(factor)


def _upright(im: Image.Image) -> Image.Image:
    """The picture turned as its EXIF orientation says; as stored when that tag cannot be read."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # a damaged EXIF block says nothing about the pixels
        return im


def _to_pixels(im: Image.Image, sixteen_bit: bool = False) -> np.ndarray:
    """uint8 pixels, (height, width) for a grey picture and (height, width, 3) RGB for any other
    (palette, CMYK, ...): the trim compares colours. Transparent pixels are laid on white;
    16-bit (sixteen_bit: also once shrunk into mode I) and float grey are scaled to 8 bits."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(im, dtype=np.float64)
        if sixteen_bit or im.mode.startswith("I;16") or (im.mode == "I" and values.max(initial=0) > 255):
            values = values / 257.0
        elif im.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0
        return np.clip(np.rint(values), 0, 255).astype(np.uint8)
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    if im.mode in ("1", "L"):
        return np.asarray(im.convert("L"), dtype=np.uint8)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


@torch.inference_mode()
def predict(model: LeNet5V1, images: list[PreparedImage], batch_size: int = 500) -> list[Prediction]:
    """Class probabilities of prepared images, computed as `evaluate` computes its logits."""
    model.eval()
    predictions: list[Prediction] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        x = normalise(torch.from_numpy(np.stack([image.pixels for image in chunk])))
        probabilities = torch.softmax(fast_forward(model, x).double(), dim=1)
        predictions += [Prediction(image.path, [float(p) for p in row], image.inverted, image.pixels)
                        for image, row in zip(chunk, probabilities.tolist())]
    return predictions


def predict_files(model: LeNet5V1, paths: list[str | Path], invert: str = "auto") -> tuple[list[Prediction],
                                                                                            list[Path]]:
    """Collect, load and check every input first, then predict: (predictions, skipped files)."""
    inputs = collect(paths)
    images = [load_image(path, invert) for path in inputs.files]
    return predict(model, images), inputs.skipped


def explained_names(paths: list[Path]) -> list[str]:
    """The file name, in the --explain folder, of each input's 28x28 image: its own name with
    .png added (shirt.jpg -> shirt.jpg.png, so it never replaces a PNG it came from); a name
    met again (the same file name in two folders) gets -2, -3, ... before the .png."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        count = seen[path.name] = seen.get(path.name, 0) + 1
        names.append(f"{path.name}.png" if count == 1 else f"{path.name}-{count}.png")
    return names


def write_explained(predictions: list[Prediction], folder: Path) -> list[Path]:
    """Write the 28x28 image the network saw for each prediction into folder, as PNG."""
    targets = [Path(folder) / name for name in explained_names([p.path for p in predictions])]
    inputs = {prediction.path.resolve() for prediction in predictions}
    for target in targets:  # all checked before any is written
        if target.resolve() in inputs:
            raise ImageError(f"{target}: an input, not overwritten (give --explain another folder)")
    for prediction, target in zip(predictions, targets):
        buffer = io.BytesIO()
        Image.fromarray(prediction.pixels).save(buffer, "PNG")
        files.atomic_write(target, buffer.getvalue())
    return targets


def as_json(prediction: Prediction, explained: Path | None = None) -> dict:
    """One JSON-ready object: the file, the most likely class and all ten probabilities (and
    the image the network saw, with --explain)."""
    (best, probability), = prediction.top(1)
    row = {"file": str(prediction.path), "class": best, "probability": round(probability, 6),
           "inverted": prediction.inverted, "blank": prediction.blank,
           "probabilities": {name: round(p, 6) for name, p in zip(CLASS_NAMES, prediction.probabilities)}}
    if explained is not None:
        row["explained"] = str(explained)
    return row


def as_line(prediction: Prediction, k: int) -> str:
    """One line: the file, then the top k classes with their probabilities, and notes."""
    top = "  ".join(f"{name} {p:.4f}" for name, p in prediction.top(k))
    line = f"{plain(prediction.path)}: {top}"  # a file name is shown, never sent to the terminal as is
    if prediction.inverted:
        line += "  (inverted)"
    if prediction.blank:
        line += "  (blank: one colour, no garment to classify)"
    return line


def skipped_note(skipped: list[Path]) -> str:
    """One line on the files of folders that were not images."""
    names = ", ".join(str(path) for path in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
    return f"lenetlab: skipped {len(skipped)} file(s) that are not images: {names}"
