"""MNIST held in memory as normalized float tensors, read once from QCORE_DATA_DIR."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
DATA_DIR_ENV = "QCORE_DATA_DIR"
DEFAULT_DATA_DIR = "./data"

_RAW_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataNotFoundError(FileNotFoundError):
    """MNIST is not in the data folder and could not be downloaded."""


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
    from torchvision.datasets.mnist import read_image_file, read_label_file

    image_name, label_name = _RAW_FILES[train]
    raw = folder / "MNIST" / "raw"
    images = read_image_file(str(raw / image_name))
    labels = read_label_file(str(raw / label_name)).to(torch.int64)
    return Split(normalize(images), labels)


def _try_download(folder: Path) -> None:
    from torchvision.datasets import MNIST

    try:
        for train in (True, False):
            MNIST(str(folder), train=train, download=True)
    except (OSError, RuntimeError) as error:  # no network, or a mirror failed: report below
        detail = " ".join(str(error).split())  # torchvision's message spans lines; keep one
        raise DataNotFoundError(f"{_missing_message(folder)} Download failed: {detail}") from error


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
