"""Shared fixtures. MNIST comes from ../shared/data unless QCORE_DATA_DIR says otherwise; tests that
need it fail (never skip) when it is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("QCORE_DATA_DIR", str((ROOT / ".." / "shared" / "data").resolve()))


@pytest.fixture(scope="session")
def mnist():
    from qcore.data import load_mnist

    return load_mnist(download=False)


@pytest.fixture(scope="session")
def pretrained():
    from qcore.checkpoint import load_model

    return load_model()


@pytest.fixture(scope="session")
def float_eval(pretrained, mnist):
    from qcore.evaluate import evaluate

    return evaluate(pretrained, mnist.test)
