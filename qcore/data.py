"""The datasets (MNIST, Fashion-MNIST) held in memory as normalized float tensors, read once.

Both are 28x28 grey images of 10 classes in the same idx format: 60,000 training and 10,000 test
images. Each is read from QCORE_DATA_DIR in torchvision's layout (<folder>/raw/*-ubyte), and
Fashion-MNIST offline from Debian's dataset-fashion-mnist package (gzipped idx files). Every file is
validated before use: magic, item shape, count, exact length, labels in 0..9.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from qcore.files import shorten, write_atomic

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
DATA_DIR_ENV = "QCORE_DATA_DIR"
DEFAULT_DATA_DIR = "./data"
# A folder where the normalized images are kept as files and memory-mapped, so that the server's
# replicas (deploy/serve sets it) share one copy of each dataset's pages instead of one each
SHARED_DATASETS_ENV = "QCORE_SHARED_DATASETS"
MAX_GZIP_BYTES = 30 * 1024 * 1024  # Fashion-MNIST's largest .gz is 26.4 MB; a bigger one is refused unread


@dataclass(frozen=True)
class DatasetSpec:
    """What the lab knows about a dataset before reading it: where it lives and how it is scaled."""

    name: str  # the id used in URLs, flags and cache keys
    title: str
    folder: str  # torchvision's folder name under the data dir
    mean: float  # normalization over the training set's pixels scaled to [0, 1]
    std: float
    class_names: tuple[str, ...]
    system_dir: Path | None  # an offline copy installed by a system package (gzipped idx files)
    how_to_get: str  # one line for the user when it is missing

    def class_name(self, label: int) -> str:
        return self.class_names[label]


MNIST = DatasetSpec(
    "mnist",
    "MNIST",
    "MNIST",
    MNIST_MEAN,
    MNIST_STD,
    tuple(str(digit) for digit in range(10)),
    None,
    "run once with internet access so torchvision can download it there",
)
# mean and std of Fashion-MNIST's 60,000 training images in [0, 1] (tests recompute them from the files)
FASHION_MNIST = DatasetSpec(
    "fashion-mnist",
    "Fashion-MNIST",
    "FashionMNIST",
    0.2860,
    0.3530,
    ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    Path("/usr/share/datasets/fashion-mnist"),
    "install Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist), "
    "or run once with internet access so torchvision can download it there",
)
DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (MNIST, FASHION_MNIST)}


def dataset_spec(name: str) -> DatasetSpec:
    """The dataset called `name`, or a one-line DataError listing the known ones."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {shorten(name)!r}; datasets are {', '.join(DATASETS)}")
    return DATASETS[name]


_RAW_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataError(Exception):
    """A dataset cannot be used: unknown, missing or damaged. The message is one line and says what to do."""


class DataNotFoundError(DataError, FileNotFoundError):
    """The dataset is not in the data folder (nor installed by the system) and could not be downloaded."""


class DataFileError(DataError, ValueError):
    """An idx file exists but is not what it must be (magic, dimensions, count, length, labels)."""


_IMAGE_MAGIC = 0x00000803  # idx: unsigned bytes, 3 dimensions
_LABEL_MAGIC = 0x00000801  # idx: unsigned bytes, 1 dimension
TRAIN_SIZE, TEST_SIZE = 60000, 10000  # both datasets' splits; every idx file must hold exactly this many
MAX_SEED = 2**31 - 1  # seeds for calibration sampling and training, as the sidebar offers them


@dataclass(frozen=True)
class Split:
    """One split: `images` normalized float32 [N,1,28,28], `labels` int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    content_hash: str = ""  # of the pixels and labels as read (the idx files' content, not their path)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, count: int) -> Split:
        """The first `count` samples (all of them when count exceeds the split)."""
        return Split(self.images[:count], self.labels[:count], f"{self.content_hash}[:{count}]")


def data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The folder datasets are read from: `explicit`, else $QCORE_DATA_DIR, else ./data."""
    if explicit is not None:
        return Path(explicit)
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def normalize(images_uint8: torch.Tensor, spec: DatasetSpec = MNIST) -> torch.Tensor:
    """uint8 [N,28,28] -> float32 [N,1,28,28], scaled to [0,1] then standardized by the dataset's
    training-set mean and std (MNIST's are the notebook's)."""
    return ((images_uint8.to(torch.float32) / 255.0 - spec.mean) / spec.std).unsqueeze(1)


def _raw_names() -> list[str]:
    return [name for names in _RAW_FILES.values() for name in names]


def _raw_path(root: Path, spec: DatasetSpec, name: str) -> Path | None:
    """Where `name` is found: the data folder's torchvision layout (plain, then gzipped), then the
    system package's gzipped copy; None when nowhere."""
    raw = root / spec.folder / "raw"
    candidates = [raw / name, raw / f"{name}.gz"]
    if spec.system_dir is not None:
        candidates.append(spec.system_dir / f"{name}.gz")
    return next((path for path in candidates if path.is_file()), None)


def missing_files(root: Path, spec: DatasetSpec = MNIST) -> list[Path]:
    """The raw files of `spec` found nowhere it is looked for (named as in the data folder)."""
    raw = root / spec.folder / "raw"
    return [raw / name for name in _raw_names() if _raw_path(root, spec, name) is None]


def load_split(
    train: bool, root: str | os.PathLike[str] | None = None, download: bool = True, spec: DatasetSpec = MNIST
) -> Split:
    """Load one split into memory. Downloads with torchvision only when files are missing and
    `download` is set; any failure becomes a DataNotFoundError that says what to do."""
    folder = data_dir(root)
    if missing_files(folder, spec) and download:
        _try_download(folder, spec)
    if missing_files(folder, spec):
        raise DataNotFoundError(_missing_message(folder, spec))
    image_name, label_name = _RAW_FILES[train]
    count = TRAIN_SIZE if train else TEST_SIZE
    image_path, label_path = _raw_path(folder, spec, image_name), _raw_path(folder, spec, label_name)
    assert image_path is not None and label_path is not None  # missing_files just said so
    images = read_idx_images(image_path, count)
    labels = read_idx_labels(label_path, count)
    digest = hashlib.sha256(images.numpy().tobytes())
    digest.update(labels.numpy().tobytes())
    content_hash = digest.hexdigest()[:16]
    return Split(shared_images(normalize(images, spec), spec, content_hash), labels, content_hash)


def shared_images(normalized: torch.Tensor, spec: DatasetSpec, content_hash: str) -> torch.Tensor:
    """`normalized` itself, or, where $QCORE_SHARED_DATASETS names a folder, the same values memory-mapped
    from a file there (copy-on-write: the processes that map it share its pages until one writes).
    The file is written once, atomically, and used only when it holds exactly these values: one that
    is damaged, or was changed by anyone, is written again."""
    folder = os.environ.get(SHARED_DATASETS_ENV)
    if not folder:
        return normalized
    key = hashlib.sha256(f"{spec.name}|{content_hash}|{spec.mean!r}|{spec.std!r}|{tuple(normalized.shape)}".encode())
    path = Path(folder) / f"{spec.name}-{key.hexdigest()[:20]}.float32"
    for _attempt in range(2):
        try:
            if not path.is_file() or path.stat().st_size != normalized.numel() * 4:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, normalized.numpy().tobytes())
            mapped = torch.from_file(str(path), shared=False, size=normalized.numel(), dtype=torch.float32)
        except (OSError, RuntimeError) as error:  # the operator's folder: named by its setting, not its path
            reason = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
            raise DataError(f"the shared datasets folder (${SHARED_DATASETS_ENV}) cannot be used: {reason}") from None
        mapped = mapped.reshape(normalized.shape)
        if torch.equal(mapped, normalized):
            return mapped
        path.unlink(missing_ok=True)  # not these values: written again once
    raise DataError(f"the shared dataset file of {spec.name} (${SHARED_DATASETS_ENV}) changed while it was read")


def _idx_bytes(path: Path, limit: int) -> bytes:
    """The file's bytes, at most `limit` + 1 of them (so a longer file is seen to be longer); a .gz
    file is inflated only that far, so a small file that would inflate without end is never expanded."""
    if path.suffix != ".gz":
        with open(path, "rb") as handle:
            return handle.read(limit + 1)
    if path.stat().st_size > MAX_GZIP_BYTES:
        raise DataFileError(f"{path.name}: {path.stat().st_size} bytes, more than any idx file of 10 classes gzips to")
    try:
        with gzip.open(path, "rb") as handle:
            return handle.read(limit + 1)
    except (OSError, EOFError, zlib.error) as error:
        raise DataFileError(f"{path.name}: not a valid gzip file ({shorten(error, 120)})") from None


def _read_idx(path: Path, magic: int, dims: tuple[int, ...], count: int) -> torch.Tensor:
    """The uint8 payload of an idx file (plain or gzipped), after checking everything its header claims."""
    header_size = 4 * (1 + 1 + len(dims))
    expected_size = header_size + count * math.prod(dims)
    name = path.name.removesuffix(".gz")
    try:
        data = _idx_bytes(path, expected_size)
    except OSError as error:
        raise DataFileError(f"{name}: cannot be read ({error.strerror})") from None
    size = path.stat().st_size if path.suffix != ".gz" else len(data)
    if len(data) < header_size:
        raise DataFileError(f"{name}: {size} bytes, shorter than an idx header; the file is truncated")
    header = struct.unpack(f">{2 + len(dims)}I", data[:header_size])
    if header[0] != magic:
        raise DataFileError(f"{name}: magic number {header[0]:#010x}, expected {magic:#010x}")
    if header[1] != count:
        raise DataFileError(f"{name}: declares {header[1]} items, expected {count}")
    if tuple(header[2:]) != dims:
        raise DataFileError(f"{name}: item shape {list(header[2:])}, expected {list(dims)}")
    if len(data) != expected_size:
        shown = f"more than {expected_size}" if len(data) > expected_size and path.suffix == ".gz" else str(size)
        raise DataFileError(f"{name}: {shown} bytes, expected {expected_size} for {count} items")
    payload = bytearray(data[header_size:])
    return torch.frombuffer(payload, dtype=torch.uint8).reshape(count, *dims)


def read_idx_images(path: Path, count: int) -> torch.Tensor:
    """uint8 [count, 28, 28] from an idx3 image file, validated."""
    return _read_idx(path, _IMAGE_MAGIC, (28, 28), count)


def read_idx_labels(path: Path, count: int) -> torch.Tensor:
    """int64 [count] class labels from an idx1 label file, validated (every label in 0..9)."""
    labels = _read_idx(path, _LABEL_MAGIC, (), count).to(torch.int64)
    if labels.numel() and int(labels.max()) > 9:
        bad = int((labels > 9).sum())
        raise DataFileError(f"{path.name}: {bad} label(s) outside 0..9 (largest {int(labels.max())})")
    return labels


def _try_download(folder: Path, spec: DatasetSpec = MNIST) -> None:
    """Download with torchvision into a temporary folder and move the files in only when all four
    arrived, so a failed download (offline, say) creates nothing where the data was looked for."""
    from torchvision import datasets

    source = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}[spec.name]
    with tempfile.TemporaryDirectory(prefix=f"qcore-{spec.name}-") as staging:
        try:
            for train in (True, False):
                source(staging, train=train, download=True)
        except (OSError, RuntimeError) as error:  # no network, or a mirror failed: report below
            detail = " ".join(str(error).split())  # torchvision's message spans lines; keep one
            raise DataNotFoundError(f"{_missing_message(folder, spec)} Download failed: {detail}") from error
        fetched = Path(staging) / spec.folder / "raw"
        raw = folder / spec.folder / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for name in _raw_names():
            write_atomic(raw / name, (fetched / name).read_bytes())  # a reader never sees half a file


def _missing_message(folder: Path, spec: DatasetSpec = MNIST) -> str:
    absent = ", ".join(path.name for path in missing_files(folder, spec))
    return (
        f"{spec.title} not found in {folder.resolve()}/{spec.folder}/raw (missing: {absent}). "
        f"Set {DATA_DIR_ENV} (or --data-dir) to a folder holding {spec.folder}/raw/*-ubyte in torchvision's "
        f"layout, or {spec.how_to_get}."
    )


@dataclass(frozen=True)
class Dataset:
    """Both splits of one dataset, normalized with its own constants."""

    train: Split
    test: Split
    spec: DatasetSpec = MNIST

    @property
    def content_id(self) -> str:
        """What the data is, whatever folder it came from: the dataset, how it is scaled, and the hash of
        both splits' pixels and labels (a result store keys by it; a server's path never enters a key)."""
        return f"{self.spec.name}:{self.spec.mean}:{self.spec.std}:{self.train.content_hash}:{self.test.content_hash}"


_CACHE: dict[tuple[str, Path], Dataset] = {}


def load_dataset(name: str = "mnist", root: str | os.PathLike[str] | None = None, download: bool = True) -> Dataset:
    """Both splits of dataset `name`, loaded once per folder per process (about 220 MB as float32)."""
    spec = dataset_spec(name)
    folder = data_dir(root).resolve()
    if (spec.name, folder) not in _CACHE:
        splits = (load_split(train, folder, download, spec) for train in (True, False))
        _CACHE[spec.name, folder] = Dataset(*splits, spec=spec)
    return _CACHE[spec.name, folder]


# The pixel conventions a user's model may read, each as the (mean, std) that turns a pixel in [0, 1]
# into what the model reads, x = (pixel/255 - mean) / std: the dataset's own standardization
# ("normalized", the zoo's), raw pixels in [0, 1], raw pixels in [0, 255], or pixels in [-1, 1].
INPUT_SCALES = ("normalized", "raw", "raw255", "symmetric")
INPUT_SCALE_TITLES = {
    "normalized": "standardized by the dataset's mean and std",
    "raw": "pixels in [0, 1]",
    "raw255": "pixels in [0, 255]",
    "symmetric": "pixels in [-1, 1]",
}
_FIXED_SCALES = {"raw": (0.0, 1.0), "raw255": (0.0, 1.0 / 255.0), "symmetric": (0.5, 0.5)}
_VIEWS: dict[tuple[int, str, tuple[float, float]], Dataset] = {}


def input_view_name(input_scale: str, affine: tuple[float, float] = (1.0, 0.0)) -> str:
    """One string for a model's view of the data (a cache key): the convention, and the affine map
    `multiply * x + add` its graph applies to the image before its first layer, when there is one."""
    if input_scale not in INPUT_SCALES:
        raise DataError(f"unknown input scale {shorten(input_scale)!r}; it is one of {', '.join(INPUT_SCALES)}")
    return input_scale if affine == (1.0, 0.0) else f"{input_scale};{float(affine[0])!r};{float(affine[1])!r}"


def parse_input_view(name: str) -> tuple[str, tuple[float, float]]:
    """input_view_name's arguments back from its string."""
    scale, *affine = name.split(";")
    return scale, ((float(affine[0]), float(affine[1])) if affine else (1.0, 0.0))


def with_input_scale(data: Dataset, input_scale: str, affine: tuple[float, float] = (1.0, 0.0)) -> Dataset:
    """`data` as a model reading `input_scale` images sees it, after the affine map `multiply * x + add`
    that its graph applies to the image first (a Mul by 1/255 inside a file that reads [0, 255], say):
    unchanged for "normalized" without one; else the images so computed, with a spec whose mean and std
    describe them (x = (pixel/255 - mean) / std), so that every consumer of the spec (probe images, the
    ONNX export's metadata) describes what the model reads. Made once per dataset, view and process."""
    view = input_view_name(input_scale, affine)  # validates input_scale
    if view == "normalized":
        return data
    key = (id(data), input_scale, (float(affine[0]), float(affine[1])))
    if key not in _VIEWS:
        spec = view_spec(data.spec, input_scale, affine)

        def scaled(split: Split) -> Split:
            return Split(rescaled(split.images, data.spec, spec), split.labels, split.content_hash)

        _VIEWS[key] = Dataset(scaled(data.train), scaled(data.test), spec)
    return _VIEWS[key]


def view_spec(spec: DatasetSpec, input_scale: str, affine: tuple[float, float] = (1.0, 0.0)) -> DatasetSpec:
    """`spec` with the mean and std that describe what a model reading `input_scale` images sees after
    its graph's affine step `multiply * x + add` (see with_input_scale)."""
    input_view_name(input_scale, affine)  # validates input_scale
    mean, std = (spec.mean, spec.std) if input_scale == "normalized" else _FIXED_SCALES[input_scale]
    multiply, add = float(affine[0]), float(affine[1])
    if multiply == 0 or not (math.isfinite(multiply) and math.isfinite(add)):
        raise DataError(f"the model's input step multiplies the image by {multiply!r}, which loses the image")
    # multiply * (pixel - mean) / std + add == (pixel - (mean - add * std / multiply)) / (std / multiply)
    mean, std = mean - add * std / multiply, std / multiply
    step = ", then the model's own input step" if (multiply, add) != (1.0, 0.0) else ""
    return replace(spec, title=f"{spec.title} ({INPUT_SCALE_TITLES[input_scale]}{step})", mean=mean, std=std)


def rescaled(images: torch.Tensor, spec: DatasetSpec, target: DatasetSpec) -> torch.Tensor:
    """Images normalized by `spec` as `target`'s mean and std describe them (via the pixels in [0, 1])."""
    return (images * spec.std + spec.mean - target.mean) / target.std


def load_mnist(root: str | os.PathLike[str] | None = None, download: bool = True) -> Dataset:
    """MNIST's two splits (load_dataset("mnist"))."""
    return load_dataset("mnist", root, download)


def available_datasets(root: str | os.PathLike[str] | None = None) -> dict[str, str | None]:
    """Every dataset with None when its files are all found, else the one line saying how to get it."""
    folder = data_dir(root)
    return {
        name: (_missing_message(folder, spec) if missing_files(folder, spec) else None)
        for name, spec in DATASETS.items()
    }


def calibration_indices(num_train: int, num_batches: int, batch_size: int, seed: int) -> torch.Tensor:
    """Training-split indices for calibration: a seeded permutation, first num_batches*batch_size."""
    generator = torch.Generator().manual_seed(seed)
    count = min(num_train, num_batches * batch_size)
    return torch.randperm(num_train, generator=generator)[:count]


def calibration_batches(train: Split, num_batches: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Deterministic calibration image batches from the training split (never the test set)."""
    order = calibration_indices(len(train), num_batches, batch_size, seed)
    return [train.images[order[start : start + batch_size]] for start in range(0, len(order), batch_size)]
