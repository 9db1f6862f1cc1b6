"""The loader accepts Net state_dicts and refuses everything else with its own message."""

from __future__ import annotations

import io
import os

import pytest
import torch

from qcore.checkpoint import (
    PRETRAINED_PATH,
    CheckpointError,
    checkpoint_bytes,
    fingerprint,
    load_model,
    load_state_dict,
    save_checkpoint,
)
from qcore.model import Net


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
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
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


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
