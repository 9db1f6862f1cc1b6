"""Save and load Net state_dicts safely: weights_only unpickling, then a full check against Net."""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import BinaryIO

import torch

from qcore.model import Net

PRETRAINED_PATH = Path(__file__).parent / "pretrained" / "mnist_net.pt"
# Keys some training scripts wrap a state_dict in; the first found is used.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; `problems` lists every reason found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def expected_state() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every key of Net's state_dict with its shape and dtype."""
    return {key: (tuple(value.shape), value.dtype) for key, value in Net().state_dict().items()}


def save_checkpoint(model: Net, path: str | os.PathLike[str] | BinaryIO) -> None:
    """Save a plain state_dict (CPU tensors), loadable by the notebook's Net."""
    state = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
    torch.save(state, path)


def checkpoint_bytes(model: Net) -> bytes:
    buffer = io.BytesIO()
    save_checkpoint(model, buffer)
    return buffer.getvalue()


def validate_state_dict(state: object) -> dict[str, torch.Tensor]:
    """Return `state` as a Net state_dict, or raise CheckpointError listing exactly what is wrong."""
    if isinstance(state, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise CheckpointError([f"expected a state_dict (a dict of tensors), found {type(state).__name__}"])
    problems: list[str] = []
    expected = expected_state()
    missing = [key for key in expected if key not in state]
    unexpected = [str(key) for key in state if key not in expected]
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    for key, (shape, dtype) in expected.items():
        value = state.get(key)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key}: expected a tensor, found {type(value).__name__}")
            continue
        if tuple(value.shape) != shape:
            problems.append(f"{key}: shape {list(value.shape)}, expected {list(shape)}")
        if value.dtype != dtype:
            problems.append(f"{key}: dtype {value.dtype}, expected {dtype}")
        elif not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            problems.append(f"{key}: {bad} non-finite value(s) (NaN or inf)")
    if problems:
        raise CheckpointError(problems)
    return {key: state[key] for key in expected}


_CORRUPT = "not a readable PyTorch checkpoint (truncated or corrupt file)"


def _unpickling_problem(error: Exception) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    if not found:  # a stream the unpickler cannot parse at all: damaged, not dangerous
        return _CORRUPT
    name = found.group(1)
    if name.startswith(("torch.nn.", "qcore.", "__main__.")) or name.endswith(".Net"):
        return (
            f"this file holds a whole pickled model ({name}), not a state_dict; "
            "save it with torch.save(model.state_dict(), path) and upload that"
        )
    return (
        f"refused: the file asks to run or build {name} while loading, which a weights-only "
        "checkpoint never needs (it may be malicious); only plain state_dicts of tensors are accepted"
    )


def load_state_dict(source: str | os.PathLike[str] | bytes | BinaryIO) -> dict[str, torch.Tensor]:
    """Read a checkpoint with weights_only unpickling and validate it against Net."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)) and not Path(source).is_file():
        raise CheckpointError([f"no such checkpoint file: {source}"])
    try:
        state = torch.load(source, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        raise CheckpointError([_unpickling_problem(error)]) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
        detail = str(error).split(". ")[0].strip()
        raise CheckpointError([f"{_CORRUPT}: {detail}" if detail else _CORRUPT]) from error
    return validate_state_dict(state)


def load_model(source: str | os.PathLike[str] | bytes | BinaryIO | None = None) -> Net:
    """A Net in eval mode from `source`, or the bundled pretrained net when source is None."""
    model = Net()
    model.load_state_dict(load_state_dict(PRETRAINED_PATH if source is None else source))
    return model.eval()


def fingerprint(model: Net) -> str:
    """A short content hash of the weights, to key caches by model."""
    import hashlib

    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
