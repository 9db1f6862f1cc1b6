from __future__ import annotations

import pytest
import torch

from qcore.data import MNIST_MEAN, MNIST_STD, DataNotFoundError, load_split, normalize


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
