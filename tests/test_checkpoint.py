"""The loader accepts Net state_dicts and refuses everything else with its own message."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import struct
import subprocess
import sys
import warnings
import zipfile

import pytest
import torch

from qcore.models.checkpoint import (
    PRETRAINED_PATH,
    CheckpointError,
    checkpoint_bytes,
    fingerprint,
    load_model,
    load_state_dict,
    save_checkpoint,
)
from qcore.models.net import Net
from tests.conftest import ROOT


class CodeOnLoad:
    """A pickle payload that would create a file when unpickled without weights_only."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mknod, (self.path,))


def test_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Net()
    save_checkpoint(model, tmp_path / "net.pt")
    loaded = load_model(tmp_path / "net.pt")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert fingerprint(loaded) == fingerprint(model)


def test_bundled_checkpoint_is_small_and_loads():
    assert PRETRAINED_PATH.stat().st_size < 2 * 1024 * 1024
    assert isinstance(load_model(), Net)


def test_notebook_style_save_loads_unchanged():
    torch.manual_seed(1)
    model = Net()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)  # what the notebook does
    assert set(load_state_dict(buffer.getvalue())) == set(model.state_dict())


def test_code_running_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"conv1.weight": CodeOnLoad(str(marker))}, buffer)
    with pytest.raises(CheckpointError, match="refused") as error:
        load_state_dict(buffer.getvalue())
    assert "mknod" in str(error.value)
    assert not marker.exists()


def test_whole_pickled_module_is_refused_with_advice():
    buffer = io.BytesIO()
    torch.save(Net(), buffer)
    with pytest.raises(CheckpointError, match=r"model\.state_dict\(\)"):
        load_state_dict(buffer.getvalue())


def test_truncated_file_is_refused():
    data = checkpoint_bytes(Net())
    with pytest.raises(CheckpointError, match="truncated or damaged zip archive"):
        load_state_dict(data[: len(data) // 2])


def test_wrong_shape_lists_each_bad_key():
    state = Net().state_dict()
    state["fc1.weight"] = torch.zeros(10, 800)
    state["conv2.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as error:
        load_state_dict(_saved(state))
    assert error.value.problems == [
        "conv2.bias: shape [3], expected [50]",
        "fc1.weight: shape [10, 800], expected [500, 800]",
    ]


def test_nan_weights_are_refused():
    state = Net().state_dict()
    state["fc2.weight"][3, 4] = float("nan")
    state["conv1.bias"][0] = float("inf")
    with pytest.raises(CheckpointError) as error:
        load_state_dict(_saved(state))
    assert error.value.problems == [
        "conv1.bias: 1 non-finite value(s) (NaN or inf)",
        "fc2.weight: 1 non-finite value(s) (NaN or inf)",
    ]


def test_missing_and_unexpected_keys_and_dtype():
    state = Net().state_dict()
    del state["fc2.bias"]
    state["extra"] = torch.zeros(1)
    state["conv1.weight"] = state["conv1.weight"].double()
    with pytest.raises(CheckpointError) as error:
        load_state_dict(_saved(state))
    assert error.value.problems == [
        "missing keys: fc2.bias",
        "unexpected keys: extra",
        "conv1.weight: dtype torch.float64, expected torch.float32",
    ]


def test_wrapped_state_dict_is_accepted():
    state = Net().state_dict()
    assert set(load_state_dict(_saved({"state_dict": state, "epoch": 3}))) == set(state)


def test_missing_file():
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_state_dict("/nonexistent/net.pt")


# --- hostile files: each refused with a one-line reason that names what the file is ------------


def _state_with(key: str, value: object) -> bytes:
    state: dict[str, object] = dict(Net().state_dict())
    state[key] = value
    return _saved(state)


def _torchscript() -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated; this file is only an example to refuse
        torch.jit.save(torch.jit.script(Net()), buffer)
    return buffer.getvalue()


def _safetensors_file(header: object, payload: bytes) -> bytes:
    """safetensors' layout, written by hand: a u64 header size, the JSON header, the tensors' bytes."""
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + payload


def _safetensors() -> bytes:  # a valid safetensors file, of one tensor only
    return _safetensors_file({"fc2.bias": {"dtype": "F32", "shape": [10], "data_offsets": [0, 40]}}, bytes(40))


HOSTILE = {
    "one byte a": (lambda: b"a", "a text file"),
    "one byte G": (lambda: b"G", "a text file"),
    "two bytes": (lambda: b"h.", "a text file"),
    "text file": (lambda: b"conv1.weight = [0.1, 0.2]\n" * 20, "a text file"),
    "empty": (lambda: b"", "an empty file"),
    "raw pickle": (lambda: pickle.dumps({"conv1.weight": [0.0]}), "a plain pickle"),
    "torchscript": (_torchscript, "a TorchScript archive"),
    "safetensors": (_safetensors, "missing keys: conv1.weight"),
    "other zip": (lambda: _zip({"readme.txt": b"hello"}), "not a PyTorch checkpoint"),
    "None value": (lambda: _state_with("fc1.bias", None), "fc1.bias: expected a tensor, found NoneType"),
    "sparse tensor": (
        lambda: _state_with("fc2.bias", torch.zeros(10).to_sparse()),
        "fc2.bias: a torch.sparse_coo cpu tensor, expected a dense CPU tensor",
    ),
    "overflowing weights": (
        lambda: _state_with("fc1.weight", torch.full((500, 800), 3e38)),
        "weights whose forward pass overflows",
    ),
    "a list": (lambda: _saved([torch.zeros(1)]), "a pickled list, not a state_dict"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_files_are_named_in_one_line(case):
    make, reason = HOSTILE[case]
    with pytest.raises(CheckpointError) as error:
        load_state_dict(make())
    assert reason in str(error.value)
    assert "\n" not in str(error.value)


def test_finite_but_large_weights_that_stay_finite_load():
    # the forward check refuses overflow, not size: weights 1e3 times larger still give finite logits
    state = {key: value * 1e3 for key, value in Net().state_dict().items()}
    assert set(load_state_dict(_saved(state))) == set(state)


def _zip(entries: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, payload in entries.items():
            archive.writestr(name, payload)
    return buffer.getvalue()


def zip_bomb(inflated: int = 1 << 30) -> bytes:
    """A torch-layout zip of about 1 MB whose data.pkl inflates to `inflated` bytes of zeros."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo("archive/data.pkl")
        info.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(info, "w", force_zip64=True) as member:
            chunk = bytes(16 << 20)
            for _ in range(inflated // len(chunk)):
                member.write(chunk)
        archive.writestr("archive/version", "3\n")
    return buffer.getvalue()


@pytest.mark.slow
def test_zip_bomb_is_refused_from_its_declared_size():
    bomb = zip_bomb()
    assert len(bomb) < 2_000_000
    with pytest.raises(CheckpointError, match=r"would inflate to 1073\.7 MB"):
        load_state_dict(bomb)


def test_zip_that_lies_about_its_size_is_refused():
    # declares 819 bytes (a real data.pkl's size) in both headers but inflates to 64 MB: zipfile stops
    # at the declared size and the CRC check fails, so nothing past 819 bytes is ever produced
    real = checkpoint_bytes(Net())
    big = _zip({"archive/data.pkl": bytes(64 << 20), "archive/version": b"3\n"}, zipfile.ZIP_DEFLATED)
    size = zipfile.ZipFile(io.BytesIO(big)).getinfo("archive/data.pkl").file_size
    lying = big.replace(struct.pack("<I", size), struct.pack("<I", 819))
    assert lying != big and len(real) > 0
    with pytest.raises(CheckpointError, match="damaged zip archive"):
        load_state_dict(lying)


def test_zip_with_too_many_entries_is_refused():
    entries = {f"archive/data/{i}": b"x" for i in range(150)} | {"archive/data.pkl": b"x"}
    with pytest.raises(CheckpointError, match="151 entries"):
        load_state_dict(_zip(entries))


def test_fuzzed_checkpoints_load_or_raise_checkpoint_error():
    """200 random mutations of a valid file: truncations, byte flips and inserted bytes. Each must
    load (some flips only touch padding or a weight's low bits) or raise CheckpointError."""
    valid = checkpoint_bytes(Net())
    rng = random.Random(20261127)
    outcomes = {"loaded": 0, "refused": 0}
    for trial in range(200):
        data = bytearray(valid)
        kind = trial % 3
        if kind == 0:
            data = data[: rng.randrange(len(data))]
        elif kind == 1:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        else:
            position = rng.randrange(len(data))
            data[position:position] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        try:
            load_state_dict(bytes(data))
            outcomes["loaded"] += 1
        except CheckpointError as error:
            assert error.problems and all("\n" not in problem for problem in error.problems)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0 and sum(outcomes.values()) == 200


# the child's own peak (ru_maxrss starts from the forking test process's, so its growth read 0 in a big one)
MEASURE_BOMB = """
import sys
from qcore.models.checkpoint import CheckpointError, load_state_dict
from tests.hostile_files import own_peak_rss_bytes
data = open(sys.argv[1], "rb").read()
before = own_peak_rss_bytes()
try:
    load_state_dict(data)
except CheckpointError as error:
    print("refused", error)
print("peak_growth_kib", (own_peak_rss_bytes() - before) // 1024)
"""


@pytest.mark.slow
def test_zip_bomb_refusal_costs_little_memory(tmp_path):
    bomb = tmp_path / "bomb.pt"
    bomb.write_bytes(zip_bomb())
    done = subprocess.run(
        [sys.executable, "-c", MEASURE_BOMB, str(bomb)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert "refused" in done.stdout
    growth_kib = int(done.stdout.split("peak_growth_kib")[1])
    assert growth_kib < 50 * 1024  # the bound is 300 MB; the refusal reads only the central directory


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# --- safetensors -----------------------------------------------------------------------------------


def test_safetensors_state_dict_loads_the_same_tensors():
    from safetensors.torch import save

    state = Net().state_dict()
    loaded = load_state_dict(save(dict(state)))
    assert list(loaded) == list(state)
    assert all(torch.equal(loaded[key], value) and loaded[key].dtype == value.dtype for key, value in state.items())


def test_safetensors_of_a_batchnorm_zoo_model_loads_with_its_integer_counters():
    from safetensors.torch import save

    from qcore.models.zoo import zoo_model

    state = zoo_model("fashion-resnet").build().state_dict()  # num_batches_tracked is int64
    loaded = load_state_dict(save(dict(state)), "fashion-resnet")
    assert all(torch.equal(loaded[key], value) for key, value in state.items())


def test_safetensors_is_told_apart_by_content_not_name(tmp_path):
    from safetensors.torch import save

    path = tmp_path / "weights.pt"  # a safetensors file under a torch name
    path.write_bytes(save(dict(Net().state_dict())))
    assert set(load_state_dict(path)) == set(Net().state_dict())


SAFETENSORS_HOSTILE = {
    # offsets past the file's end: a tensor declared larger than the file holds, never allocated
    "beyond the end": (
        {"fc2.bias": {"dtype": "F32", "shape": [10], "data_offsets": [0, 4_000_000]}},
        bytes(40),
        "a damaged safetensors file",
    ),
    "shape larger than its bytes": (
        {"fc2.bias": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 40]}},
        bytes(40),
        "a damaged safetensors file",
    ),
    "two tensors on the same bytes": (
        {
            "fc2.bias": {"dtype": "F32", "shape": [10], "data_offsets": [0, 40]},
            "fc1.bias": {"dtype": "F32", "shape": [10], "data_offsets": [0, 40]},
        },
        bytes(40),
        "a damaged safetensors file",
    ),
    "unknown dtype": (
        {"fc2.bias": {"dtype": "X9", "shape": [10], "data_offsets": [0, 40]}},
        bytes(40),
        "a damaged safetensors file",
    ),
    "too many tensors": (
        {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(200)},
        bytes(800),
        "a safetensors file of 200 tensors",
    ),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_HOSTILE))
def test_hostile_safetensors_are_named_in_one_line(case):
    header, payload, reason = SAFETENSORS_HOSTILE[case]
    with pytest.raises(CheckpointError) as error:
        load_state_dict(_safetensors_file(header, payload))
    assert reason in str(error.value) and "\n" not in str(error.value)


def test_safetensors_header_size_is_bounded_before_parsing():
    # a 3 MB header (the file itself within the 4 MB limit) is refused from its first 8 bytes, unparsed
    declared = 3_000_000
    data = struct.pack("<Q", declared) + b"{" + b" " * (declared + 8)
    with pytest.raises(CheckpointError, match="header declares 3000000 bytes"):
        load_state_dict(data)


def test_half_precision_safetensors_are_refused_by_dtype():
    from safetensors.torch import save

    half = {key: value.half() for key, value in Net().state_dict().items()}
    with pytest.raises(CheckpointError, match=r"conv1.weight: dtype torch.float16, expected torch.float32"):
        load_state_dict(save(half))
