"""The conversion `predict` makes a picture with, step by step, on pictures made from the test set
in the shapes users have; the formats users have; and --explain."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli
from PIL import Image, features
from support.models import quick_model

from lenetlab.conversion import TOLERANCE, background, centre, fit, is_light, prepare, stretch, to_grey, trim
from lenetlab.prediction import load_image, predict, predict_files

NEAREST = getattr(Image, "Resampling", Image).NEAREST


@pytest.fixture(scope="module")
def test_images(dataset) -> np.ndarray:
    return dataset.test_images.numpy()


@pytest.fixture(scope="module")
def samples(dataset) -> list[int]:
    """The first three test images of each class."""
    labels = dataset.test_labels.numpy()
    return [int(i) for c in range(10) for i in np.flatnonzero(labels == c)[:3]]


@pytest.fixture(scope="module")
def weights(dataset, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prepare") / "quick.pth"
    torch.save(quick_model(dataset).state_dict(), path)
    return path


def enlarged(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Each pixel a factor x factor block: the garment's box is known to the pixel."""
    return np.asarray(Image.fromarray(pixels).resize((28 * factor, 28 * factor), NEAREST))


def on_canvas(garment: np.ndarray, size: tuple[int, int], at: tuple[int, int], fill) -> np.ndarray:
    """garment (grey or RGB) at (x, y) on a canvas (width, height) of colour fill."""
    canvas = np.empty((size[1], size[0]) + garment.shape[2:], np.uint8)
    canvas[...] = fill
    canvas[at[1]:at[1] + garment.shape[0], at[0]:at[0] + garment.shape[1]] = garment
    return canvas


def tinted(grey: np.ndarray, factors=(1.0, 0.9, 0.8)) -> np.ndarray:
    return np.clip(np.rint(grey[..., None] * np.array(factors)), 0, 255).astype(np.uint8)


def box(pixels: np.ndarray, above: float) -> tuple[slice, slice]:
    rows, cols = np.flatnonzero((pixels > above).any(axis=1)), np.flatnonzero((pixels > above).any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


# ----------------------------------------------------------------------------- each step


def test_background_is_the_colour_of_the_corners(test_images, samples):
    garment = 255 - enlarged(test_images[samples[0]], 3)  # a dark T-shirt on white, then tinted
    photo = tinted(on_canvas(garment, (120, 100), (20, 10), 255))
    assert background(photo).tolist() == [255.0, 230.0, 204.0]
    photo[-1, -1] = (0, 0, 0)  # a garment reaching a corner: the other three still show the canvas
    assert background(photo).tolist() == [255.0, 230.0, 204.0]
    assert background(test_images[samples[0]]) == 0  # grey: one value


def test_trim_cuts_the_margins_to_the_garment(test_images, samples):
    for index in samples:
        pixels = test_images[index]
        garment = enlarged(pixels, 3)
        photo = on_canvas(garment, (140, 100), (17, 9), 0)  # margins of 17, 9, 39 and 7 pixels
        expected = garment[box(garment, TOLERANCE)]
        assert np.array_equal(trim(photo, background(photo)), expected), index
        light = tinted(255 - photo)  # the same as a tinted photograph: a dark garment on a light canvas
        assert np.array_equal(trim(light, background(light)), tinted(255 - garment)[box(garment, TOLERANCE)])


def test_trim_tolerance_is_on_the_channel_that_differs_most():
    picture = np.full((40, 60, 3), 200, np.uint8)
    picture[10, 20] = (200, 200, 200 - TOLERANCE)  # within the tolerance: background
    assert trim(picture, background(picture)).shape == (40, 60, 3)  # one colour: kept whole
    picture[30, 45] = (200, 200 + TOLERANCE + 1, 200)
    picture[5, 12] = (200 - TOLERANCE - 1, 200, 200)
    assert trim(picture, background(picture)).shape == (26, 34, 3)  # rows 5-30, columns 12-45


def test_to_grey_is_pillows_luma(test_images, samples):
    photo = tinted(255 - enlarged(test_images[samples[10]], 2), (0.95, 0.85, 1.0))
    assert np.array_equal(to_grey(photo), np.asarray(Image.fromarray(photo).convert("L")))
    grey = test_images[samples[10]]
    assert to_grey(grey) is grey
    assert np.array_equal(to_grey(np.repeat(grey[..., None], 3, axis=2)), grey)


def test_no_genuine_test_image_is_inverted_and_each_keeps_its_pixels(test_images):
    decided = [is_light(background(pixels)) for pixels in test_images]
    assert not any(decided)
    # the ten the border's mean inverted (a dress, bags, sandals): their border is lighter than their centre
    inner = np.zeros((28, 28), bool)
    inner[1:27, 1:27] = True
    lighter = [i for i, p in enumerate(test_images) if p[~inner].mean() > p[7:21, 7:21].mean()]
    assert len(lighter) == 10
    for original in test_images:
        pixels, inverted = prepare(original)
        assert not inverted and np.array_equal(pixels, original)
    for index in lighter:
        pixels, inverted = prepare(255 - test_images[index])  # negated: a dark garment on white
        assert inverted and np.array_equal(pixels, test_images[index])


def test_every_negated_test_image_is_inverted(test_images):
    assert all(is_light(background(255 - pixels)) for pixels in test_images)


def test_stretch_makes_the_background_black_and_the_brightest_white():
    grey = np.array([[30, 31, 100], [255, 0, 142]], np.uint8)
    assert stretch(grey, 0) is grey  # black already black, white already white
    assert stretch(grey, 30).tolist() == [[0, 1, 79], [255, 0, 127]]  # (v - 30) * 255 / 225, rounded
    dim = np.array([[20, 200, 110, 21]], np.uint8)  # a tinted garment on a grey background
    assert stretch(dim, 20).tolist() == [[0, 255, 128, 1]]  # (v - 20) * 255 / 180
    assert stretch(np.full((3, 4), 50, np.uint8), 50).tolist() == [[0] * 4] * 3  # nothing but background


def test_fit_makes_the_longest_edge_28():
    for (height, width), expected in (((112, 60), (28, 15)), ((60, 112), (15, 28)), ((30, 60), (14, 28)),
                                      ((1000, 3), (28, 1)), ((58, 116), (14, 28)), ((20, 13), (28, 18))):
        assert fit(np.full((height, width), 90, np.uint8)).shape == expected
        assert set(fit(np.full((height, width), 90, np.uint8)).flatten()) == {90}
    narrow = np.arange(28 * 12, dtype=np.uint8).reshape(28, 12)
    assert fit(narrow) is narrow  # the longest edge is 28 already: not resampled


def centroid(pixels: np.ndarray) -> np.ndarray:
    rows, cols = np.mgrid[:pixels.shape[0], :pixels.shape[1]]
    weights = pixels.astype(np.float64)
    return np.array([(weights * rows).sum(), (weights * cols).sum()]) / weights.sum()


def test_fit_of_an_enlarged_test_image_gives_it_back_unshifted(test_images, samples):
    differences = []
    for index in samples:
        pixels = test_images[index]
        back = fit(enlarged(pixels, 4))
        assert back.shape == (28, 28)
        assert np.abs(centroid(back) - centroid(pixels)).max() < 0.05, index  # a shift of a pixel costs 8%
        differences.append(np.abs(back.astype(int) - pixels).mean())
    assert np.median(differences) < 5, differences  # Lanczos smooths a little


def test_centre_puts_the_odd_pixel_left_and_top():
    picture = np.full((28, 15), 200, np.uint8)
    out = centre(picture)
    columns = np.flatnonzero(out.max(axis=0))
    assert (columns[0], columns[-1]) == (7, 21)  # 7 columns of black on the left, 6 on the right
    out = centre(np.full((13, 28), 9, np.uint8))
    assert np.flatnonzero(out.max(axis=1)).tolist() == list(range(8, 21))
    assert out.sum() == 13 * 28 * 9


def test_a_28x28_picture_is_used_as_it_is(test_images, samples):
    pixels = test_images[samples[5]].copy()
    pixels[:3, :3] = 120  # something in a corner: a trim would cut it, a 28x28 picture is not trimmed
    out, inverted = prepare(pixels)
    assert not inverted and np.array_equal(out, pixels)
    out, inverted = prepare(tinted(255 - pixels, (1, 1, 1)))
    assert inverted and np.array_equal(out, pixels)


def test_a_photograph_becomes_close_to_the_test_image(test_images, samples):
    differences = []
    for index in samples:
        pixels = test_images[index]
        photo = tinted(on_canvas(255 - enlarged(pixels, 5), (200, 180), (30, 12), 255))
        out, inverted = prepare(photo)
        assert inverted and out.shape == (28, 28) and out[0, 0] == 0
        differences.append(np.abs(out.astype(int) - pixels).mean())
    assert np.median(differences) < 8, differences


def test_invert_no_leaves_a_light_background_light(test_images, samples):
    photo = on_canvas(255 - enlarged(test_images[samples[3]], 2), (70, 60), (7, 2), 255)
    out, inverted = prepare(photo, "no")
    assert not inverted and out[14, 14] > 0 and out[:, :3].max() == 0  # padding stays black
    with pytest.raises(ValueError, match="invert must be one of"):
        prepare(photo, "maybe")


def test_the_steps_in_order_are_prepare(test_images, samples):
    pixels = test_images[samples[20]]
    photo = tinted(on_canvas(255 - enlarged(pixels, 3), (120, 90), (11, 4), 250))
    colour = background(photo)
    grey = 255 - to_grey(trim(photo, colour))
    expected = centre(fit(stretch(grey, 255 - float(np.dot(colour, (0.299, 0.587, 0.114))))))
    assert np.array_equal(prepare(photo)[0], expected)


# ----------------------------------------------------------------------------- files people have


def png_16bit_rgb(path: Path, rgb16: np.ndarray) -> Path:
    """A 16-bit-per-channel RGB PNG (Pillow writes 16 bits for grey only)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    height, width = rgb16.shape[:2]
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in rgb16)
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def formats(test_images, samples, tmp_path_factory) -> tuple[Path, list[str], np.ndarray]:
    """One photograph-shaped picture (a dark garment on white, enlarged 3 times, with margins)
    written in each format: the folder, the file names, and the 8-bit grey picture each holds."""
    folder = tmp_path_factory.mktemp("formats")
    grey = on_canvas(255 - enlarged(test_images[samples[12]], 3), (110, 96), (9, 6), 255)
    deep = grey.astype(np.uint16) * 257
    Image.fromarray(grey).save(folder / "grey.png")
    Image.fromarray(deep).save(folder / "grey16.png")
    png_16bit_rgb(folder / "rgb16.png", np.repeat(deep[..., None], 3, axis=2))
    Image.fromarray(grey).convert("P").save(folder / "palette.png")
    Image.fromarray(grey).save(folder / "grey.tif")
    Image.fromarray(grey).convert("RGB").save(folder / "rgb-lzw.tif", compression="tiff_lzw")
    Image.fromarray(deep).save(folder / "grey16.tif")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, grey.shape, dtype=np.uint8))
    Image.fromarray(grey).save(folder / "animated.gif", save_all=True, append_images=[noise], duration=100)
    # a black garment whose opacity is the pixel value: laid on white, the same dark garment on white
    clear = np.zeros(grey.shape + (4,), np.uint8)
    clear[..., 3] = 255 - grey
    Image.fromarray(clear, "RGBA").save(folder / "alpha.png")
    if features.check("webp"):
        Image.fromarray(clear, "RGBA").save(folder / "alpha.webp", lossless=True)
    Image.fromarray(grey).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    Image.fromarray(grey).convert("RGB").save(folder / "rgb.jpg", quality=95)
    return folder, sorted(p.name for p in folder.iterdir()), grey


def test_every_format_becomes_the_same_grey_picture(formats):
    folder, names, grey = formats
    modes = {name: Image.open(folder / name).mode for name in names}  # each file is what its name says
    assert (modes["cmyk.jpg"], modes["palette.png"], modes["grey16.png"], modes["rgb16.png"]) == \
        ("CMYK", "P", "I;16", "RGB")
    assert Image.open(folder / "animated.gif").n_frames == 2 and modes["alpha.png"] == "RGBA"
    reference = prepare(grey)[0]
    for name in names:
        image = load_image(folder / name)
        assert image.size == (110, 96) and image.inverted, name
        if name.endswith(".jpg"):  # lossy: close to it, not equal
            assert np.abs(image.pixels.astype(int) - reference).mean() < 3, name
        else:
            assert np.array_equal(image.pixels, reference), name


def test_every_format_is_predicted_with_one_line(formats, weights):
    folder, names, _ = formats
    result = run_cli("predict", weights, folder, "--top-k", "1")
    assert result.returncode == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [str(folder / name) for name in names]
    assert len({line.split(": ")[1].split()[0] for line in lines}) == 1  # every format, the same class
    assert all(line.endswith("(inverted)") for line in lines)


def bad_copy(kind: str, source: Path, folder: Path) -> Path:
    data = source.read_bytes()
    path = folder / f"{kind}-{source.name}"
    if kind == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif kind == "corrupt":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(64) + data[middle + 64:])
    return path


@pytest.mark.parametrize("name", ["rgb.jpg", "cmyk.jpg", "grey.tif", "rgb-lzw.tif", "palette.png",
                                  "animated.gif", "alpha.webp"])
def test_a_damaged_file_of_each_format_is_predicted_or_refused_in_one_line(formats, weights, tmp_path, capfd,
                                                                            name):
    folder, names, _ = formats
    if name not in names:
        pytest.skip("this Pillow has no WebP")
    good = folder / "grey.png"
    for kind in ("truncated", "corrupt"):
        bad = bad_copy(kind, folder / name, tmp_path)
        try:
            load_image(bad)
        except Exception as exc:  # refused: one line through the command, and nothing for the good file
            assert type(exc).__name__ == "ImageError", exc
            result = run_cli("predict", weights, good, bad)
            assert_one_line_error(result, str(bad))
            assert result.stdout == ""
        else:  # Pillow decoded what was there (JPEG and GIF are forgiving): predicted, one line
            result = run_cli("predict", weights, bad)
            assert result.returncode == 0 and len(result.stdout.splitlines()) == 1, result.stderr
        # nor anything from a C library: libtiff writes "LZWDecode: Not enough data ..." itself
        assert capfd.readouterr().err == "", (kind, name)


def test_a_bomb_in_a_tiff_header_is_refused(tmp_path, weights):
    path = tmp_path / "bomb.tif"
    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    # ImageWidth and ImageLength (tags 256, 257) claim 30,000 x 30,000 pixels
    for tag in (256, 257):
        at = data.find(struct.pack("<HH", tag, 3))
        if at < 0:
            at = data.find(struct.pack("<HH", tag, 4))
            data[at + 2:at + 12] = struct.pack("<HII", 4, 1, 30_000)
        else:
            data[at + 8:at + 10] = struct.pack("<H", 30_000)
    path.write_bytes(bytes(data))
    assert_one_line_error(run_cli("predict", weights, path), str(path), "decompression bomb")


# ----------------------------------------------------------------------------- --explain


def test_explain_writes_what_the_network_saw(formats, weights, tmp_path):
    folder, _, _ = formats
    seen = tmp_path / "seen"
    result = run_cli("predict", weights, folder / "grey.png", folder / "rgb.jpg", "--json", "--explain", seen)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["explained"] for r in rows] == [str(seen / "grey.png.png"), str(seen / "rgb.jpg.png")]
    assert sorted(p.name for p in seen.iterdir()) == ["grey.png.png", "rgb.jpg.png"]
    for row, name in zip(rows, ("grey.png", "rgb.jpg")):
        written = np.asarray(Image.open(row["explained"]))
        assert np.array_equal(written, load_image(folder / name).pixels)
    # the image written, given back to predict, is used as it is: the same answer to the digit
    again = run_cli("predict", weights, *(r["explained"] for r in rows), "--json")
    assert [json.loads(line)["probabilities"] for line in again.stdout.splitlines()] == \
        [r["probabilities"] for r in rows]


def test_explain_names_a_repeated_file_name_apart(formats, weights, tmp_path):
    folder, _, _ = formats
    other = tmp_path / "other"
    other.mkdir()
    (other / "grey.png").write_bytes((folder / "grey.png").read_bytes())
    seen = tmp_path / "seen"
    result = run_cli("predict", weights, folder / "grey.png", other / "grey.png", "--explain", seen)
    assert result.returncode == 0
    assert sorted(p.name for p in seen.iterdir()) == ["grey.png-2.png", "grey.png.png"]


def test_explain_refuses_a_file_in_the_way_and_an_input(formats, weights, tmp_path):
    folder, _, _ = formats
    in_the_way = tmp_path / "seen"
    in_the_way.write_text("a file\n")
    assert_one_line_error(run_cli("predict", weights, folder / "grey.png", "--explain", in_the_way),
                          str(in_the_way), "a file is in the way")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("a.png", "a.png.png"):
        (inputs / name).write_bytes((folder / "grey.png").read_bytes())
    result = run_cli("predict", weights, inputs, "--explain", inputs)
    assert_one_line_error(result, str(inputs / "a.png.png"), "an input, not overwritten")
    assert sorted(p.name for p in inputs.iterdir()) == ["a.png", "a.png.png"] and result.stdout == ""


def test_the_python_api_returns_the_image_too(formats, weights):
    from lenetlab.model import load_weights

    folder, _, _ = formats
    model = load_weights(weights)
    predictions, skipped = predict_files(model, [folder / "grey.png"])
    assert not skipped and np.array_equal(predictions[0].pixels, load_image(folder / "grey.png").pixels)
    assert predictions[0].pixels.shape == (28, 28) and predictions[0].pixels.dtype == np.uint8
    assert np.array_equal(predict(model, [load_image(folder / "rgb.jpg")])[0].pixels,
                          load_image(folder / "rgb.jpg").pixels)

