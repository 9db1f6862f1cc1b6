"""MNIST held in memory as normalized float tensors, read once from QCORE_DATA_DIR."""

from __future__ import annotations

import math
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from qcore.files import write_atomic

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
DATA_DIR_ENV = "QCORE_DATA_DIR"
DEFAULT_DATA_DIR = "./data"

_RAW_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataError(Exception):
    """MNIST cannot be used: missing or damaged. The message is one line and says what to do."""


class DataNotFoundError(DataError, FileNotFoundError):
    """MNIST is not in the data folder and could not be downloaded."""


class DataFileError(DataError, ValueError):
    """An MNIST idx file exists but is not what it must be (magic, dimensions, count, length, labels)."""


_IMAGE_MAGIC = 0x00000803  # idx: unsigned bytes, 3 dimensions
_LABEL_MAGIC = 0x00000801  # idx: unsigned bytes, 1 dimension
TRAIN_SIZE, TEST_SIZE = 60000, 10000  # MNIST's splits; every idx file must hold exactly this many
MAX_SEED = 2**31 - 1  # seeds for calibration sampling and training, as the sidebar offers them


@dataclass(frozen=True)
class Split:
    """One MNIST split: `images` normalized float32 [N,1,28,28], `labels` int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, count: int) -> Split:
        """The first `count` samples (all of them when count exceeds the split)."""
        return Split(self.images[:count], self.labels[:count])


def data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The folder MNIST is read from: `explicit`, else $QCORE_DATA_DIR, else ./data."""
    if explicit is not None:
        return Path(explicit)
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [N,28,28] -> float32 [N,1,28,28], scaled to [0,1] then standardized like the notebook."""
    return ((images_uint8.to(torch.float32) / 255.0 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


def missing_files(root: Path) -> list[Path]:
    """The raw MNIST files that are absent from `root`."""
    raw = root / "MNIST" / "raw"
    return [raw / name for names in _RAW_FILES.values() for name in names if not (raw / name).is_file()]


def load_split(train: bool, root: str | os.PathLike[str] | None = None, download: bool = True) -> Split:
    """Load one split into memory. Downloads with torchvision only when files are missing and
    `download` is set; any failure becomes a DataNotFoundError that says what to do."""
    folder = data_dir(root)
    if missing_files(folder) and download:
        _try_download(folder)
    if missing_files(folder):
        raise DataNotFoundError(_missing_message(folder))
    image_name, label_name = _RAW_FILES[train]
    raw = folder / "MNIST" / "raw"
    count = TRAIN_SIZE if train else TEST_SIZE
    images = read_idx_images(raw / image_name, count)
    labels = read_idx_labels(raw / label_name, count)
    return Split(normalize(images), labels)


def _read_idx(path: Path, magic: int, dims: tuple[int, ...], count: int) -> torch.Tensor:
    """The uint8 payload of an idx file, after checking everything its header claims."""
    header_size = 4 * (1 + 1 + len(dims))
    expected_size = header_size + count * math.prod(dims)
    try:
        size = path.stat().st_size
        if size < header_size:
            raise DataFileError(f"{path.name}: {size} bytes, shorter than an idx header; the file is truncated")
        with open(path, "rb") as handle:
            header = struct.unpack(f">{2 + len(dims)}I", handle.read(header_size))
            if header[0] != magic:
                raise DataFileError(f"{path.name}: magic number {header[0]:#010x}, expected {magic:#010x}")
            if header[1] != count:
                raise DataFileError(f"{path.name}: declares {header[1]} items, expected {count}")
            if tuple(header[2:]) != dims:
                raise DataFileError(f"{path.name}: item shape {list(header[2:])}, expected {list(dims)}")
            if size != expected_size:
                raise DataFileError(f"{path.name}: {size} bytes, expected {expected_size} for {count} items")
            payload = bytearray(handle.read(expected_size - header_size))
    except OSError as error:
        raise DataFileError(f"{path.name}: cannot be read ({error.strerror})") from None
    return torch.frombuffer(payload, dtype=torch.uint8).reshape(count, *dims)


def read_idx_images(path: Path, count: int) -> torch.Tensor:
    """uint8 [count, 28, 28] from an idx3 image file, validated."""
    return _read_idx(path, _IMAGE_MAGIC, (28, 28), count)


def read_idx_labels(path: Path, count: int) -> torch.Tensor:
    """int64 [count] digit labels from an idx1 label file, validated (every label in 0..9)."""
    labels = _read_idx(path, _LABEL_MAGIC, (), count).to(torch.int64)
    if labels.numel() and int(labels.max()) > 9:
        bad = int((labels > 9).sum())
        raise DataFileError(f"{path.name}: {bad} label(s) outside 0..9 (largest {int(labels.max())})")
    return labels


def _try_download(folder: Path) -> None:
    """Download with torchvision into a temporary folder and move the files in only when all four
    arrived, so a failed download (offline, say) creates nothing where the data was looked for."""
    from torchvision.datasets import MNIST

    with tempfile.TemporaryDirectory(prefix="qcore-mnist-") as staging:
        try:
            for train in (True, False):
                MNIST(staging, train=train, download=True)
        except (OSError, RuntimeError) as error:  # no network, or a mirror failed: report below
            detail = " ".join(str(error).split())  # torchvision's message spans lines; keep one
            raise DataNotFoundError(f"{_missing_message(folder)} Download failed: {detail}") from error
        fetched = Path(staging) / "MNIST" / "raw"
        raw = folder / "MNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for names in _RAW_FILES.values():
            for name in names:
                write_atomic(raw / name, (fetched / name).read_bytes())  # a reader never sees half a file


def _missing_message(folder: Path) -> str:
    absent = ", ".join(path.name for path in missing_files(folder))
    return (
        f"MNIST not found in {folder.resolve()}/MNIST/raw (missing: {absent}). "
        f"Set {DATA_DIR_ENV} (or --data-dir) to a folder holding MNIST/raw/*-ubyte in torchvision's "
        f"layout, or run once with internet access so torchvision can download it there."
    )


@dataclass(frozen=True)
class Mnist:
    train: Split
    test: Split


_CACHE: dict[Path, Mnist] = {}


def load_mnist(root: str | os.PathLike[str] | None = None, download: bool = True) -> Mnist:
    """Both splits, loaded once per folder per process (about 220 MB as float32)."""
    folder = data_dir(root).resolve()
    if folder not in _CACHE:
        _CACHE[folder] = Mnist(load_split(True, folder, download), load_split(False, folder, download))
    return _CACHE[folder]


def calibration_indices(num_train: int, num_batches: int, batch_size: int, seed: int) -> torch.Tensor:
    """Training-split indices for calibration: a seeded permutation, first num_batches*batch_size."""
    generator = torch.Generator().manual_seed(seed)
    count = min(num_train, num_batches * batch_size)
    return torch.randperm(num_train, generator=generator)[:count]


def calibration_batches(train: Split, num_batches: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Deterministic calibration image batches from the training split (never the test set)."""
    order = calibration_indices(len(train), num_batches, batch_size, seed)
    return [train.images[order[start : start + batch_size]] for start in range(0, len(order), batch_size)]
