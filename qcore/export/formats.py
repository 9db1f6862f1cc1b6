"""Exports of a quantized Net: (a) a tensors-only .pt of integer tensors and qparams that loads
back into the integer engine, and (b) an ONNX model in QDQ form for ONNX Runtime.

qtensors format (torch.save of a dict of tensors and plain values; read with weights_only=True):
  format: "qlab-qtensors/1", config: QuantConfig JSON, input_scale: float, input_zero: int,
  input_qmin / input_qmax: int, and per layer "<name>.<field>" for the fields of IntegerLayer, with
  weights stored as "<name>.weight_packed" (uint8, "<name>.weight_bits" bits per value, LSB first,
  after subtracting "<name>.weight_offset", the smallest weight) plus "<name>.weight_shape". The
  width is each layer's own, so mixed-precision layers pack at their own bit-width.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import fields, replace
from typing import BinaryIO

import torch

from qcore.data import MNIST, DatasetSpec
from qcore.graph import PASSTHROUGH_KINDS, Op, OpKind, QuantPlan, model_graph
from qcore.inference.integer import IntegerLayer, IntegerNet, Requantization
from qcore.models.net import Net
from qcore.quantize.qmodel import QuantizedNet, float_parts
from qcore.quantize.quant import QParams

QTENSORS_FORMAT = "qlab-qtensors/1"
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
    }
    for name, layer in engine.layers.items():
        offset = int(layer.weight.min())
        bits = max(1, (int(layer.weight.max()) - offset).bit_length())  # at most the layer's bit-width
        state[f"{name}.weight_packed"] = pack_bits(layer.weight - offset, bits)
        state[f"{name}.weight_bits"] = bits
        state[f"{name}.weight_shape"] = list(layer.weight.shape)
        state[f"{name}.weight_offset"] = offset
        for f in fields(IntegerLayer):
            if f.name in ("name", "weight"):
                continue
            value = getattr(layer, f.name)
            state[f"{name}.{f.name}"] = value.to(torch.int32) if isinstance(value, torch.Tensor) else value
    torch.save(state, destination)


def qtensors_bytes(engine: IntegerNet) -> bytes:
    buffer = io.BytesIO()
    export_qtensors(engine, buffer)
    return buffer.getvalue()


class LoadedIntegerNet(IntegerNet):
    """An IntegerNet rebuilt from a qtensors file alone (no float weights, no calibration)."""

    def __init__(self, state: dict[str, object]) -> None:
        from qcore.config import QuantConfig

        if state.get("format") != QTENSORS_FORMAT:
            raise ValueError(f"not a {QTENSORS_FORMAT} file")
        self.config = QuantConfig.from_json(str(state["config"]))
        self.input_qparams = QParams(
            torch.tensor(float(state["input_scale"])),
            torch.tensor(int(state["input_zero"])),
            int(state["input_qmin"]),
            int(state["input_qmax"]),
        )
        # format 1 holds the bundled net's four layers; its graph says where each one's output goes
        self.graph = model_graph(Net())
        self.layers = {}
        for name in self.graph.layers:
            shape = [int(v) for v in state[f"{name}.weight_shape"]]  # type: ignore[union-attr]
            count = int(torch.tensor(shape).prod())
            packed = state[f"{name}.weight_packed"]
            assert isinstance(packed, torch.Tensor)
            bits = int(state[f"{name}.weight_bits"])  # type: ignore[call-overload]
            weight = (unpack_bits(packed, bits, count) + int(state[f"{name}.weight_offset"])).reshape(shape)
            values = {
                f.name: state[f"{name}.{f.name}"] for f in fields(IntegerLayer) if f.name not in ("name", "weight")
            }
            tensors = {k: v.to(torch.int64) if isinstance(v, torch.Tensor) else v for k, v in values.items()}
            self.layers[name] = IntegerLayer(name=name, weight=weight, **tensors)  # type: ignore[arg-type]
        self._requant, self._cat_inputs, self._adds, self._layer_requant = {}, {}, {}, {}
        self._grid_clamps = {}  # the chain's ReLUs all act on accumulators
        self._output_point = None
        self.plan = QuantPlan((), {"input": "input"}, {})
        self.points = {"input": self.input_qparams}
        for name, layer in self.layers.items():
            requant = Requantization(
                name,
                torch.zeros(0),
                layer.multiplier,
                layer.shift,
                1,
                layer.output_zero,
                layer.output_min,
                layer.output_max,
            )
            self._layer_requant[name] = requant
            after, last = self.graph.consumers(name), self.graph.op(name)
            while after and after[0].kind in PASSTHROUGH_KINDS:  # to the op the next layer reads
                last, after = after[0], self.graph.consumers(after[0].name)
            if after and after[0].is_layer:
                self._requant[last.name] = replace(requant, repeat=_flattened_repeat(self.graph, name, last.name))
            else:
                self._requant["<logits>"] = requant


def _flattened_repeat(graph, layer: str, point: str) -> int:
    """How many values each of `layer`'s channels holds at `point` (more than one after a flatten)."""
    before, after = graph.op(layer).shape, graph.op(point).shape
    return 1 if len(before) == len(after) else after[1] // before[1]


def load_qtensors(source: str | os.PathLike[str] | bytes | BinaryIO) -> LoadedIntegerNet:
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


def export_onnx(qnet: QuantizedNet, dataset: DatasetSpec = MNIST) -> bytes:
    """The quantized model as an ONNX graph in QDQ form: QuantizeLinear/DequantizeLinear pairs on each
    layer's input (uint8, after a Clip to the b-bit range when b < 8), weights as int8/uint8
    initializers behind per-channel or per-tensor DequantizeLinear, int32 bias at s_in * s_w.
    Output: logits (float). ONNX Runtime fuses the pairs into its integer kernels. The graph takes the
    normalized image; metadata_props say how to make it (normalize_mean, normalize_std of pixels in
    [0, 1]), the dataset and its class names (JSON)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    missing = float_parts(qnet)
    if missing:
        raise ValueError(f"ONNX QDQ export needs every layer and the input quantized; float: {', '.join(missing)}")
    if qnet.config.weight_bits > 8 or qnet.config.act_bits > 8:
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
            out = "input"
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
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *qnet.graph.input_shape])],
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


def _onnx_layer(qnet: QuantizedNet, op: Op, source: str, nodes: list, constant, quantize_dequantize) -> str:
    """One conv or linear layer in QDQ form: its input through Q/DQ at its input qparams, its weights
    as integers behind DequantizeLinear, its int32 bias at s_in * s_w."""
    import numpy as np
    from onnx import helper

    name, quant = op.name, qnet.layers[op.name]
    iq, wq = quant.input_qparams, quant.weight_qparams
    assert iq is not None and wq is not None and quant.weight_int is not None and quant.bias_int is not None
    x = quantize_dequantize(source, name, iq)
    signed = wq.qmin < 0
    weight_dtype = np.int8 if signed else np.uint8
    per_channel = wq.axis is not None
    nodes.append(
        helper.make_node(
            "DequantizeLinear",
            [
                constant(f"{name}.w_int", quant.weight_int.numpy().astype(weight_dtype)),
                constant(f"{name}.w_scale", wq.scale.numpy().astype(np.float32)),
                constant(f"{name}.w_zero", wq.zero_point.numpy().astype(weight_dtype)),
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
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])

    def predict(self, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        import numpy as np

        outputs = [
            self.session.run(["logits"], {"input": images[start : start + batch_size].numpy()})[0].argmax(axis=1)
            for start in range(0, len(images), batch_size)
        ]
        return torch.from_numpy(np.concatenate(outputs)).to(torch.int64)
