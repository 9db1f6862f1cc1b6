from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from qcore.data import (
    MNIST_MEAN,
    MNIST_STD,
    DataFileError,
    DataNotFoundError,
    load_split,
    normalize,
    read_idx_images,
    read_idx_labels,
)


def test_missing_data_names_the_folder_and_the_fix(tmp_path):
    with pytest.raises(DataNotFoundError) as error:
        load_split(True, tmp_path, download=False)
    message = str(error.value)
    assert str(tmp_path) in message and "QCORE_DATA_DIR" in message and "train-images-idx3-ubyte" in message


def test_normalize_by_hand():
    images = torch.tensor([[[0, 255]]], dtype=torch.uint8)
    out = normalize(images)
    assert out.shape == (1, 1, 1, 2)
    assert out[0, 0, 0].tolist() == pytest.approx([-MNIST_MEAN / MNIST_STD, (1 - MNIST_MEAN) / MNIST_STD])


def test_real_mnist_shapes_and_labels(mnist):
    assert mnist.train.images.shape == (60000, 1, 28, 28) and mnist.test.images.shape == (10000, 1, 28, 28)
    assert mnist.train.images.dtype == torch.float32
    assert torch.bincount(mnist.test.labels).tolist()[:2] == [980, 1135]  # MNIST's published test counts
    # standardized with the notebook's constants: the training mean is about 0
    assert abs(float(mnist.train.images.mean())) < 0.01


# --- damaged idx files: each refused naming the file and the fault, nothing created ------------

RAW_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    """An idx file written from the format's definition (big-endian magic, then each dimension)."""
    return struct.pack(f">{1 + len(dims)}I", magic, *dims) + payload


def small_split(tmp_path, count: int = 4, labels: bytes | None = None):
    """A folder with a valid test split of `count` images; load it with read_idx_* at that count."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(0x803, (count, 28, 28), bytes(range(count)) * 784))
    (raw / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(0x801, (count,), labels or bytes(range(count))))
    return raw


def test_valid_idx_files_read_back_exactly(tmp_path):
    raw = small_split(tmp_path)
    images = read_idx_images(raw / "t10k-images-idx3-ubyte", 4)
    assert images.shape == (4, 28, 28) and images.dtype == torch.uint8
    assert images.flatten()[:6].tolist() == [0, 1, 2, 3, 0, 1]  # payload written as 0,1,2,3 repeated
    assert read_idx_labels(raw / "t10k-labels-idx1-ubyte", 4).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("t10k-images-idx3-ubyte", idx_bytes(0x803, (4, 28, 28), bytes(784 * 3)), "expected 3152 for 4 items"),
        ("t10k-images-idx3-ubyte", idx_bytes(0x804, (4, 28, 28), bytes(784 * 4)), "magic number 0x00000804"),
        ("t10k-images-idx3-ubyte", idx_bytes(0x803, (4, 28, 27), bytes(756 * 4)), "item shape [28, 27]"),
        ("t10k-images-idx3-ubyte", idx_bytes(0x803, (5, 28, 28), bytes(784 * 5)), "declares 5 items, expected 4"),
        ("t10k-images-idx3-ubyte", b"\x00\x00", "shorter than an idx header"),
        ("t10k-labels-idx1-ubyte", idx_bytes(0x801, (4,), bytes([1, 200, 3, 12])), "2 label(s) outside 0..9"),
    ],
)
def test_damaged_idx_file_names_file_and_fault(tmp_path, name, content, reason):
    raw = small_split(tmp_path)
    (raw / name).write_bytes(content)
    reader = read_idx_images if "images" in name else read_idx_labels
    with pytest.raises(DataFileError) as error:
        reader(raw / name, 4)
    assert name in str(error.value) and reason in str(error.value)


def test_load_split_reports_a_damaged_real_sized_file(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in RAW_NAMES:
        (raw / name).write_bytes(b"\x00\x00\x08\x01")  # a magic number and nothing else
    with pytest.raises(DataFileError, match="train-images-idx3-ubyte: 4 bytes, shorter than an idx header"):
        load_split(True, tmp_path, download=False)


def test_looking_for_missing_data_creates_nothing(tmp_path, monkeypatch):
    import torchvision.datasets

    class OfflineMnist:
        """torchvision's MNIST as it behaves offline: it makes its folders, then fails."""

        def __init__(self, root, train, download):
            (Path(root) / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nno network")

    monkeypatch.setattr(torchvision.datasets, "MNIST", OfflineMnist)
    target = tmp_path / "empty"
    target.mkdir()
    with pytest.raises(DataNotFoundError, match="Download failed: Error downloading"):
        load_split(False, target, download=True)
    assert list(target.iterdir()) == []


def test_shared_images_are_mapped_from_one_file_and_a_changed_file_is_written_again(tmp_path, monkeypatch):
    """Where $QCORE_SHARED_DATASETS is set (deploy/serve sets it), the normalized images come from a
    file there, memory-mapped (its path in this process's mappings), holding exactly the same values;
    a file someone changed is detected by value and written again."""
    from qcore.data import MNIST, SHARED_DATASETS_ENV, DataError, normalize, shared_images

    pixels = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    normalized = normalize(pixels, MNIST)
    assert shared_images(normalized, MNIST, "abc") is normalized  # not set: the tensor itself
    monkeypatch.setenv(SHARED_DATASETS_ENV, str(tmp_path / "shared"))
    mapped = shared_images(normalized.clone(), MNIST, "abc")
    (path,) = (tmp_path / "shared").iterdir()
    assert torch.equal(mapped, normalized) and str(path) in Path("/proc/self/maps").read_text()
    changed = bytearray(path.read_bytes())
    changed[100] ^= 0xFF
    path.write_bytes(bytes(changed))
    again = shared_images(normalized.clone(), MNIST, "abc")
    assert torch.equal(again, normalized) and path.read_bytes() == normalized.numpy().tobytes()
    monkeypatch.setenv(SHARED_DATASETS_ENV, str(path))  # a file where a folder should be: one line, no path
    with pytest.raises(DataError, match=r"^the shared datasets folder \(\$QCORE_SHARED_DATASETS\) cannot be used"):
        shared_images(normalized.clone(), MNIST, "abc")
