"""The QAT checkpoint: writing a finished run, and reading a file back as strictly as a state_dict."""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from typing import BinaryIO

import torch
from torch import nn

from qcore.files import JsonFileError, read_json, shorten
from qcore.graph import model_graph
from qcore.models.checkpoint import (
    CheckpointError,
    fingerprint,
    load_model,
    model_from_state,
    probe_images,
    read_checkpoint,
    validate_state_dict,
)
from qcore.models.net import LAYER_NAMES, Net, layer
from qcore.models.zoo import DEFAULT_MODEL, zoo_model
from qcore.quantize.config import ConfigError, QuantConfig
from qcore.quantize.qmodel import (
    QuantizedNet,
    config_plan,
    point_bits,
)
from qcore.quantize.quant import Scheme, integer_range
from qcore.training.qat.config import HISTOGRAM_BINS, MIN_SCALE, QatConfig
from qcore.training.qat.network import to_quantized_net
from qcore.training.qat.training import QatResult
from qcore.training.train import MAX_EPOCHS

QAT_FORMAT = "qlab-qat/1"
MAX_META_CHARS = 200_000

#
# torch.save of a dict of plain values and tensors (torch.load(..., weights_only=True) reads it):
#   format: "qlab-qat/1"; config: the QuantConfig as JSON (the defaults at the trained bits);
#   meta: JSON (how it was trained: settings, times, the held-out curve, weight snapshots);
#   float_weights: the Net state_dict of the trained float weights;
#   qparams: {layer: {"weight_scale": float32 [O], "input_scale": float32 [], "input_zero_point": int64 []}}.
# The integer weights and int32 biases are not stored: they follow from these exactly (round to
# nearest at the stored scales), and storing them twice would let a file contradict itself.

QPARAM_KEYS = ("weight_scale", "input_scale", "input_zero_point")


@dataclass
class QatCheckpoint:
    """A loaded QAT checkpoint: the quantized model as trained, ready for every engine and export."""

    model: Net  # the trained float weights
    qnet: QuantizedNet
    config: QuantConfig
    meta: dict[str, object]

    def trained_for(self, config: QuantConfig) -> QuantizedNet | None:
        """The trained model when `config` is the one it was trained for; None means any other config,
        which calibrates the float weights afresh (PTQ)."""
        return self.qnet if config == self.config else None


def qat_state(trained: QatResult | QatCheckpoint) -> dict[str, object]:
    """What a QAT checkpoint file holds, for a finished run or a loaded checkpoint."""
    meta = trained.meta() if isinstance(trained, QatResult) else trained.meta
    qparams = {
        name: {
            "weight_scale": quant.weight_qparams.scale.clone(),
            "input_scale": quant.input_qparams.scale.clone().reshape(()),
            "input_zero_point": quant.input_qparams.zero_point.clone().to(torch.int64).reshape(()),
        }
        for name, quant in trained.qnet.layers.items()
        if quant.weight_qparams is not None and quant.input_qparams is not None
    }
    return {
        "format": QAT_FORMAT,
        "config": trained.qnet.config.to_json(),
        "meta": json.dumps(meta),
        "float_weights": {key: value.clone() for key, value in trained.model.state_dict().items()},
        "qparams": qparams,
    }


def qat_bytes(trained: QatResult | QatCheckpoint) -> bytes:
    buffer = io.BytesIO()
    torch.save(qat_state(trained), buffer)
    return buffer.getvalue()


def _check_qparams(raw: object, config: QuantConfig, problems: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    if not isinstance(raw, dict) or sorted(map(str, raw)) != sorted(LAYER_NAMES):
        problems.append(f"qparams must hold exactly the layers {', '.join(LAYER_NAMES)}")
        return {}
    graph = model_graph(Net())
    plan = config_plan(graph, config)
    bits = point_bits(graph, plan, config)
    input_bits = {name: bits[plan.layer_input[name]] for name in LAYER_NAMES}
    input_range = {name: integer_range(input_bits[name], Scheme.ASYMMETRIC) for name in LAYER_NAMES}
    channels = {name: shape[0] for name, (shape, _) in _weight_shapes().items()}
    checked = {}
    for name in LAYER_NAMES:
        entry = raw[name]
        if not isinstance(entry, dict) or sorted(map(str, entry)) != sorted(QPARAM_KEYS):
            problems.append(f"qparams.{name} must hold exactly {', '.join(QPARAM_KEYS)}")
            continue
        expected = {
            "weight_scale": ((channels[name],), torch.float32),
            "input_scale": ((), torch.float32),
            "input_zero_point": ((), torch.int64),
        }
        good = True
        for key, (shape, dtype) in expected.items():
            value = entry[key]
            where = f"qparams.{name}.{key}"
            if type(value) is not torch.Tensor or value.layout != torch.strided or value.device.type != "cpu":
                problems.append(f"{where}: expected a dense CPU tensor")
                good = False
            elif tuple(value.shape) != shape or value.dtype != dtype:
                problems.append(f"{where}: {value.dtype} of shape {list(value.shape)}, expected {dtype} {list(shape)}")
                good = False
            elif dtype == torch.float32 and not bool((torch.isfinite(value) & (value > MIN_SCALE)).all()):
                problems.append(f"{where}: scales must be finite and above {MIN_SCALE:g}")
                good = False
            elif dtype == torch.int64 and not input_range[name][0] <= int(value) <= input_range[name][1]:
                amin, amax = input_range[name]
                problems.append(f"{where}: {int(value)} is outside the {input_bits[name]}-bit range [{amin}, {amax}]")
                good = False
        if good:
            checked[name] = {key: entry[key].clone() for key in QPARAM_KEYS}
    return checked


def _weight_shapes() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {name: (tuple(layer(Net(), name).weight.shape), torch.float32) for name in LAYER_NAMES}


def claims_qat(state: object) -> bool:
    """Whether an unpickled checkpoint says it is a QAT checkpoint (qat_from_state checks the rest)."""
    return isinstance(state, dict) and state.get("format") == QAT_FORMAT


def load_qat(source: str | os.PathLike[str] | bytes | BinaryIO) -> QatCheckpoint:
    """Read a QAT checkpoint as strictly as a state_dict (same file bounds, tensors only); see qat_from_state."""
    return qat_from_state(read_checkpoint(source))


def load_checkpoint(
    source: str | os.PathLike[str] | bytes | BinaryIO | None, model_name: str = DEFAULT_MODEL
) -> tuple[nn.Module, QatCheckpoint | None]:
    """Any checkpoint the lab takes for zoo model `model_name`, read once: a state_dict of its
    architecture gives (model, None), a QAT checkpoint (its float weights, the checkpoint); None
    gives the model's bundled checkpoint. QAT checkpoints are saved for the notebook's net only."""
    if source is None:
        return load_model(None, model_name), None
    state = read_checkpoint(source)
    if claims_qat(state):
        if not zoo_model(model_name).is_notebook_net:
            raise CheckpointError(
                [
                    f"a QAT checkpoint, which holds the notebook's net; "
                    f"{model_name} takes a state_dict of its own architecture"
                ]
            )
        checkpoint = qat_from_state(state)
        return checkpoint.model, checkpoint
    return model_from_state(state, model_name), None


def qat_from_state(state: object) -> QatCheckpoint:
    """Check every field of an unpickled QAT checkpoint, rebuild the quantized model and check it runs
    finite on probe images and fits the integer engine. Any problem raises CheckpointError listing each."""
    if not claims_qat(state):
        raise CheckpointError([f"not a QAT checkpoint (expected format {QAT_FORMAT})"])
    assert isinstance(state, dict)
    expected_keys = ["config", "float_weights", "format", "meta", "qparams"]
    if sorted(map(str, state)) != expected_keys:
        raise CheckpointError([f"a QAT checkpoint holds exactly {', '.join(expected_keys)}"])
    problems: list[str] = []
    config_json, meta_json = state["config"], state["meta"]
    config = QuantConfig()
    try:
        config = QuantConfig.from_json(config_json)  # bounded JSON, exact types, validated
    except ConfigError as error:
        problems.append(f"config: {shorten(error, 200)}")
    else:
        as_trained = QatConfig(config.weight_bits, config.act_bits, config.edge_bits, config.add_bits)
        if config != as_trained.quant_config() or as_trained.problems():
            problems.append("config: a QAT model uses the default QuantConfig at 2 to 8 bits (as trained)")
    meta: dict[str, object] = {}
    try:
        loaded = read_json(meta_json, "meta", MAX_META_CHARS)
    except JsonFileError as error:
        problems.append(str(error))
    else:
        if isinstance(loaded, dict):
            meta = loaded
        else:
            problems.append("meta must be a JSON object")
    try:
        weights = validate_state_dict(state["float_weights"]) if isinstance(state["float_weights"], dict) else None
    except CheckpointError as error:
        problems.extend(f"float_weights: {problem}" for problem in error.problems)
        weights = None
    if weights is None and not any(p.startswith("float_weights") for p in problems):
        problems.append("float_weights must be a Net state_dict")
    qparams = _check_qparams(state["qparams"], config, problems)
    if problems:
        raise CheckpointError(problems)
    assert weights is not None
    model = Net()
    model.load_state_dict(weights)
    qnet = to_quantized_net(model.eval(), qparams, config)
    with torch.inference_mode():
        if not bool(torch.isfinite(qnet(probe_images())).all()):
            raise CheckpointError(["its quantized forward pass is not finite on ordinary images"])
    from qcore.inference.integer import IntegerEngineError, IntegerNet

    try:
        IntegerNet(qnet)
    except IntegerEngineError as error:
        raise CheckpointError([f"it does not fit the integer engine: {error}"]) from None
    return QatCheckpoint(model.eval(), qnet, config, meta)


def valid_snapshots(meta: dict[str, object]) -> list[dict[str, object]]:
    """The weight snapshots of a checkpoint's meta, or [] when they are not exactly what qat() writes
    (meta comes from a file: nothing in it is drawn unless it is plain numbers of the right shape)."""
    snapshots = meta.get("snapshots")
    if not isinstance(snapshots, list) or len(snapshots) > MAX_EPOCHS + 1:
        return []
    for snapshot in snapshots:
        if not isinstance(snapshot, dict) or not isinstance(snapshot.get("epoch"), int):
            return []
        layers = snapshot.get("layers")
        if not isinstance(layers, dict) or sorted(layers) != sorted(LAYER_NAMES):
            return []
        for entry in layers.values():
            counts = entry.get("counts") if isinstance(entry, dict) else None
            bounds = [entry.get("low"), entry.get("high")] if isinstance(entry, dict) else []
            if not (
                isinstance(counts, list)
                and len(counts) == HISTOGRAM_BINS
                and all(type(c) is int and c >= 0 for c in counts)
                and all(type(b) in (int, float) and math.isfinite(b) and abs(b) < 1000 for b in bounds)
                and bounds[0] < bounds[1]
            ):
                return []
    return snapshots


def qat_fingerprint(checkpoint: QatCheckpoint) -> str:
    """A short content hash of what defines the quantized model: float weights, scales, zero points, config."""
    import hashlib

    digest = hashlib.sha256(checkpoint.config.to_json().encode())
    digest.update(fingerprint(checkpoint.model).encode())
    for name in checkpoint.qnet.graph.layers:
        quant = checkpoint.qnet.layers[name]
        assert quant.weight_qparams is not None and quant.input_qparams is not None
        for tensor in (quant.weight_qparams.scale, quant.input_qparams.scale, quant.input_qparams.zero_point):
            digest.update(tensor.detach().contiguous().numpy().tobytes())
    if not isinstance(checkpoint.model, Net):  # a graph's other points (adds, cats) are part of it too
        for point in sorted(checkpoint.qnet.points):
            qparams = checkpoint.qnet.points[point].qparams
            digest.update(point.encode() + qparams.scale.numpy().tobytes() + qparams.zero_point.numpy().tobytes())
    return "qat-" + digest.hexdigest()[:12]


def checkpoint_of(result: QatResult) -> QatCheckpoint:
    """A finished run as a loaded checkpoint (what load_qat(qat_bytes(result)) gives)."""
    return QatCheckpoint(result.model, result.qnet, result.qnet.config, result.meta())
