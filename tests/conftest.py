"""Shared fixtures. MNIST comes from ../shared/data unless QCORE_DATA_DIR says otherwise; tests that
need it fail (never skip) when it is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("QCORE_DATA_DIR", str((ROOT / ".." / "shared" / "data").resolve()))


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """`python -m qcore ARGS` as a user runs it, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "qcore", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@pytest.fixture(scope="session")
def mnist():
    from qcore.data import load_mnist

    return load_mnist(download=False)


@pytest.fixture(scope="session")
def pretrained():
    from qcore.models.checkpoint import load_model

    return load_model()


@pytest.fixture(scope="session")
def float_eval(pretrained, mnist):
    from qcore.inference.evaluate import evaluate

    return evaluate(pretrained, mnist.test)


@pytest.fixture(scope="session")
def w3a3_diagnosis(pretrained, mnist, float_eval):
    """qcore.analysis.diagnose at W3A3 (about 25 s), shared by the diagnosis, CLI and AppTest checks."""
    from qcore.analysis.diagnose import diagnose
    from qcore.config import QuantConfig

    return diagnose(pretrained, mnist, QuantConfig(weight_bits=3, act_bits=3), float_eval.accuracy)


@pytest.fixture(scope="session")
def w2a8_all_methods(pretrained, mnist):
    """The bundled net at W2A8 with equalization, AdaRound and bias correction (about 20 s of AdaRound),
    shared by the methods goals, the regression and the Methods page's check."""
    from qcore.analysis.tables import quantize_for
    from qcore.config import QuantConfig

    return quantize_for(
        pretrained, mnist, QuantConfig(weight_bits=2, methods=("equalization", "adaround", "bias-correction"))
    )
