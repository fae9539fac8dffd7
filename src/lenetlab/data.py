"""Fashion-MNIST: find, download, validate and load the IDX files into tensors.

The whole data set is small (70,000 images of 28x28 bytes), so it is read once
into memory and normalised into float tensors; training then indexes batches
out of those tensors instead of going through a per-sample Dataset.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .files import FILE_MODE
from .records import TRAIN_SIZE, VAL_SIZE

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# The training images' mean and standard deviation on a 0-1 scale, as the original used.
MEAN, STD = 0.2860, 0.3530

# name -> (kind, records, official MD5 of the .gz). Kind: 3 = images, 1 = labels.
FILES = {
    "train-images-idx3-ubyte": (3, 60_000, "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    "train-labels-idx1-ubyte": (1, 60_000, "25c81989df183df01b3e8a0aad5dffbe"),
    "t10k-images-idx3-ubyte": (3, 10_000, "bef4ecab320f06d8554ea6380940ec79"),
    "t10k-labels-idx1-ubyte": (1, 10_000, "bb300cfdad3c16e7a12a480ee83cd310"),
}
MIRRORS = (
    "https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
)
_MAGIC = {3: 2051, 1: 2049}


def cache_dir() -> Path:
    """The per-user cache folder that downloads go to."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lenetlab" / "fashion-mnist"


def read_idx(path: Path, kind: int, records: int | None = None) -> np.ndarray:
    """Read one IDX file (.gz or raw) and check its structure.

    kind 3 is an image file (N x 28 x 28 uint8), kind 1 a label file (N uint8 in 0-9).
    Raises DataError naming the file and what is wrong.
    """
    header = 4 + 4 * kind
    # the most a well-formed file holds (one byte more tells trailing data): a .gz that inflates
    # far past it is cut there instead of filling memory
    most = records or max(n for k, n, _ in FILES.values() if k == kind)
    limit = header + most * (784 if kind == 3 else 1)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = _inflate(raw, limit + 1)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read ({exc})") from None
    if len(raw) < header:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[0:4], "big")
    if magic != _MAGIC[kind]:
        what = "image" if kind == 3 else "label"
        raise DataError(f"{path}: bad magic number {magic}, expected {_MAGIC[kind]} for an {what} file")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(kind)]
    if kind == 3 and dims[1:] != [28, 28]:
        raise DataError(f"{path}: images are {dims[1]}x{dims[2]}, expected 28x28")
    if records is not None and dims[0] != records:
        raise DataError(f"{path}: holds {dims[0]} records, expected {records}")
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes, expected {expected} for {dims[0]} records "
                        f"({'truncated' if len(raw) < expected else 'trailing data'})")
    array = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
    if kind == 1 and array.size and array.max() > 9:
        raise DataError(f"{path}: label {int(array.max())} out of range 0-9")
    return array


def _inflate(data: bytes, limit: int) -> bytes:
    """gzip data (one member or several, as gzip.decompress reads it) inflated to at most limit bytes."""
    out = bytearray()
    while data and len(out) < limit:
        if data[:2] != b"\x1f\x8b":
            raise EOFError("data after the compressed stream is not gzip")
        member = zlib.decompressobj(wbits=31)
        out += member.decompress(data, limit - len(out))
        if member.unconsumed_tail:  # the limit was reached inside this member
            break
        if not member.eof:
            raise EOFError("compressed file ended before the end-of-stream marker was reached")
        data = member.unused_data
    return bytes(out)


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_file(url: str, dest: Path, md5: str, quiet: bool = False) -> None:
    """Download url to dest through a temporary file, checking its MD5 before the rename."""
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=30) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name,
                       disable=quiet or not sys.stderr.isatty())
            for block in iter(lambda: response.read(1 << 16), b""):
                out.write(block)
                bar.update(len(block))
            bar.close()
        actual = _md5(tmp)
        if actual != md5:
            raise DataError(f"{url}: MD5 {actual} does not match the official {md5}")
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def locate(data_dir: str | Path | None = None, download: bool = True,
           quiet: bool = False) -> Path:
    """Return the folder holding the four files: --data-dir, then $LENETLAB_DATA, then the cache.

    When none holds them and download is allowed, fetch them into the cache.
    """
    if data_dir is not None:  # an explicit folder is the only place looked at
        missing = [n for n in FILES if not _find(Path(data_dir), n)]
        if missing:
            raise DataError(f"{data_dir}: Fashion-MNIST file(s) missing: {', '.join(missing)}")
        return Path(data_dir)
    candidates = [Path(os.environ["LENETLAB_DATA"])] if os.environ.get("LENETLAB_DATA") else []
    candidates.append(cache_dir())
    for folder in candidates:
        if all(_find(folder, name) for name in FILES):
            return folder
    searched = ", ".join(str(c) for c in candidates)
    if not download:
        raise DataError(f"Fashion-MNIST not found in {searched}")
    target = cache_dir()
    for name, (_, _, md5) in FILES.items():
        if _find(target, name):
            continue
        errors = []
        for mirror in MIRRORS:
            try:
                download_file(mirror + name + ".gz", target / f"{name}.gz", md5, quiet)
                break
            except (OSError, http.client.HTTPException, DataError) as exc:  # URLError is an OSError
                errors.append(str(getattr(exc, "reason", exc)))
        else:
            raise DataError(f"Fashion-MNIST not found in {searched}, and downloading {name}.gz "
                            f"failed ({errors[-1]}); set LENETLAB_DATA or --data-dir")
    return target


@dataclass
class FashionMNIST:
    """The raw data set: uint8 images (N, 28, 28) and int64 labels (N,); no test images when
    loaded with test=False (a search, which must not see them)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor | None
    test_labels: torch.Tensor | None
    folder: Path
    checksums: dict[str, str]


def load_fashion_mnist(data_dir: str | Path | None = None, download: bool = True,
                       quiet: bool = False, test: bool = True) -> FashionMNIST:
    """Locate, validate and read the four files (test=False: the two training files only; the
    t10k files are not opened). Raises DataError on any problem."""
    folder = locate(data_dir, download, quiet)
    arrays, checksums = {}, {}
    for name, (kind, records, _) in FILES.items():
        if not test and name.startswith("t10k"):
            continue
        path = _find(folder, name)
        arrays[name] = read_idx(path, kind, records)
        checksums[name] = hashlib.sha256(arrays[name].tobytes()).hexdigest()
    return FashionMNIST(
        train_images=torch.from_numpy(arrays["train-images-idx3-ubyte"].copy()),
        train_labels=torch.from_numpy(arrays["train-labels-idx1-ubyte"].astype(np.int64)),
        test_images=torch.from_numpy(arrays["t10k-images-idx3-ubyte"].copy()) if test else None,
        test_labels=(torch.from_numpy(arrays["t10k-labels-idx1-ubyte"].astype(np.int64)) if test
                     else None),
        folder=folder,
        checksums=checksums,
    )


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28), scaled to 0-1 then standardised."""
    return images.unsqueeze(1).float().div_(255.0).sub_(MEAN).div_(STD)


@dataclass
class Splits:
    """Normalised tensors of the three splits, already on the training device (no test split
    when the data set was loaded without it: training then evaluates train and val only)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor | None
    test_y: torch.Tensor | None

    @property
    def has_test(self) -> bool:
        return self.test_x is not None

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"{name}_x"), getattr(self, f"{name}_y")

    def to(self, device: str | torch.device) -> Splits:
        """These splits on device (the same tensors where they already are)."""
        return Splits(**{name: tensor.to(device) if tensor is not None else None
                         for name, tensor in vars(self).items()})

    def share_memory_(self) -> Splits:
        """Move every tensor into shared memory, in place: a process started from here then
        receives them without a copy (torch passes a descriptor of the memory, not the bytes)."""
        for tensor in vars(self).values():
            if tensor is not None:
                tensor.share_memory_()
        return self


def make_splits(data: FashionMNIST, split_seed: int = 0, device: str | torch.device = "cpu",
                train_subset: int | None = None) -> Splits:
    """The seeded 54,000 / 6,000 train / validation split, plus the 10,000 test images.

    train_subset keeps only the first N training images of the split (quick checks, tests);
    validation and test stay whole. data without test images gives splits without a test split.
    """
    order = torch.randperm(len(data.train_labels), generator=torch.Generator().manual_seed(split_seed))
    train_idx, val_idx = order[:TRAIN_SIZE], order[TRAIN_SIZE:TRAIN_SIZE + VAL_SIZE]
    if train_subset is not None:
        train_idx = train_idx[:train_subset]
    images = normalise(data.train_images)
    has_test = data.test_images is not None
    return Splits(
        train_x=images[train_idx].to(device), train_y=data.train_labels[train_idx].to(device),
        val_x=images[val_idx].to(device), val_y=data.train_labels[val_idx].to(device),
        test_x=normalise(data.test_images).to(device) if has_test else None,
        test_y=data.test_labels.to(device) if has_test else None,
    )
