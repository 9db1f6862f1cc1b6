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

from qcore.data import DATASETS, INPUT_SCALES, load_dataset, view_spec
from qcore.files import JsonFileError, read_json, shorten
from qcore.graph import GraphError, ModelGraphModule, model_graph
from qcore.models.checkpoint import (
    MAX_FILE_BYTES,
    CheckpointError,
    fingerprint,
    load_model,
    model_from_state,
    probe_images,
    read_checkpoint,
    validate_state_dict,
)
from qcore.models.net import LAYER_NAMES, Net, layer
from qcore.models.onnx_import import ImportedModel, import_onnx
from qcore.models.zoo import DEFAULT_MODEL, ZOO, zoo_model
from qcore.quantize.config import ConfigError, QuantConfig
from qcore.quantize.qmodel import (
    QuantizedNet,
    config_plan,
    point_bits,
)
from qcore.quantize.quant import QParams, Scheme, integer_range
from qcore.training.qat.config import HISTOGRAM_BINS, MIN_SCALE, QatConfig
from qcore.training.qat.network import deployed_net, net_with_parameters, to_quantized_net
from qcore.training.qat.training import QatResult
from qcore.training.train import MAX_EPOCHS

QAT_FORMAT = "qlab-qat/1"  # the notebook's net only: every file written before any graph had checkpoints
QAT_GRAPH_FORMAT = "qlab-qat/2"  # any model graph: a zoo model or an imported ONNX model
QAT_FORMATS = (QAT_FORMAT, QAT_GRAPH_FORMAT)
MAX_META_CHARS = 200_000
MAX_MODEL_CHARS = 1_000
NOTEBOOK_ARCHITECTURE = "the notebook's net"  # what a qlab-qat/1 file holds (mnist-net or fashion-net)

#
# torch.save of a dict of plain values and tensors (torch.load(..., weights_only=True) reads it):
#   format: "qlab-qat/1"; config: the QuantConfig as JSON (the defaults at the trained bits);
#   meta: JSON (how it was trained: settings, times, the held-out curve, weight snapshots);
#   float_weights: the Net state_dict of the trained float weights;
#   qparams: {layer: {"weight_scale": float32 [O], "input_scale": float32 [], "input_zero_point": int64 []}}.
# The integer weights and int32 biases are not stored: they follow from these exactly (round to
# nearest at the stored scales), and storing them twice would let a file contradict itself.
#
# qlab-qat/2, for any model graph, written for every model since; format, config and meta as above, and
#   model: JSON, {"zoo": name} or {"onnx": {"dataset": name, "input_scale": convention}};
#   onnx: uint8 [bytes], the ONNX file the graph was imported from (empty for a zoo model): the
#     architecture is rebuilt from it as the upload imports it, so the file needs no graph format;
#   layers: {layer: {"weight": float32 (the graph's, BatchNorm folded), "bias": float32 [O],
#     "weight_scale": float32 [O]}};
#   points: {point: {"scale": float32 [], "zero_point": int64 []}}, every quantization point of the
#     graph under the config (a residual add's inputs and a cat's too).
# The graph's layer and point names are checked against the rebuilt graph, never used before that.

GRAPH_KEYS = ("config", "format", "layers", "meta", "model", "onnx", "points")
LAYER_KEYS = ("weight", "bias", "weight_scale")
POINT_KEYS = ("scale", "zero_point")

QPARAM_KEYS = ("weight_scale", "input_scale", "input_zero_point")


@dataclass
class QatCheckpoint:
    """A loaded QAT checkpoint: the quantized model as trained, ready for every engine and export."""

    model: nn.Module  # the trained float weights: a Net for the notebook's net, else the graph's
    qnet: QuantizedNet
    config: QuantConfig
    meta: dict[str, object]
    zoo: str = DEFAULT_MODEL  # the zoo model it was trained from (an imported model's dataset is its own)
    imported: ImportedModel | None = None  # the ONNX model it was trained from, imported again on loading

    def trained_for(self, config: QuantConfig) -> QuantizedNet | None:
        """The trained model when `config` is the one it was trained for; None means any other config,
        which calibrates the float weights afresh (PTQ)."""
        return self.qnet if config == self.config else None


ModelSource = str | ImportedModel  # a zoo model's name, or an imported ONNX model


def qat_state(trained: QatResult | QatCheckpoint, source: ModelSource | None = None) -> dict[str, object]:
    """What a QAT checkpoint file holds (qlab-qat/2), for a finished run of the model `source` or a
    loaded checkpoint (which knows its own)."""
    if source is None:
        if isinstance(trained, QatResult):
            raise ValueError("a QAT run's checkpoint needs the model it was trained from (a zoo name or the import)")
        source = trained.imported if trained.imported is not None else trained.zoo
    meta = trained.meta() if isinstance(trained, QatResult) else trained.meta
    if isinstance(source, str):
        zoo_model(source)  # a known name
        model, onnx = {"zoo": source}, torch.zeros(0, dtype=torch.uint8)
    else:
        model = {"onnx": {"dataset": source.dataset, "input_scale": source.input_scale}}
        onnx = torch.frombuffer(bytearray(source.onnx_bytes), dtype=torch.uint8)
    qnet = trained.qnet
    layers = {}
    for name in qnet.graph.layers:
        quant = qnet.layers[name]
        assert quant.weight_qparams is not None and quant.bias is not None
        layers[name] = {
            "weight": quant.weight.detach().clone().contiguous(),
            "bias": quant.bias.detach().clone(),
            "weight_scale": quant.weight_qparams.scale.detach().clone().float(),
        }
    points = {
        name: {
            "scale": point.qparams.scale.detach().clone().float().reshape(()),
            "zero_point": point.qparams.zero_point.detach().clone().to(torch.int64).reshape(()),
        }
        for name, point in qnet.points.items()
    }
    return {
        "format": QAT_GRAPH_FORMAT,
        "model": json.dumps(model),
        "onnx": onnx,
        "config": qnet.config.to_json(),
        "meta": json.dumps(meta),
        "layers": layers,
        "points": points,
    }


def qat_bytes(trained: QatResult | QatCheckpoint, source: ModelSource | None = None) -> bytes:
    """The checkpoint file; refused (CheckpointError) when it would be larger than the loader reads, so
    that no file is written that cannot be loaded back."""
    buffer = io.BytesIO()
    torch.save(qat_state(trained, source), buffer)
    if buffer.tell() > MAX_FILE_BYTES:
        raise CheckpointError(
            [
                f"the QAT checkpoint would be {buffer.tell() / 1e6:.1f} MB; checkpoints of at most "
                f"{MAX_FILE_BYTES / 1e6:.1f} MB are loaded"
            ]
        )
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
    return isinstance(state, dict) and state.get("format") in QAT_FORMATS


def load_qat(source: str | os.PathLike[str] | bytes | BinaryIO, data_dir: str | None = None) -> QatCheckpoint:
    """Read a QAT checkpoint as strictly as a state_dict (same file bounds, tensors only); see qat_from_state."""
    return qat_from_state(read_checkpoint(source), data_dir)


def load_checkpoint(
    source: str | os.PathLike[str] | bytes | BinaryIO | None,
    model_name: str = DEFAULT_MODEL,
    data_dir: str | None = None,
    follow_qat: bool = False,
) -> tuple[nn.Module, QatCheckpoint | None]:
    """Any checkpoint the lab takes for zoo model `model_name`, read once: a state_dict of its
    architecture gives (model, None), a QAT checkpoint of that model (its float weights, the
    checkpoint); None gives the model's bundled checkpoint. A QAT checkpoint of another model, or of
    an imported ONNX model, is refused, or with `follow_qat` (an upload) loaded as the model it names."""
    if source is None:
        return load_model(None, model_name), None
    return checkpoint_from_state(read_checkpoint(source), model_name, data_dir, follow_qat)


def checkpoint_from_state(
    state: object, model_name: str = DEFAULT_MODEL, data_dir: str | None = None, follow_qat: bool = False
) -> tuple[nn.Module, QatCheckpoint | None]:
    """load_checkpoint of an already unpickled file (read_checkpoint's result)."""
    if claims_qat(state):
        assert isinstance(state, dict)
        trained_on = _model_of(state)
        if trained_on == NOTEBOOK_ARCHITECTURE and zoo_model(model_name).is_notebook_net:
            trained_on = model_name  # a qlab-qat/1 file does not say which dataset: the one asked for
        if trained_on is not None and trained_on != model_name and not follow_qat:
            raise CheckpointError(
                [
                    f"a QAT checkpoint of {trained_on}, not of {model_name}"
                    if trained_on != "an ONNX model"
                    else "a QAT checkpoint of an ONNX model, which brings its own model"
                ]
            )
        notebook_model = model_name if zoo_model(model_name).is_notebook_net else DEFAULT_MODEL
        checkpoint = qat_from_state(state, data_dir, notebook_model)
        return checkpoint.model, checkpoint
    return model_from_state(state, model_name), None


def _model_of(state: dict[str, object]) -> str | None:
    """The model a QAT checkpoint says it holds, as words to compare and show (a zoo name, or "an ONNX
    model"); None when it does not say in a form worth quoting (qat_from_state then says what is wrong)."""
    if state.get("format") == QAT_FORMAT:
        return NOTEBOOK_ARCHITECTURE
    try:
        model = read_json(state.get("model"), "model", MAX_MODEL_CHARS)
    except JsonFileError:
        return None
    if isinstance(model, dict) and list(model) == ["zoo"] and model["zoo"] in ZOO:
        return str(model["zoo"])
    if isinstance(model, dict) and list(model) == ["onnx"]:
        return "an ONNX model"
    return None


def imported_qat(state: object) -> bool:
    """Whether an unpickled checkpoint says it is a QAT checkpoint of an imported ONNX model."""
    return claims_qat(state) and _model_of(state) == "an ONNX model"  # type: ignore[arg-type]


def qat_from_state(state: object, data_dir: str | None = None, notebook_model: str = DEFAULT_MODEL) -> QatCheckpoint:
    """Check every field of an unpickled QAT checkpoint, rebuild the quantized model and check it runs
    finite on probe images and fits the integer engine. Any problem raises CheckpointError listing each.
    A checkpoint of an ONNX model imports its file again on the dataset it names, read from `data_dir`
    (a missing dataset raises DataError). A qlab-qat/1 file holds the notebook's net without naming its
    dataset: it is taken as zoo model `notebook_model`."""
    if not claims_qat(state):
        raise CheckpointError([f"not a QAT checkpoint (expected format {' or '.join(QAT_FORMATS)})"])
    assert isinstance(state, dict)
    if state["format"] == QAT_FORMAT:
        checkpoint = _notebook_checkpoint(state, notebook_model)
    else:
        checkpoint = _graph_checkpoint(state, data_dir)
    with torch.inference_mode():
        probes = checkpoint.qnet(_probes(checkpoint))
    if not bool(torch.isfinite(probes).all()):
        raise CheckpointError(["its quantized forward pass is not finite on ordinary images"])
    from qcore.inference.integer import IntegerEngineError, IntegerNet

    try:
        IntegerNet(checkpoint.qnet)
    except IntegerEngineError as error:
        raise CheckpointError([f"it does not fit the integer engine: {error}"]) from None
    return checkpoint


def _probes(checkpoint: QatCheckpoint) -> torch.Tensor:
    if checkpoint.imported is not None:  # images as the file reads them: through its input step
        spec = view_spec(
            DATASETS[checkpoint.imported.dataset], checkpoint.imported.input_scale, checkpoint.imported.input_affine
        )
        return probe_images(spec)
    return probe_images(DATASETS[zoo_model(checkpoint.zoo).dataset])


def _config_and_meta(state: dict[str, object], problems: list[str]) -> tuple[QuantConfig, dict[str, object]]:
    config = QuantConfig()
    try:
        config = QuantConfig.from_json(state["config"])  # bounded JSON, exact types, validated
    except ConfigError as error:
        problems.append(f"config: {shorten(error, 200)}")
    else:
        as_trained = QatConfig(config.weight_bits, config.act_bits, config.edge_bits, config.add_bits)
        if config != as_trained.quant_config() or as_trained.problems():
            problems.append("config: a QAT model uses the default QuantConfig at 2 to 8 bits (as trained)")
    meta: dict[str, object] = {}
    try:
        loaded = read_json(state["meta"], "meta", MAX_META_CHARS)
    except JsonFileError as error:
        problems.append(str(error))
    else:
        if isinstance(loaded, dict):
            meta = loaded
        else:
            problems.append("meta must be a JSON object")
    return config, meta


def _notebook_checkpoint(state: dict[str, object], zoo: str) -> QatCheckpoint:
    """qlab-qat/1: the notebook's net, its state_dict and per-layer qparams."""
    expected_keys = ["config", "float_weights", "format", "meta", "qparams"]
    if sorted(map(str, state)) != expected_keys:
        raise CheckpointError([f"a QAT checkpoint holds exactly {', '.join(expected_keys)}"])
    problems: list[str] = []
    config, meta = _config_and_meta(state, problems)
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
    return QatCheckpoint(model.eval(), qnet, config, meta, zoo)


def _tensor_problem(value: object, where: str, shape: tuple[int, ...], dtype: torch.dtype) -> str | None:
    if type(value) is not torch.Tensor or value.layout != torch.strided or value.device.type != "cpu":
        return f"{where}: expected a dense CPU tensor"
    if tuple(value.shape) != shape or value.dtype != dtype:
        return f"{where}: {value.dtype} of shape {list(value.shape)}, expected {dtype} {list(shape)}"
    if dtype == torch.float32 and not bool(torch.isfinite(value).all()):
        return f"{where}: not finite"
    return None


def _model_source(state: dict[str, object], data_dir: str | None) -> tuple[str, ImportedModel | None, nn.Module]:
    """The model a qlab-qat/2 file names, rebuilt: (zoo name, the import or None, its float module)."""
    try:
        model = read_json(state["model"], "model", MAX_MODEL_CHARS)
    except JsonFileError as error:
        raise CheckpointError([str(error)]) from None
    if isinstance(model, dict) and list(model) == ["zoo"] and isinstance(model["zoo"], str):
        if model["zoo"] not in ZOO:
            raise CheckpointError([f"model: {shorten(model['zoo'], 40)!r} is not a model of the zoo"])
        onnx = state["onnx"]
        if _tensor_problem(onnx, "onnx", (0,), torch.uint8) is not None:
            raise CheckpointError(["onnx: a zoo model's checkpoint holds an empty uint8 tensor there"])
        return model["zoo"], None, zoo_model(model["zoo"]).build().eval()
    onnx_model = model.get("onnx") if isinstance(model, dict) and list(model) == ["onnx"] else None
    if not (
        isinstance(onnx_model, dict)
        and sorted(onnx_model) == ["dataset", "input_scale"]
        and onnx_model["dataset"] in DATASETS
        and onnx_model["input_scale"] in INPUT_SCALES
    ):
        raise CheckpointError(
            [
                'model must be {"zoo": name} or {"onnx": {"dataset": ..., "input_scale": ...}} with a dataset '
                f"of {', '.join(DATASETS)} and a pixel convention of {', '.join(INPUT_SCALES)}"
            ]
        )
    onnx = state["onnx"]
    if not (
        type(onnx) is torch.Tensor
        and onnx.layout == torch.strided
        and onnx.device.type == "cpu"
        and onnx.dtype == torch.uint8
        and onnx.ndim == 1
        and 0 < onnx.numel() <= MAX_FILE_BYTES
    ):
        raise CheckpointError(["onnx: expected the ONNX file as a uint8 tensor of its bytes"])
    dataset = load_dataset(str(onnx_model["dataset"]), data_dir)
    imported = import_onnx(onnx.numpy().tobytes(), dataset, str(onnx_model["input_scale"]))
    return DEFAULT_MODEL, imported, imported.module


def _odd_keys(entries: dict[object, object]) -> bool:
    return not all(type(key) is str for key in entries)


def _graph_checkpoint(state: dict[str, object], data_dir: str | None) -> QatCheckpoint:
    """qlab-qat/2: any model graph, rebuilt from its zoo name or its ONNX file, then every layer's and
    point's tensors checked against that graph."""
    if sorted(map(str, state)) != sorted(GRAPH_KEYS):
        raise CheckpointError([f"a QAT checkpoint holds exactly {', '.join(GRAPH_KEYS)}"])
    problems: list[str] = []
    config, meta = _config_and_meta(state, problems)
    if problems:  # the config says which points the graph has: nothing below can be checked without it
        raise CheckpointError(problems)
    zoo, imported, module = _model_source(state, data_dir)
    try:
        graph = model_graph(module)
    except GraphError as error:
        raise CheckpointError([f"model: {error}"]) from None
    plan = config_plan(graph, config)
    bits = point_bits(graph, plan, config)
    layers, points = state["layers"], state["points"]
    if not isinstance(layers, dict) or sorted(map(str, layers)) != sorted(graph.layers) or _odd_keys(layers):
        problems.append(f"layers must hold exactly the model's {len(graph.layers)} layers")
        layers = {}
    if not isinstance(points, dict) or sorted(map(str, points)) != sorted(plan.points) or _odd_keys(points):
        problems.append(f"points must hold exactly the model's {len(plan.points)} quantization points")
        points = {}
    parameters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    weight_scales: dict[str, torch.Tensor] = {}
    for name, entry in layers.items():
        if not isinstance(entry, dict) or sorted(map(str, entry)) != sorted(LAYER_KEYS):
            problems.append(f"layers.{shorten(name, 60)} must hold exactly {', '.join(LAYER_KEYS)}")
            continue
        channels = graph.weight(name).shape[0]
        expected = {
            "weight": (tuple(graph.weight(name).shape), torch.float32),
            "bias": ((channels,), torch.float32),
            "weight_scale": ((channels,), torch.float32),
        }
        found = [_tensor_problem(entry[key], f"layers.{name}.{key}", *expected[key]) for key in LAYER_KEYS]
        found = [problem for problem in found if problem is not None]
        if not found and not bool((entry["weight_scale"] > MIN_SCALE).all()):
            found.append(f"layers.{name}.weight_scale: scales must be finite and above {MIN_SCALE:g}")
        problems.extend(found)
        if not found:
            parameters[name] = (entry["weight"].clone(), entry["bias"].clone())
            weight_scales[name] = entry["weight_scale"].clone()
    point_qparams: dict[str, QParams] = {}
    for name, entry in points.items():
        if not isinstance(entry, dict) or sorted(map(str, entry)) != sorted(POINT_KEYS):
            problems.append(f"points.{shorten(name, 60)} must hold exactly {', '.join(POINT_KEYS)}")
            continue
        scale, zero = entry["scale"], entry["zero_point"]
        found = [
            problem
            for problem in (
                _tensor_problem(scale, f"points.{name}.scale", (), torch.float32),
                _tensor_problem(zero, f"points.{name}.zero_point", (), torch.int64),
            )
            if problem is not None
        ]
        qmin, qmax = integer_range(bits[name], Scheme.ASYMMETRIC)
        if not found and not float(scale) > MIN_SCALE:
            found.append(f"points.{name}.scale: scales must be finite and above {MIN_SCALE:g}")
        if not found and not qmin <= int(zero) <= qmax:
            found.append(
                f"points.{name}.zero_point: {int(zero)} is outside the {bits[name]}-bit range [{qmin}, {qmax}]"
            )
        problems.extend(found)
        if not found:
            point_qparams[name] = QParams(scale.clone(), zero.clone(), qmin, qmax)
    if problems:
        raise CheckpointError(problems)
    trained = graph.with_parameters(parameters)
    if imported is None and zoo_model(zoo).is_notebook_net:  # as qat() builds it: a Net, per-layer qparams
        model = net_with_parameters(parameters)
        qparams = {
            name: {
                "weight_scale": weight_scales[name],
                "input_scale": point_qparams[plan.layer_input[name]].scale,
                "input_zero_point": point_qparams[plan.layer_input[name]].zero_point,
            }
            for name in LAYER_NAMES
        }
        qnet = to_quantized_net(model.eval(), qparams, config)
        return QatCheckpoint(model.eval(), qnet, config, meta, zoo)
    qnet = deployed_net(trained, plan, config, weight_scales, point_qparams)
    return QatCheckpoint(ModelGraphModule(trained).eval(), qnet, config, meta, zoo, imported)


def valid_snapshots(meta: dict[str, object], layers: tuple[str, ...] = LAYER_NAMES) -> list[dict[str, object]]:
    """The weight snapshots of a checkpoint's meta, or [] when they are not exactly what qat() writes
    (meta comes from a file: nothing in it is drawn unless it is plain numbers of the right shape)."""
    snapshots = meta.get("snapshots")
    if not isinstance(snapshots, list) or len(snapshots) > MAX_EPOCHS + 1:
        return []
    for snapshot in snapshots:
        if not isinstance(snapshot, dict) or not isinstance(snapshot.get("epoch"), int):
            return []
        drawn = snapshot.get("layers")
        if not isinstance(drawn, dict) or sorted(drawn) != sorted(layers):
            return []
        for entry in drawn.values():
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


def checkpoint_of(result: QatResult, source: ModelSource = DEFAULT_MODEL) -> QatCheckpoint:
    """A finished run of the model `source` as a loaded checkpoint (what load_qat(qat_bytes(result,
    source)) gives)."""
    if isinstance(source, str):
        return QatCheckpoint(result.model, result.qnet, result.qnet.config, result.meta(), source)
    return QatCheckpoint(result.model, result.qnet, result.qnet.config, result.meta(), DEFAULT_MODEL, source)
