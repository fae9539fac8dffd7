"""The IDX reader and the data locator, on tiny generated files and on the real data set."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_idx

from lenetlab import data as data_module
from lenetlab.data import (
    CLASS_NAMES,
    DataError,
    download_file,
    load_fashion_mnist,
    locate,
    make_splits,
    read_idx,
)


def test_reads_gz_and_raw_idx(tmp_path):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    for compress in (True, False):
        path = write_idx(tmp_path / f"img{compress}", images, compress=compress)
        assert np.array_equal(read_idx(path, 3, 3), images)
    labels = np.array([0, 9, 3])
    assert read_idx(write_idx(tmp_path / "lab", labels), 1, 3).tolist() == [0, 9, 3]


@pytest.mark.parametrize("case, message", [
    ("magic", "bad magic number"),
    ("truncated", "truncated"),
    ("trailing", "trailing data"),
    ("dims", "expected 28x28"),
    ("count", "expected 5"),
    ("label", "out of range"),
    ("header", "truncated header"),
    ("gzip", "cannot read"),
    ("deflate", "cannot read"),
])
def test_rejects_bad_files_naming_them(tmp_path, case, message):
    images = np.zeros((5, 28, 28))
    path = tmp_path / f"{case}.gz"
    kind = 3
    if case == "magic":
        write_idx(path, images, magic=2049)
    elif case == "truncated":
        write_idx(path, images, cut=10)
    elif case == "trailing":
        path.write_bytes(__import__("gzip").compress(
            (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (5, 28, 28))
            + bytes(5 * 784 + 3)))
    elif case == "dims":
        write_idx(path, np.zeros((5, 28, 27)))
    elif case == "count":
        write_idx(path, np.zeros((4, 28, 28)))
    elif case == "label":
        write_idx(path, np.array([1, 2, 10, 3, 4]))
        kind = 1
    elif case == "header":
        path.write_bytes(b"\x00\x00\x08")
    elif case == "gzip":
        path.write_bytes(b"\x1f\x8b" + b"not really gzip")
    elif case == "deflate":  # a valid gzip header over a corrupt deflate stream
        good = write_idx(tmp_path / "good.gz", images).read_bytes()
        path.write_bytes(good[:10] + b"\xff" * 20 + good[30:])
    with pytest.raises(DataError) as err:
        read_idx(path, kind, 5)
    assert str(path) in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_real_data_counts_balance_and_normalisation(dataset):
    assert dataset.train_images.shape == (60_000, 28, 28)
    assert dataset.test_images.shape == (10_000, 28, 28)
    assert torch.bincount(dataset.train_labels).tolist() == [6000] * 10
    assert torch.bincount(dataset.test_labels).tolist() == [1000] * 10
    pixels = dataset.train_images.double() / 255
    assert pixels.mean().item() == pytest.approx(0.2860, abs=1e-4)
    assert pixels.std().item() == pytest.approx(0.3530, abs=1e-4)
    assert len(CLASS_NAMES) == 10


def test_splits_are_seeded_and_disjoint(dataset):
    a, b = make_splits(dataset, 0), make_splits(dataset, 0)
    assert (len(a.train_x), len(a.val_x), len(a.test_x)) == (54_000, 6_000, 10_000)
    assert torch.equal(a.val_y, b.val_y) and torch.equal(a.train_x[:100], b.train_x[:100])
    assert not torch.equal(make_splits(dataset, 1).val_y, a.val_y)
    # normalised with the training statistics: the training split is close to mean 0, std 1
    assert abs(a.train_x.mean().item()) < 0.01 and abs(a.train_x.std().item() - 1) < 0.01


def test_locate_order_and_errors(tmp_path, tiny_dataset_dir, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("LENETLAB_DATA", str(tiny_dataset_dir))
    assert locate() == tiny_dataset_dir
    assert locate(tiny_dataset_dir) == tiny_dataset_dir
    with pytest.raises(DataError, match="missing"):
        locate(tmp_path)  # an explicit --data-dir without the files is an error, not a download
    monkeypatch.setenv("LENETLAB_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError) as err:
        locate(download=False)
    assert "nowhere" in str(err.value) and "cache" in str(err.value)


def test_no_data_and_no_network_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("LENETLAB_DATA", raising=False)
    monkeypatch.setattr(data_module, "MIRRORS", ("http://127.0.0.1:9/",))  # nothing listens
    with pytest.raises(DataError) as err:
        locate(quiet=True)
    assert "downloading" in str(err.value) and "LENETLAB_DATA" in str(err.value)


def test_loading_a_structurally_bad_folder_names_the_file(tiny_dataset_dir):
    write_idx(tiny_dataset_dir / "t10k-labels-idx1-ubyte.gz", np.zeros(9_999))
    with pytest.raises(DataError, match="t10k-labels.*9999 records"):
        load_fashion_mnist(tiny_dataset_dir, download=False)


@pytest.fixture
def http_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_download_checks_md5_and_renames_atomically(http_server, tmp_path):
    root, url = http_server
    payload = b"some bytes" * 1000
    (root / "file.gz").write_bytes(payload)
    dest = tmp_path / "cache" / "file.gz"
    download_file(url + "file.gz", dest, hashlib.md5(payload).hexdigest(), quiet=True)
    assert dest.read_bytes() == payload
    other = tmp_path / "cache" / "other.gz"
    with pytest.raises(DataError, match="MD5"):
        download_file(url + "file.gz", other, "0" * 32, quiet=True)
    assert sorted(p.name for p in other.parent.iterdir()) == ["file.gz"]  # no partial file left


def test_downloads_into_the_cache_when_nothing_is_local(http_server, tmp_path, monkeypatch,
                                                        tiny_dataset_dir):
    root, url = http_server
    files = {}
    for path in Path(tiny_dataset_dir).iterdir():
        (root / path.name).write_bytes(path.read_bytes())
        files[path.name[:-3]] = hashlib.md5(path.read_bytes()).hexdigest()
    monkeypatch.setattr(data_module, "MIRRORS", ("http://127.0.0.1:9/", url))
    monkeypatch.setattr(data_module, "FILES", {
        name: (kind, n, files[name]) for name, (kind, n, _) in data_module.FILES.items()})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("LENETLAB_DATA", raising=False)
    loaded = load_fashion_mnist(quiet=True)
    assert loaded.folder == tmp_path / "cache" / "lenetlab" / "fashion-mnist"
    assert len(loaded.train_labels) == 60_000


def test_a_gz_that_inflates_far_past_its_records_is_refused_without_filling_memory(tmp_path):
    """A decompression bomb: a valid label header, then 1 GiB of zeros that gzip squeezes into
    about 1 MB. It is read only as far as a well-formed file goes, then refused in one line."""
    import resource
    import zlib

    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(1 << 24)
    with open(path, "wb") as out:
        out.write(packer.compress((2049).to_bytes(4, "big") + (10_000).to_bytes(4, "big")))
        for _ in range(64):
            out.write(packer.compress(chunk))
        out.write(packer.flush())
    assert path.stat().st_size < 4 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DataError, match="trailing data"):
        read_idx(path, 1, 10_000)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 << 10, f"the peak grew by {grown_kib >> 10} MiB"
