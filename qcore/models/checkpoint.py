"""Save and load state_dicts of the zoo's architectures. Loading treats every file as hostile.

`load_state_dict` is the one door for checkpoints (the CLI and the app both use it). A file is told
apart by its content, never its name: a zip-format torch checkpoint or a safetensors file. In order, it
1. bounds the work: the file's size, then (for a zip) the number of entries and their declared
   uncompressed sizes, read from the central directory before anything is inflated, or (for
   safetensors) the header's size and its number of tensors, before the tensors are read;
2. names what the file is when it is neither (text, plain pickle, TorchScript, some other zip or binary);
3. copies the validated zip entries into a fresh uncompressed zip, so torch's reader only ever sees an
   archive we built from bounded, CRC-checked bytes;
4. unpickles with weights_only (no code runs), or reads safetensors with the safetensors library
   (which parses no pickle and checks every tensor's offsets against the file), and turns every
   exception into CheckpointError;
5. checks the result is a state_dict of the expected architecture (the notebook's Net unless a zoo
   model is named): dense, finite CPU tensors of the right shapes and dtypes, BatchNorm variances not
   negative, and that a forward pass on a few probe images stays finite.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from qcore.data import DATASETS, MNIST, DatasetSpec
from qcore.files import JsonFileError, read_json, shorten
from qcore.models.net import Net
from qcore.models.zoo import DEFAULT_MODEL, zoo_model

PRETRAINED_PATH = zoo_model(DEFAULT_MODEL).checkpoint
# Keys some training scripts wrap a state_dict in; the first found is used.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")

# The notebook's Net saved by torch.save is 1.73 MB in 14 entries, stored uncompressed; the zoo's
# residual net is 0.3 MB in about 60 (one per tensor, BatchNorm's five each). The bounds leave room
# for wrapped state_dicts (an epoch counter, a small optimizer state) and nothing more.
MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_ENTRIES = 128
MAX_TOTAL_UNCOMPRESSED = 8 * 1024 * 1024
MAX_PICKLE_BYTES = 1024 * 1024
# a safetensors header is JSON naming each tensor's dtype, shape and offsets: about 100 bytes per
# tensor, so 6 kB for the residual net; the bound is read from the first 8 bytes before any parsing
MAX_SAFETENSORS_HEADER = 64 * 1024
PROBE_IMAGES = 8


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; `problems` lists every reason found, each one line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = [shorten(problem, 300) for problem in problems]
        super().__init__("; ".join(self.problems))


def expected_state(build: Callable[[], nn.Module] = Net) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every key of the architecture's state_dict with its shape and dtype."""
    return {key: (tuple(value.shape), value.dtype) for key, value in build().state_dict().items()}


def save_checkpoint(model: nn.Module, path: str | os.PathLike[str] | BinaryIO) -> None:
    """Save a plain state_dict (CPU tensors), loadable by the notebook's Net."""
    state = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
    torch.save(state, path)


def checkpoint_bytes(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    save_checkpoint(model, buffer)
    return buffer.getvalue()


# --- what is this file? ------------------------------------------------------------------------


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _describe_non_zip(data: bytes) -> str:
    """A one-line reason naming what a file that is not a zip archive is."""
    if not data:
        return "an empty file (0 bytes), not a PyTorch checkpoint"
    if data[:1] == b"\x80" and len(data) > 1 and 2 <= data[1] <= 5:
        return (
            "a plain pickle (or PyTorch's legacy pre-1.6 format), not a zip-format checkpoint; "
            "save it with torch.save(model.state_dict(), path) from PyTorch 1.6 or later"
        )
    if data[:1] == b"\x08":  # how every ONNX file starts (its IR version), but this one did not parse as one
        return "a damaged or truncated ONNX file (it starts like one, but its protobuf does not parse)"
    if b"\x00" not in data[:4096]:
        try:
            data[:4096].decode("utf-8")
        except UnicodeDecodeError as error:
            if error.start < 4092:  # a cut multi-byte character at the end still counts as text
                return "a binary file of an unknown format, not a PyTorch checkpoint"
        return f"a text file ({len(data)} bytes), not a PyTorch checkpoint"
    return "a binary file of an unknown format, not a PyTorch checkpoint"


def _read_bounded_zip(data: bytes) -> dict[str, bytes]:
    """Every entry's bytes, refusing before inflating anything whose
    declared size or count is out of bounds. zipfile stops at each entry's declared size and checks
    its CRC, so the bytes read are bounded by what was checked."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        entries = archive.infolist()
    except Exception as error:  # noqa: BLE001 - hostile bytes can raise anything in zipfile; all mean "damaged"
        raise CheckpointError([f"a damaged zip archive, not a PyTorch checkpoint ({_reason(error)})"]) from None
    if len(entries) > MAX_ENTRIES:
        raise CheckpointError([f"a zip archive of {len(entries)} entries; a zoo checkpoint has at most about 60"])
    declared = sum(max(entry.file_size, 0) for entry in entries)
    if declared > MAX_TOTAL_UNCOMPRESSED:
        raise CheckpointError(
            [
                f"a zip archive that would inflate to {_mb(declared)} "
                f"(the largest zoo checkpoint is about 1.7 MB; at most {_mb(MAX_TOTAL_UNCOMPRESSED)} is accepted)"
            ]
        )
    names = [entry.filename for entry in entries]
    pickles = [name for name in names if name.endswith("/data.pkl") and name.count("/") == 1]
    if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
        raise CheckpointError(
            ["a TorchScript archive (torch.jit.save), not a state_dict; save model.state_dict() with torch.save"]
        )
    if len(pickles) != 1:
        raise CheckpointError(["a zip archive that is not a PyTorch checkpoint (no single */data.pkl entry)"])
    top = pickles[0].split("/", 1)[0]
    if any(not name.startswith(top + "/") for name in names):
        raise CheckpointError(["a zip archive that mixes a PyTorch checkpoint with other folders"])
    pickle_entry = next(entry for entry in entries if entry.filename == pickles[0])
    if pickle_entry.file_size > MAX_PICKLE_BYTES:
        raise CheckpointError(
            [f"a checkpoint whose data.pkl declares {_mb(pickle_entry.file_size)}; a state_dict's is a few kB"]
        )
    contents: dict[str, bytes] = {}
    try:
        for entry in entries:
            if entry.is_dir():
                continue
            with archive.open(entry) as member:
                contents[entry.filename] = member.read(entry.file_size + 1)
            if len(contents[entry.filename]) != entry.file_size:
                raise CheckpointError([f"a damaged zip archive: {shorten(entry.filename)} is not its declared size"])
    except CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - bad CRC, bad deflate stream, encryption...: all mean "damaged"
        raise CheckpointError([f"a damaged zip archive, not a PyTorch checkpoint ({_reason(error)})"]) from None
    return contents


def _rebuilt_archive(contents: dict[str, bytes]) -> bytes:
    """A fresh uncompressed zip of the checked entries: torch's own reader sees only this."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as rebuilt:
        for name, payload in contents.items():
            rebuilt.writestr(zipfile.ZipInfo(name), payload)
    return buffer.getvalue()


def _reason(error: BaseException) -> str:
    text = str(error).split("\n", 1)[0].split(". ")[0].strip()
    return shorten(text or type(error).__name__, 120)


def _unpickling_problem(error: Exception) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    if not found:  # a stream the unpickler cannot parse at all: damaged, not dangerous
        return f"a damaged PyTorch checkpoint (its pickle cannot be read: {_reason(error)})"
    name = shorten(found.group(1))
    if name.startswith(("torch.nn.", "qcore.", "__main__.")) or name.endswith(".Net"):
        return (
            f"a whole pickled model ({name}), not a state_dict; "
            "save it with torch.save(model.state_dict(), path) and upload that"
        )
    return (
        f"refused: the file asks to run or build {name} while loading, which a weights-only "
        "checkpoint never needs (it may be malicious); only plain state_dicts of tensors are accepted"
    )


def _check_size(size: int) -> None:
    if size > MAX_FILE_BYTES:
        raise CheckpointError(
            [
                f"a file of {_mb(size)}; the largest zoo checkpoint is 1.7 MB "
                f"and at most {_mb(MAX_FILE_BYTES)} is accepted"
            ]
        )


def _is_safetensors(data: bytes) -> bool:
    """safetensors' layout: a little-endian u64 header size, then that many bytes of JSON."""
    if len(data) < 10:
        return False
    (header_size,) = struct.unpack("<Q", data[:8])
    return 2 <= header_size <= len(data) - 8 and data[8:9] == b"{"


def _read_safetensors(data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, its header bounded before it is parsed."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > MAX_SAFETENSORS_HEADER:
        raise CheckpointError(
            [
                f"a safetensors file whose header declares {header_size} bytes "
                f"(a zoo state_dict's is about 6 kB; at most {MAX_SAFETENSORS_HEADER} are accepted)"
            ]
        )
    try:
        # the header is JSON from a hostile file: the bounded reader (depth, digits, length), never json.loads
        text = data[8 : 8 + header_size].decode("utf-8")
        header = read_json(text, "the safetensors header", MAX_SAFETENSORS_HEADER)
    except UnicodeDecodeError as error:
        raise CheckpointError([f"a damaged safetensors file (its header is not text: {_reason(error)})"]) from None
    except JsonFileError as error:
        raise CheckpointError([f"a damaged safetensors file ({error})"]) from None
    if not isinstance(header, dict):
        raise CheckpointError(["a damaged safetensors file (its header is not a JSON object)"])
    tensors = len(header) - ("__metadata__" in header)
    if tensors > MAX_ENTRIES:
        raise CheckpointError([f"a safetensors file of {tensors} tensors; a zoo checkpoint has at most about 60"])
    try:
        return load(data)
    except (SafetensorError, ValueError, TypeError, RuntimeError) as error:
        raise CheckpointError([f"a damaged safetensors file ({_reason(error)})"]) from None


def _parse_checkpoint(data: bytes) -> object:
    _check_size(len(data))
    if _is_safetensors(data):
        return _read_safetensors(data)
    if data[:4] != b"PK\x03\x04":
        raise CheckpointError([_describe_non_zip(data)])
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise CheckpointError(["a truncated or damaged zip archive (its end is missing): the file was cut short"])
    archive = _rebuilt_archive(_read_bounded_zip(data))
    try:
        with warnings.catch_warnings():  # torch warns on stderr about formats we refuse anyway
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(archive), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        raise CheckpointError([_unpickling_problem(error)]) from None
    except Exception as error:  # noqa: BLE001 - torch's reader and unpickler raise many types on hostile input
        raise CheckpointError([f"a damaged PyTorch checkpoint ({_reason(error)})"]) from None


# --- is it this Net's state_dict? -----------------------------------------------------------------


def _short_list(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(shorten(name, 40) for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def validate_state_dict(
    state: object, build: Callable[[], nn.Module] = Net, dataset: DatasetSpec = MNIST
) -> dict[str, torch.Tensor]:
    """Return `state` as a state_dict of `build`'s architecture, or raise CheckpointError listing
    exactly what is wrong."""
    if isinstance(state, dict) and isinstance(state.get("format"), str) and state["format"].startswith("qlab-qat/"):
        raise CheckpointError(
            [
                "a quantization-aware-trained (QAT) checkpoint, which carries its own quantization: "
                "use qcore.training.qat"
            ]
        )
    if isinstance(state, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise CheckpointError([f"a pickled {type(state).__name__}, not a state_dict (a dict of tensors)"])
    problems: list[str] = []
    expected = expected_state(build)
    missing = [key for key in expected if key not in state]
    unexpected = [str(key) for key in state if key not in expected]
    if missing:
        problems.append(f"missing keys: {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short_list(unexpected)}")
    for key, (shape, dtype) in expected.items():
        if key not in state:
            continue
        value = state[key]
        if type(value) not in (torch.Tensor, torch.nn.Parameter):
            problems.append(f"{key}: expected a tensor, found {type(value).__name__}")
            continue
        if value.layout != torch.strided or value.is_quantized or value.device.type != "cpu":
            problems.append(f"{key}: a {value.layout} {value.device.type} tensor, expected a dense CPU tensor")
            continue
        if tuple(value.shape) != shape:
            problems.append(f"{key}: shape {list(value.shape)}, expected {list(shape)}")
        if value.dtype != dtype:
            problems.append(f"{key}: dtype {value.dtype}, expected {dtype}")
        elif not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            problems.append(f"{key}: {bad} non-finite value(s) (NaN or inf)")
        elif key.endswith("running_var") and bool((value < 0).any()):
            problems.append(f"{key}: {int((value < 0).sum())} negative BatchNorm variance(s)")
    if problems:
        raise CheckpointError(problems)
    clean = {key: state[key].detach().clone().contiguous() for key in expected}
    _check_forward_is_finite(clean, build, dataset)
    return clean


def probe_images(dataset: DatasetSpec = MNIST) -> torch.Tensor:
    """A few inputs spanning what the dataset's normalization can produce: all background, all ink,
    and seeded random pixels; no data files needed, so the check works wherever loading does."""
    low, high = (0.0 - dataset.mean) / dataset.std, (1.0 - dataset.mean) / dataset.std
    generator = torch.Generator().manual_seed(0)
    random = low + (high - low) * torch.rand(PROBE_IMAGES - 2, 1, 28, 28, generator=generator)
    return torch.cat([torch.full((1, 1, 28, 28), low), torch.full((1, 1, 28, 28), high), random])


def _check_forward_is_finite(
    state: dict[str, torch.Tensor], build: Callable[[], nn.Module], dataset: DatasetSpec
) -> None:
    model = build()
    model.load_state_dict(state)
    with torch.inference_mode():
        logits = model.eval()(probe_images(dataset))
    if not bool(torch.isfinite(logits).all()):
        largest = max(float(value.abs().max()) for value in state.values())
        raise CheckpointError(
            [
                f"weights whose forward pass overflows (the largest weight is {largest:.3g}): "
                "the network's outputs are not finite on ordinary images"
            ]
        )


def read_checkpoint(source: str | os.PathLike[str] | bytes | BinaryIO) -> object:
    """Steps 1 to 4 of the module's docstring: the unpickled (tensors-only) object, not yet validated."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise CheckpointError([f"no such checkpoint file: {shorten(source)}"])
        try:
            _check_size(path.stat().st_size)  # before reading: a huge file is never loaded
            data = path.read_bytes()
        except OSError as error:
            raise CheckpointError([f"cannot read {shorten(source)}: {error.strerror}"]) from None
    elif isinstance(source, bytes):
        data = source
    else:
        data = source.read(MAX_FILE_BYTES + 1)
    return _parse_checkpoint(data)


def load_state_dict(
    source: str | os.PathLike[str] | bytes | BinaryIO, model_name: str = DEFAULT_MODEL
) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely (see the module's docstring) and validate it against the zoo
    model's architecture (the notebook's Net by default)."""
    spec = zoo_model(model_name)
    return validate_state_dict(read_checkpoint(source), spec.build, DATASETS[spec.dataset])


def model_from_state(state: object, model_name: str = DEFAULT_MODEL) -> nn.Module:
    """The zoo model's architecture in eval mode from an unpickled checkpoint (read_checkpoint),
    validated as its state_dict."""
    spec = zoo_model(model_name)
    model = spec.build()
    model.load_state_dict(validate_state_dict(state, spec.build, DATASETS[spec.dataset]))
    return model.eval()


def load_model(
    source: str | os.PathLike[str] | bytes | BinaryIO | None = None, model_name: str = DEFAULT_MODEL
) -> nn.Module:
    """The zoo model `model_name` in eval mode from `source`, or its bundled checkpoint when source is None."""
    return model_from_state(read_checkpoint(zoo_model(model_name).checkpoint if source is None else source), model_name)


def bundled_identity(zoo: str, model: nn.Module) -> str:
    """A zoo model's identity as the app and its result store key it: the zoo name and its fingerprint."""
    return f"{zoo}-{fingerprint(model)}"


def fingerprint(model: nn.Module) -> str:
    """A short content hash of everything in the model that decides its outputs, to key caches and the
    shared store by: its operations (an fx module's generated code: their order and functions; each
    submodule's type and settings: stride, padding, pooling) and its weights. Two uploads with one
    set of weights in different graphs (a ReLU dropped, average instead of max pooling) were one model."""
    import hashlib

    digest = hashlib.sha256()
    for name, module in model.named_modules():
        kind = type(module)
        digest.update(f"{name}|{kind.__module__}.{kind.__qualname__}|{module.extra_repr()}\n".encode())
        if isinstance(module, torch.fx.GraphModule):
            digest.update(module.code.encode())
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
