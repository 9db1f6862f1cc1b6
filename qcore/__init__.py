"""Quantization Lab's engine: train or load a model, calibrate, quantize, evaluate, analyse.

Never imports streamlit; the dashboard and the CLI both call these modules.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

__version__ = "0.2.0"


@cache
def code_version() -> str:
    """The package version and a hash of every qcore source file: a result stored by one version of the
    code is never served to another, even between two commits of the same release."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.relative_to(Path(__file__).parent).as_posix().encode())
        digest.update(path.read_bytes())
    return f"{__version__}+{digest.hexdigest()[:12]}"
