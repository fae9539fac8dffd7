"""`lenetlab predict` on real Fashion-MNIST test images written as files, and on bad files."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features
from support import rounding  # float64 references and float32 rounding bounds
from support.models import quick_model

from lenetlab import cli
from lenetlab.data import CLASS_NAMES, normalise
from lenetlab.model import LeNet5V1, fast_forward
from lenetlab.prediction import load_image, prepare

PER_CLASS = 3


@pytest.fixture(scope="module")
def setup(dataset, tmp_path_factory):
    """Weights, the chosen test images as files in four folders, and evaluate's predictions for them."""
    root = tmp_path_factory.mktemp("predict")
    model = quick_model(dataset)
    weights = root / "baseline.pth"
    torch.save(model.state_dict(), weights)
    labels = dataset.test_labels
    chosen = [int(i) for c in range(10) for i in torch.nonzero(labels == c).flatten()[:PER_CLASS]]
    folders = {kind: root / kind for kind in ("png", "jpeg", "light")}
    for folder in folders.values():
        folder.mkdir()
    for index in chosen:
        pixels = dataset.test_images[index].numpy()
        Image.fromarray(pixels).save(folders["png"] / f"{index:05d}.png")
        Image.fromarray(pixels).save(folders["jpeg"] / f"{index:05d}.jpg", quality=90)
        # a blue garment on white, three times as large: how a product photo looks
        dark = Image.fromarray(255 - pixels).resize((84, 84), Image.BICUBIC)
        v = np.asarray(dark, dtype=np.float64)
        colour = np.stack([v, v, 255 - (255 - v) * 0.6], axis=-1)
        Image.fromarray(np.rint(colour).astype(np.uint8), "RGB").save(folders["light"] / f"{index:05d}.png")
    with torch.inference_mode():
        logits = fast_forward(model, normalise(dataset.test_images[chosen]))
    reference = {index: row for index, row in zip(chosen, torch.softmax(logits.double(), 1).tolist())}
    return weights, folders, reference


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["predict", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def json_lines(out: str) -> list[dict]:
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    return [json.loads(line, parse_constant=refuse) for line in out.splitlines()]


def test_png_predictions_are_evaluates_exactly(setup, capsys, dataset):
    """PNGs hold the test images' pixels exactly: predict gives evaluate's classes, and its
    probabilities are within float32 rounding of the float64 forward's (tests/support/rounding.py: the
    logits' bound e moves a softmax output p by at most p (exp(2 max e) - 1)), printed to 6 decimals."""
    weights, folders, reference = setup
    code, out, err = run(capsys, weights, folders["png"], "--json")
    assert code == 0 and err == ""
    rows = json_lines(out)
    assert [Path(r["file"]).name for r in rows] == sorted(f"{i:05d}.png" for i in reference)
    model = LeNet5V1()
    model.load_state_dict(torch.load(weights, weights_only=True))
    indices = [int(Path(row["file"]).stem) for row in rows]
    logits, bound = rounding.forward(model.eval(), normalise(dataset.test_images[indices]))
    exact = torch.softmax(logits, 1)
    within = exact * torch.expm1(2 * bound.max(1, keepdim=True).values) + 5e-7
    for row, index, p, e in zip(rows, indices, exact, within):
        expected = reference[index]
        assert list(row["probabilities"]) == list(CLASS_NAMES)
        assert row["class"] == CLASS_NAMES[int(np.argmax(expected))]
        assert row["inverted"] is False
        got = torch.tensor(list(row["probabilities"].values()), dtype=torch.float64)
        assert ((got - p).abs() <= e).all(), (index, got, p, e)
        assert ((torch.tensor(expected) - p).abs() <= e).all(), (index, expected, p, e)  # evaluate's own
        assert sum(row["probabilities"].values()) == pytest.approx(1, abs=1e-4)


@pytest.mark.parametrize("kind", ["jpeg", "light"])
def test_transformed_images_agree_at_least_90_percent(setup, capsys, kind):
    weights, folders, reference = setup
    code, out, _ = run(capsys, weights, folders[kind], "--json")
    assert code == 0
    rows = json_lines(out)
    assert len(rows) == len(reference)
    agree = sum(r["class"] == CLASS_NAMES[int(np.argmax(reference[int(Path(r["file"]).stem)]))] for r in rows)
    print(f"{kind}: {agree} of {len(rows)} agree")
    assert agree >= 0.9 * len(rows), f"{agree} of {len(rows)}"
    assert all(r["inverted"] is (kind == "light") for r in rows)


def test_top_k_lines_and_other_formats(setup, capsys, tmp_path):
    weights, folders, reference = setup
    index = min(reference)
    pixels = np.asarray(Image.open(folders["png"] / f"{index:05d}.png"))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    Image.fromarray(pixels).save(tmp_path / "a.gif", save_all=True, append_images=[noise])
    Image.fromarray(pixels).save(tmp_path / "b.bmp")
    lossless = ["a.gif", "b.bmp"]
    if features.check("webp"):
        Image.fromarray(pixels).save(tmp_path / "b.webp", lossless=True)
        lossless.append("b.webp")
    black_on_clear = np.zeros((28, 28, 4), np.uint8)
    black_on_clear[..., 3] = pixels  # a black garment whose opacity is the pixel value
    Image.fromarray(black_on_clear, "RGBA").save(tmp_path / "c.png")
    code, out, err = run(capsys, weights, tmp_path, "--top-k", "2")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == [str(tmp_path / n) for n in sorted([*lossless, "c.png"])]
    best, second = np.argsort(reference[index])[::-1][:2]
    expected = f"{CLASS_NAMES[best]} {reference[index][best]:.4f}  {CLASS_NAMES[second]}"
    for line in lines:
        if line.startswith(str(tmp_path / "c.png")):
            assert line.endswith("(inverted)") and CLASS_NAMES[best] in line
        else:
            assert line.endswith(f"{CLASS_NAMES[second]} {reference[index][second]:.4f}"), line
            assert expected in line  # GIF's first frame, BMP, lossless WebP: the PNG's pixels exactly


def test_invert_option(setup, capsys):
    weights, folders, reference = setup
    light = sorted(folders["light"].iterdir())[0]
    png = sorted(folders["png"].iterdir())[0]
    for flag, expected in (("no", [False, False]), ("yes", [True, True]), ("auto", [True, False])):
        code, out, _ = run(capsys, weights, light, png, "--invert", flag, "--json")
        assert code == 0
        assert [r["inverted"] for r in json_lines(out)] == expected


def test_a_blank_picture_is_flagged(setup, capsys, tmp_path):
    """A picture of one colour becomes an image of one colour, whatever its size or shade: the
    network still answers, and the output says there was no garment to classify."""
    weights, folders, _ = setup
    Image.new("RGB", (60, 40), (255, 255, 255)).save(tmp_path / "white.png")  # light: inverted
    Image.new("L", (28, 28), 90).save(tmp_path / "grey.png")  # already 28x28: used as it is
    garment = sorted(folders["png"].iterdir())[0]
    files = [tmp_path / "grey.png", tmp_path / "white.png", garment]
    code, out, _ = run(capsys, weights, *files, "--json")
    assert code == 0
    flags = [(r["blank"], r["inverted"]) for r in json_lines(out)]
    assert flags == [(True, False), (True, True), (False, False)]
    code, out, _ = run(capsys, weights, *files)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 3
    assert lines[0].endswith("  (blank: one colour, no garment to classify)")
    assert lines[1].endswith("  (inverted)  (blank: one colour, no garment to classify)")
    assert "blank" not in lines[2]


def test_folder_skips_and_counts_non_images(setup, capsys, tmp_path):
    weights, folders, _ = setup
    for name in sorted(p.name for p in folders["png"].iterdir())[:3]:
        (tmp_path / name).write_bytes((folders["png"] / name).read_bytes())
    (tmp_path / "notes.txt").write_text("not a picture\n")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    code, out, err = run(capsys, weights, tmp_path)
    assert code == 0 and len(out.splitlines()) == 3
    assert err.count("\n") == 1 and "skipped 2 file(s) that are not images" in err and "notes.txt" in err


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height grey pixels, with almost no data behind it."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0"))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def make_bad(kind: str, folder: Path, good_png: Path) -> Path:
    path = folder / {"text": "notes.txt", "missing": "nowhere.png"}.get(kind, f"{kind}.png")
    if kind == "truncated":
        path.write_bytes(good_png.read_bytes()[:-40])
    elif kind == "corrupt":
        data = bytearray(good_png.read_bytes())
        data[60:80] = bytes(20)
        path.write_bytes(bytes(data))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "wide":
        Image.new("L", (100_000, 1)).save(path)  # 100 kB in memory, a few hundred bytes on disk
    elif kind == "zero":
        path.write_bytes(png_header(0, 5))
    elif kind == "bomb":
        path.write_bytes(png_header(20_000, 20_000))  # past Pillow's own decompression-bomb limit
    elif kind == "large":
        path.write_bytes(png_header(10_000, 10_000))  # past Pillow's warning limit, refused as well
    elif kind == "text":
        path.write_text("not a picture\n")
    return path


BAD = {"truncated": "truncated or corrupt", "corrupt": "truncated or corrupt", "empty": "empty file",
       "wide": "100000x1 pixels", "zero": "not an image", "bomb": "decompression bomb",
       "large": "decompression bomb", "text": "not an image",
       "missing": "no such file"}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_bad_file_named_stops_the_call(setup, capsys, tmp_path, kind):
    weights, folders, _ = setup
    good = sorted(folders["png"].iterdir())[0]
    bad = make_bad(kind, tmp_path, good)
    code, out, err = run(capsys, weights, good, bad)
    assert code == 2 and out == ""  # checked before anything is predicted: nothing for the good file
    assert err.startswith(f"lenetlab: error: {bad}: ") and err.count("\n") == 1, err
    assert BAD[kind] in err and "Traceback" not in err


def test_a_damaged_image_in_a_folder_stops_the_call(setup, capsys, tmp_path):
    weights, folders, _ = setup
    good = sorted(folders["png"].iterdir())[0]
    (tmp_path / good.name).write_bytes(good.read_bytes())
    bad = make_bad("truncated", tmp_path, good)
    code, out, err = run(capsys, weights, tmp_path)
    assert code == 2 and out == "" and f"{bad}: a truncated or corrupt image" in err


def test_bad_weights_and_empty_folder(setup, capsys, tmp_path):
    weights, folders, _ = setup
    code, _, err = run(capsys, tmp_path / "none.pth", folders["png"])
    assert code == 2 and "none.pth: no such file" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, weights, tmp_path / "empty")
    assert code == 2 and "a folder with no image files" in err


def test_prepare_keeps_the_aspect_ratio_and_pads_with_black():
    wide = np.full((30, 60), 200, np.uint8)  # a light rectangle on nothing: no border to compare
    pixels, inverted = prepare(wide, "no")
    assert pixels.shape == (28, 28) and not inverted
    rows = np.nonzero(pixels.max(axis=1))[0]
    assert (rows.min(), rows.max()) == (7, 20) and pixels[:7].max() == 0 and pixels[21:].max() == 0
    on_white = np.full((100, 50), 255, np.uint8)
    on_white[20:80, 10:40] = 30  # a dark garment on white
    pixels, inverted = prepare(on_white, "auto")
    assert inverted and pixels[:, :7].max() == 0 and pixels[14, 14] > 200


def test_load_image_reads_grey_16_bit(tmp_path):
    deep = (np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) * 83)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    image = load_image(tmp_path / "deep.png", "no")
    assert image.size == (28, 28)
    assert np.abs(image.pixels.astype(int) - np.rint(deep / 257)).max() <= 1
