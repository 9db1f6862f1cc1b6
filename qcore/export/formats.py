"""Exports of a quantized model: (a) a tensors-only .pt of integer tensors and qparams that loads
back into the integer engine, and (b) an ONNX model in QDQ form for ONNX Runtime.

qtensors format (torch.save of a dict of tensors and plain values; read with weights_only=True):
  format: "qlab-qtensors/2", config: QuantConfig JSON, input_scale: float, input_zero: int,
  input_qmin / input_qmax: int; graph: JSON of the model graph's operations in execution order
  (name, kind, inputs, shape, settings) and its output; plan: JSON of the integer engine's rules
  that are not a layer's (each point's requantization, a cat's input requantizations, each add's
  zero points, multipliers and shifts, the ReLU/ReLU6 clamps on a grid, the logits' scale); and per
  layer "<name>.<field>" for the fields of IntegerLayer, with weights stored as
  "<name>.weight_packed" (uint8, "<name>.weight_bits" bits per value, LSB first, after subtracting
  "<name>.weight_offset", the smallest weight) plus "<name>.weight_shape". The width is each layer's
  own, so mixed-precision layers pack at their own bit-width. Format 1 held the notebook's net's four
  layers alone; it is no longer read (export the model again).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, fields
from typing import BinaryIO

import torch

from qcore.data import DATASETS, MNIST, DatasetSpec, view_spec
from qcore.files import read_json, shorten
from qcore.graph import ModelGraph, Op, OpKind, QuantPlan
from qcore.inference.integer import IntegerLayer, IntegerNet, Requantization
from qcore.quantize.qmodel import QuantizedNet, float_parts
from qcore.quantize.quant import QParams, dequantize

QTENSORS_FORMAT = "qlab-qtensors/2"
MAX_PLAN_CHARS = 4_000_000  # the graph and plan JSON of a qtensors file (a zoo model needs under 100 kB)
ONNX_OPSET = 17


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Non-negative integers < 2^bits, `bits` bits each, LSB first, into a uint8 stream."""
    flat = values.reshape(-1).to(torch.int64)
    if bool((flat < 0).any()) or bool((flat >= 2**bits).any()):
        raise ValueError(f"values must lie in [0, {2**bits - 1}] to pack in {bits} bits")
    planes = (flat.unsqueeze(1) >> torch.arange(bits)) & 1  # [N, bits], LSB first
    stream = planes.reshape(-1)
    stream = torch.cat([stream, stream.new_zeros((-len(stream)) % 8)])
    return (stream.reshape(-1, 8) << torch.arange(8)).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    stream = ((packed.to(torch.int64).unsqueeze(1) >> torch.arange(8)) & 1).reshape(-1)[: count * bits]
    return (stream.reshape(count, bits) << torch.arange(bits)).sum(dim=1)


def _requant_json(requant: Requantization, state: dict[str, object], key: str) -> dict[str, object]:
    """A requantization for the plan JSON; its per-channel M0 and shifts are int32 tensors in `state`: a
    layer's own when they are its requantization's (stored with the layer already), else under `key`."""
    layer = requant.source
    multiplier, shift = requant.multiplier.to(torch.int32), requant.shift.to(torch.int32)
    stored = state.get(f"{layer}.multiplier"), state.get(f"{layer}.shift")
    pairs = zip(stored, (multiplier, shift), strict=True)
    if all(isinstance(t, torch.Tensor) and t.shape == v.shape for t, v in pairs):
        if torch.equal(stored[0], multiplier) and torch.equal(stored[1], shift):  # type: ignore[arg-type]
            key = layer
    if key != layer:
        state[f"{key}.multiplier"], state[f"{key}.shift"] = multiplier, shift
    return {
        "source": requant.source,
        "tensors": key,
        "repeat": requant.repeat,
        "output_zero": requant.output_zero,
        "output_min": requant.output_min,
        "output_max": requant.output_max,
        "input_zero": requant.input_zero,
    }


def _requant_from(entry: dict[str, object], state: dict[str, object]) -> Requantization:
    multiplier, shift = state[f"{entry['tensors']}.multiplier"], state[f"{entry['tensors']}.shift"]
    tensors = isinstance(multiplier, torch.Tensor) and isinstance(shift, torch.Tensor)
    if not tensors or multiplier.shape != shift.shape:  # type: ignore[union-attr]
        raise ValueError("a requantization's multipliers and shifts are missing or differ in length")
    return Requantization(
        str(entry["source"]),
        torch.zeros(0, dtype=torch.float64),  # the real multipliers stay behind: only M0 and the shift run
        multiplier.to(torch.int64).reshape(-1),
        shift.to(torch.int64).reshape(-1),
        int(entry["repeat"]),  # type: ignore[call-overload]
        int(entry["output_zero"]),  # type: ignore[call-overload]
        int(entry["output_min"]),  # type: ignore[call-overload]
        int(entry["output_max"]),  # type: ignore[call-overload]
        int(entry["input_zero"]),  # type: ignore[call-overload]
    )


def _graph_json(graph: ModelGraph) -> str:
    ops = [
        {
            "name": op.name,
            "kind": op.kind.value,
            "inputs": list(op.inputs),
            "shape": list(op.shape),
            "attrs": {k: list(v) if isinstance(v, tuple) else v for k, v in op.attrs.items()},
        }
        for op in graph.ops
    ]
    return json.dumps({"ops": ops, "output": graph.output, "input_shape": list(graph.input_shape)})


def _graph_from(text: object) -> ModelGraph:
    data = read_json(text, "the qtensors file's graph", MAX_PLAN_CHARS)
    assert isinstance(data, dict)
    ops = tuple(
        Op(
            str(entry["name"]),
            OpKind(entry["kind"]),
            tuple(str(name) for name in entry["inputs"]),
            tuple(int(v) for v in entry["shape"]),
            {k: tuple(v) if isinstance(v, list) else v for k, v in entry["attrs"].items()},
        )
        for entry in data["ops"]
    )
    return ModelGraph(ops, str(data["output"]), {}, {}, tuple(int(v) for v in data["input_shape"]))


def _plan_json(engine: IntegerNet, state: dict[str, object]) -> str:
    return json.dumps(
        {
            "points": {
                name: [float(q.scale), int(q.zero_point), q.qmin, q.qmax]
                for name, q in engine.points.items()
                if q.scale.numel() == 1
            },
            "requant": {
                name: _requant_json(r, state, f"requant.{i}") for i, (name, r) in enumerate(engine._requant.items())
            },
            "cat_inputs": [
                [op, index, _requant_json(r, state, f"cat_input.{i}")]
                for i, ((op, index), r) in enumerate(engine._cat_inputs.items())
            ],
            "adds": {
                name: [list(zeros), [int(m) for m in multipliers], [int(s) for s in shifts]]
                for name, (zeros, multipliers, shifts) in engine._adds.items()
            },
            "grid_clamps": {name: list(clamp) for name, clamp in engine._grid_clamps.items()},
            "tables": {name: [low, [int(v) for v in table]] for name, (low, table) in engine._tables.items()},
            "output_point": engine._output_point,
            "logit_bits": engine.logit_bits,
        }
    )


def export_qtensors(engine: IntegerNet, destination: str | os.PathLike[str] | BinaryIO) -> None:
    qin = engine.input_qparams
    assert qin is not None
    state: dict[str, object] = {
        "format": QTENSORS_FORMAT,
        "config": engine.config.to_json(),
        "input_scale": float(qin.scale),
        "input_zero": int(qin.zero_point),
        "input_qmin": qin.qmin,
        "input_qmax": qin.qmax,
        "graph": _graph_json(engine.graph),
    }
    for name, layer in engine.layers.items():
        offset = int(layer.weight.min())
        bits = max(1, (int(layer.weight.max()) - offset).bit_length())  # at most the layer's bit-width
        state[f"{name}.weight_packed"] = pack_bits(layer.weight - offset, bits)
        state[f"{name}.weight_bits"] = bits
        state[f"{name}.weight_shape"] = list(layer.weight.shape)
        state[f"{name}.weight_offset"] = offset
        for f in fields(IntegerLayer):
            if f.name in ("name", "weight", "input_range"):  # the range is the engine's shortcut, not the format's
                continue
            value = getattr(layer, f.name)
            state[f"{name}.{f.name}"] = value.to(torch.int32) if isinstance(value, torch.Tensor) else value
    state["plan"] = _plan_json(engine, state)
    torch.save(state, destination)


def qtensors_bytes(engine: IntegerNet) -> bytes:
    buffer = io.BytesIO()
    export_qtensors(engine, buffer)
    return buffer.getvalue()


class LoadedIntegerNet(IntegerNet):
    """An IntegerNet rebuilt from a qtensors file alone (no float weights, no calibration): the graph
    and the integer rules as stored, so it predicts what the exported engine predicted."""

    def __init__(self, state: dict[str, object]) -> None:
        from qcore.quantize.config import QuantConfig

        if state.get("format") != QTENSORS_FORMAT:
            raise ValueError(
                f"not a {QTENSORS_FORMAT} file (found {shorten(str(state.get('format')), 40)}); export the model again"
            )
        self.config = QuantConfig.from_json(str(state["config"]))
        self.input_qparams = QParams(
            torch.tensor(float(state["input_scale"])),  # type: ignore[arg-type]
            torch.tensor(int(state["input_zero"])),  # type: ignore[call-overload]
            int(state["input_qmin"]),  # type: ignore[call-overload]
            int(state["input_qmax"]),  # type: ignore[call-overload]
        )
        self.graph = _graph_from(state["graph"])
        plan = read_json(state["plan"], "the qtensors file's plan", MAX_PLAN_CHARS)
        assert isinstance(plan, dict)
        self.layers = {}
        self._float_kernels = {}
        for name in self.graph.layers:
            shape = [int(v) for v in state[f"{name}.weight_shape"]]  # type: ignore[union-attr]
            count = int(torch.tensor(shape).prod())
            packed = state[f"{name}.weight_packed"]
            assert isinstance(packed, torch.Tensor)
            bits = int(state[f"{name}.weight_bits"])  # type: ignore[call-overload]
            weight = (unpack_bits(packed, bits, count) + int(state[f"{name}.weight_offset"])).reshape(shape)  # type: ignore[call-overload]
            values = {
                f.name: state[f"{name}.{f.name}"]
                for f in fields(IntegerLayer)
                if f.name not in ("name", "weight", "input_range")
            }
            tensors = {k: v.to(torch.int64) if isinstance(v, torch.Tensor) else v for k, v in values.items()}
            self.layers[name] = IntegerLayer(name=name, weight=weight, **tensors)  # type: ignore[arg-type]
        self.points = {
            name: QParams(torch.tensor(scale), torch.tensor(zero), qmin, qmax)
            for name, (scale, zero, qmin, qmax) in plan["points"].items()
        }
        self.plan = QuantPlan(tuple(self.points), {}, {})
        self._requant = {name: _requant_from(entry, state) for name, entry in plan["requant"].items()}
        self._cat_inputs = {(op, int(index)): _requant_from(entry, state) for op, index, entry in plan["cat_inputs"]}
        self._adds = {
            name: (
                (int(zeros[0]), int(zeros[1])),
                (torch.tensor([multipliers[0]]), torch.tensor([multipliers[1]])),
                (torch.tensor([shifts[0]]), torch.tensor([shifts[1]])),
            )
            for name, (zeros, multipliers, shifts) in plan["adds"].items()
        }
        self._grid_clamps = {name: (int(low), high) for name, (low, high) in plan["grid_clamps"].items()}
        self._tables = {
            name: (int(low), torch.tensor([int(v) for v in table], dtype=torch.int64))
            for name, (low, table) in plan.get("tables", {}).items()
        }
        self._output_point = plan["output_point"]
        self.logit_bits = int(plan["logit_bits"])
        self._layer_requant = {}
        for requant in [*self._requant.values(), *self._cat_inputs.values()]:
            self._layer_requant.setdefault(requant.source, requant)
        self.real_multipliers = {}


def load_qtensors(source: str | os.PathLike[str] | bytes | BinaryIO) -> LoadedIntegerNet:
    """The integer engine a qtensors file holds (a file this lab exported: torch.load reads it with
    weights_only=True, and its JSON parts go through the bounded reader)."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    return LoadedIntegerNet(torch.load(source, weights_only=True, map_location="cpu"))


def size_table(qnet: QuantizedNet, bit_widths: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)) -> list[dict[str, object]]:
    """Bytes of the weights and biases: float32 vs packed integers (weights at b bits, int32 bias),
    per bit-width; qparams (a few hundred bytes) not counted."""
    weights = sum(q.weight.numel() for q in qnet.layers.values())
    biases = sum(q.bias.numel() for q in qnet.layers.values())
    float_bytes = 4 * (weights + biases)
    rows = []
    for bits in bit_widths:
        packed = sum(-(-q.weight.numel() * bits // 8) for q in qnet.layers.values()) + 4 * biases
        rows.append(
            {"weight bits": bits, "float32 bytes": float_bytes, "packed bytes": packed, "ratio": float_bytes / packed}
        )
    return rows


# --- ONNX in QDQ form ------------------------------------------------------------------------


@dataclass(frozen=True)
class InputStep:
    """What an imported file's input is, for an export that reads the file's own input: its layout
    (without the batch), whether it is float64, and the affine map its graph applied to the image before
    the first layer (qcore.models.onnx_import.ImportedModel.input_step gives it)."""

    layout: tuple[int, ...] = (1, 28, 28)
    float64: bool = False
    multiply: float = 1.0
    add: float = 0.0


def input_step_of(imported: object) -> InputStep | None:
    """The input step of an imported model (qcore.models.onnx_import.ImportedModel), None for a zoo model."""
    if imported is None:
        return None
    multiply, add = imported.input_affine  # type: ignore[attr-defined]
    return InputStep(tuple(imported.input_layout), bool(imported.input_float64), float(multiply), float(add))  # type: ignore[attr-defined]


def export_onnx_for(qnet: QuantizedNet, dataset: DatasetSpec, imported: object | None = None) -> bytes:
    """export_onnx of a zoo model on `dataset`, or of an imported model (qcore.models.onnx_import.
    ImportedModel) reading the file's own input: its layout and type, its pixel convention, its step."""
    if imported is None:
        return export_onnx(qnet, dataset)
    spec = view_spec(DATASETS[imported.dataset], imported.input_scale)  # type: ignore[attr-defined]
    return export_onnx(qnet, spec, input_step_of(imported))


def export_onnx(qnet: QuantizedNet, dataset: DatasetSpec = MNIST, input_step: InputStep | None = None) -> bytes:
    """The quantized model as an ONNX graph in QDQ form: QuantizeLinear/DequantizeLinear pairs on each
    layer's input (uint8, after a Clip to the b-bit range when b < 8), weights as uint8 initializers
    (signed ones offset by 128) behind per-channel or per-tensor DequantizeLinear, int32 bias at s_in * s_w.
    Output: logits (float). ONNX Runtime fuses the pairs into its integer kernels. The graph takes the
    normalized image; metadata_props say how to make it (normalize_mean, normalize_std of pixels in
    [0, 1]), the dataset and its class names (JSON). With `input_step` (an imported file's), the graph
    takes the file's own input instead (its layout and type, `dataset` describing its pixel convention)
    and begins with the file's step: cast, reshape to [N, 1, 28, 28] (a 3-channel copy: its first
    channel), times `multiply` plus `add`."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    missing = float_parts(qnet)
    if missing:
        raise ValueError(f"ONNX QDQ export needs every layer and the input quantized; float: {', '.join(missing)}")
    if qnet.config.max_bits > 8:
        raise ValueError("ONNX QDQ export stores 8-bit integers: use at most 8 weight and activation bits")
    nodes, initializers = [], []

    def constant(name: str, array: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(array, name))
        return name

    graph_ops, plan = qnet.graph, qnet.plan

    def quantize_dequantize(source: str, tag: str, qparams: QParams) -> str:
        """[Clip to the b-bit range,] QuantizeLinear, DequantizeLinear: the simulation's fake quantizer."""
        scale, zero = float(qparams.scale), int(qparams.zero_point)
        if qparams.qmax < 255:  # QuantizeLinear clamps to [0, 255]; a b-bit range needs its own clip
            low, high = scale * (qparams.qmin - zero), scale * (qparams.qmax - zero)
            nodes.append(
                helper.make_node(
                    "Clip",
                    [
                        source,
                        constant(f"{tag}.clip_min", np.array(low, np.float32)),
                        constant(f"{tag}.clip_max", np.array(high, np.float32)),
                    ],
                    [f"{tag}.clipped"],
                )
            )
            source = f"{tag}.clipped"
        s_in = constant(f"{tag}.x_scale", np.array(scale, np.float32))
        z_in = constant(f"{tag}.x_zero", np.array(zero, np.uint8))
        nodes.append(helper.make_node("QuantizeLinear", [source, s_in, z_in], [f"{tag}.xq"]))
        nodes.append(helper.make_node("DequantizeLinear", [f"{tag}.xq", s_in, z_in], [f"{tag}.xdq"]))
        return f"{tag}.xdq"

    names: dict[str, str] = {}  # op -> the ONNX value holding it
    for op in graph_ops.ops:
        args = [names[name] for name in op.inputs]
        out = f"{op.name}.out"
        if op.kind is OpKind.INPUT:
            out = "input" if input_step is None else _input_step_nodes(input_step, nodes, constant)
        elif op.is_layer:
            out = _onnx_layer(qnet, op, args[0], nodes, constant, quantize_dequantize)
        elif op.kind is OpKind.RELU:
            nodes.append(helper.make_node("Relu", args, [out]))
        elif op.kind is OpKind.RELU6:
            nodes.append(
                helper.make_node(
                    "Clip",
                    [
                        args[0],
                        constant(f"{op.name}.min", np.array(0.0, np.float32)),
                        constant(f"{op.name}.max", np.array(6.0, np.float32)),
                    ],
                    [out],
                )
            )
        elif op.kind is OpKind.MAXPOOL:
            kernel, stride, padding = op.attrs["kernel"], op.attrs["stride"], op.attrs["padding"]
            nodes.append(
                helper.make_node(
                    "MaxPool",
                    args,
                    [out],
                    kernel_shape=list(kernel),
                    strides=list(stride),
                    pads=[*padding, *padding],  # type: ignore[misc]
                )
            )
        elif op.kind is OpKind.AVGPOOL:
            # on the integers, rounded half up as the engine does (QuantizeLinear would round half to
            # even): quantize, average the exact integers, floor(v + 0.5), back to the grid's reals
            qparams = qnet.points[plan.grid[op.name]].qparams
            tag, scale, zero = op.name, float(qparams.scale), int(qparams.zero_point)
            s_in = constant(f"{tag}.pool_scale", np.array(scale, np.float32))
            z_in = constant(f"{tag}.pool_zero", np.array(zero, np.uint8))
            nodes.append(helper.make_node("QuantizeLinear", [args[0], s_in, z_in], [f"{tag}.q"]))
            nodes.append(helper.make_node("Cast", [f"{tag}.q"], [f"{tag}.qf"], to=TensorProto.FLOAT))
            kernel, stride = op.attrs["kernel"], op.attrs["stride"]
            nodes.append(
                helper.make_node(
                    "AveragePool", [f"{tag}.qf"], [f"{tag}.mean"], kernel_shape=list(kernel), strides=list(stride)
                )  # type: ignore[call-overload]
            )
            half = constant(f"{tag}.half", np.array(0.5, np.float32))
            nodes.append(helper.make_node("Add", [f"{tag}.mean", half], [f"{tag}.nudged"]))
            nodes.append(helper.make_node("Floor", [f"{tag}.nudged"], [f"{tag}.rounded"]))
            zero_f = constant(f"{tag}.zero_f", np.array(float(zero), np.float32))
            nodes.append(helper.make_node("Sub", [f"{tag}.rounded", zero_f], [f"{tag}.centred"]))
            nodes.append(helper.make_node("Mul", [f"{tag}.centred", s_in], [out]))
        elif op.kind is OpKind.FLATTEN:
            nodes.append(helper.make_node("Flatten", args, [out], axis=1))
        elif op.kind is OpKind.ADD:
            nodes.append(helper.make_node("Add", args, [out]))
        elif op.kind is OpKind.CAT:
            qparams = qnet.points[op.name].qparams
            parts = [quantize_dequantize(arg, f"{op.name}.in{i}", qparams) for i, arg in enumerate(args)]
            nodes.append(helper.make_node("Concat", parts, [out], axis=1))
        elif op.kind is OpKind.LOOKUP:
            # the simulation's own table (TFLite's int8 LOGISTIC): the input's level, then the output's
            # dequantized value at that level, read by Gather: exact, where a float Sigmoid between a
            # DequantizeLinear and a QuantizeLinear could round a level differently
            source = qnet.points[plan.grid[op.inputs[0]]].qparams
            low, table = qnet.lookup_tables[op.name]
            values = dequantize(table, qnet.points[op.name].qparams).numpy().astype(np.float32)
            tag = op.name
            s_in = constant(f"{tag}.in_scale", np.array(float(source.scale), np.float32))
            z_in = constant(f"{tag}.in_zero", np.array(int(source.zero_point), np.uint8))
            nodes.append(helper.make_node("QuantizeLinear", [args[0], s_in, z_in], [f"{tag}.level"]))
            nodes.append(helper.make_node("Cast", [f"{tag}.level"], [f"{tag}.index"], to=TensorProto.INT64))
            if low != 0:
                offset = constant(f"{tag}.low", np.array(low, np.int64))
                nodes.append(helper.make_node("Sub", [f"{tag}.index", offset], [f"{tag}.from_low"]))
            index = f"{tag}.from_low" if low != 0 else f"{tag}.index"
            nodes.append(helper.make_node("Gather", [constant(f"{tag}.table", values), index], [out], axis=0))
        else:  # log_softmax: the export's output is the logits before it, as the engine's argmax
            out = args[0]
        # where the simulation fake-quantizes a value as it is made (qnet._quantize_after); an average
        # pool's output is on its grid already
        after = qnet._quantize_after.get(op.name)
        if after is not None and op.kind is not OpKind.AVGPOOL:
            out = quantize_dequantize(out, f"{op.name}.made", after)
        names[op.name] = out
    nodes.append(helper.make_node("Identity", [names[graph_ops.output]], ["logits"]))
    classes = graph_ops.op(graph_ops.output).shape[1]
    graph = helper.make_graph(
        nodes,
        "qlab_quantized_net",
        [
            helper.make_tensor_value_info(
                "input",
                TensorProto.DOUBLE if input_step is not None and input_step.float64 else TensorProto.FLOAT,
                ["batch", *(qnet.graph.input_shape if input_step is None else input_step.layout)],
            )
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], producer_name="quantization-lab"
    )
    helper.set_model_props(
        model,
        {
            "normalize_mean": repr(dataset.mean),
            "normalize_std": repr(dataset.std),
            "dataset": dataset.name,
            "class_names": json.dumps(list(dataset.class_names)),
        },
    )
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _input_step_nodes(step: InputStep, nodes: list, constant) -> str:  # type: ignore[no-untyped-def]
    """The file's own input step as ONNX nodes from the graph input "input"; the value the layers read."""
    import numpy as np
    from onnx import TensorProto, helper

    value = "input"
    if step.float64:
        nodes.append(helper.make_node("Cast", [value], ["input.float"], to=TensorProto.FLOAT))
        value = "input.float"
    if step.layout[0] == 3:  # the grey image in each channel: the lab's first conv summed them
        starts, ends = (
            constant("input.first", np.array([0], np.int64)),
            constant("input.second", np.array([1], np.int64)),
        )
        axes = constant("input.channel_axis", np.array([1], np.int64))
        nodes.append(helper.make_node("Slice", [value, starts, ends, axes], ["input.grey"]))
        value = "input.grey"
    elif tuple(step.layout) != (1, 28, 28):
        shape = constant("input.image_shape", np.array([-1, 1, 28, 28], np.int64))
        nodes.append(helper.make_node("Reshape", [value, shape], ["input.image"]))
        value = "input.image"
    if step.multiply != 1.0:
        factor = constant("input.multiply", np.array(step.multiply, np.float32))
        nodes.append(helper.make_node("Mul", [value, factor], ["input.scaled"]))
        value = "input.scaled"
    if step.add != 0.0:
        offset = constant("input.add", np.array(step.add, np.float32))
        nodes.append(helper.make_node("Add", [value, offset], ["input.shifted"]))
        value = "input.shifted"
    return value


def _onnx_layer(qnet: QuantizedNet, op: Op, source: str, nodes: list, constant, quantize_dequantize) -> str:
    """One conv or linear layer in QDQ form: its input through Q/DQ at its input qparams, its weights
    as integers behind DequantizeLinear, its int32 bias at s_in * s_w."""
    import numpy as np
    from onnx import helper

    name, quant = op.name, qnet.layers[op.name]
    iq, wq = quant.input_qparams, quant.weight_qparams
    assert iq is not None and wq is not None and quant.weight_int is not None and quant.bias_int is not None
    x = quantize_dequantize(source, name, iq)
    # Signed weights are stored as uint8 offset by 128 (the same dequantized values), so that ONNX Runtime
    # runs its U8U8 kernels: its U8S8 ones on x86 CPUs without VNNI add pairs of products in 16 bits
    # (vpmaddubsw) and saturate, which changed 24.6% of the every-operation test net's W8A8 predictions on an
    # AVX2 EPYC. U8U8 widens to 16 bits first and is exact on every CPU.
    offset = 128 if wq.qmin < 0 else 0
    per_channel = wq.axis is not None
    nodes.append(
        helper.make_node(
            "DequantizeLinear",
            [
                constant(f"{name}.w_int", (quant.weight_int.numpy().astype(np.int32) + offset).astype(np.uint8)),
                constant(f"{name}.w_scale", wq.scale.numpy().astype(np.float32)),
                constant(f"{name}.w_zero", (wq.zero_point.numpy().astype(np.int32) + offset).astype(np.uint8)),
            ],
            [f"{name}.wdq"],
            **({"axis": 0} if per_channel else {}),
        )
    )
    channels = quant.bias.shape[0]
    bias_scale = (float(iq.scale) * wq.scale.double()).numpy().astype(np.float32)
    if not per_channel:
        bias_scale = np.full(channels, float(bias_scale), np.float32)
    nodes.append(
        helper.make_node(
            "DequantizeLinear",
            [
                constant(f"{name}.b_int", quant.bias_int.numpy().astype(np.int32)),
                constant(f"{name}.b_scale", bias_scale),
                constant(f"{name}.b_zero", np.zeros(channels, np.int32)),
            ],
            [f"{name}.bdq"],
            axis=0,
        )
    )
    out = f"{name}.out"
    if op.kind is OpKind.CONV:
        stride, padding = op.attrs["stride"], op.attrs["padding"]
        nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}.wdq", f"{name}.bdq"],
                [out],
                strides=list(stride),  # type: ignore[call-overload]
                pads=[*padding, *padding],  # type: ignore[misc]
                group=int(op.attrs["groups"]),  # type: ignore[call-overload]
            )
        )
    else:
        nodes.append(helper.make_node("Gemm", [x, f"{name}.wdq", f"{name}.bdq"], [out], transB=1))
    return out


class OnnxRunner:
    """An ONNX Runtime CPU session over an exported model."""

    def __init__(self, model_bytes: bytes, threads: int | None = None) -> None:
        from qcore.models.onnx_runtime import onnxruntime_session

        self.session = onnxruntime_session(model_bytes, threads)

    def predict(self, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        import numpy as np

        outputs = [
            self.session.run(["logits"], {"input": images[start : start + batch_size].numpy()})[0].argmax(axis=1)
            for start in range(0, len(images), batch_size)
        ]
        return torch.from_numpy(np.concatenate(outputs)).to(torch.int64)
