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
import os
from dataclasses import fields
from typing import BinaryIO

import torch

from qcore.integer import IntegerLayer, IntegerNet
from qcore.model import LAYER_NAMES
from qcore.qmodel import QuantizedNet, float_parts
from qcore.quant import QParams

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
        self.layers = {}
        for name in LAYER_NAMES:
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


def export_onnx(qnet: QuantizedNet) -> bytes:
    """The quantized Net as an ONNX graph in QDQ form: QuantizeLinear/DequantizeLinear pairs on each
    layer's input (uint8, after a Clip to the b-bit range when b < 8), weights as int8/uint8
    initializers behind per-channel or per-tensor DequantizeLinear, int32 bias at s_in * s_w.
    Output: logits (float). ONNX Runtime fuses the pairs into its integer kernels."""
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

    current = "input"
    for index, name in enumerate(LAYER_NAMES):
        quant = qnet.layers[name]
        iq, wq = quant.input_qparams, quant.weight_qparams
        assert iq is not None and wq is not None and quant.weight_int is not None and quant.bias_int is not None
        scale, zero = float(iq.scale), int(iq.zero_point)
        if iq.qmax < 255:  # QuantizeLinear clamps to [0, 255]; a b-bit range needs its own clip
            low, high = scale * (iq.qmin - zero), scale * (iq.qmax - zero)
            nodes.append(
                helper.make_node(
                    "Clip",
                    [
                        current,
                        constant(f"{name}.clip_min", np.array(low, np.float32)),
                        constant(f"{name}.clip_max", np.array(high, np.float32)),
                    ],
                    [f"{name}.clipped"],
                )
            )
            current = f"{name}.clipped"
        s_in = constant(f"{name}.x_scale", np.array(scale, np.float32))
        z_in = constant(f"{name}.x_zero", np.array(zero, np.uint8))
        nodes.append(helper.make_node("QuantizeLinear", [current, s_in, z_in], [f"{name}.xq"]))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}.xq", s_in, z_in], [f"{name}.xdq"]))
        signed = wq.qmin < 0
        weight_dtype = np.int8 if signed else np.uint8
        per_channel = wq.axis is not None
        w_scale = wq.scale.numpy().astype(np.float32)
        w_zero = wq.zero_point.numpy().astype(weight_dtype)
        nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [
                    constant(f"{name}.w_int", quant.weight_int.numpy().astype(weight_dtype)),
                    constant(f"{name}.w_scale", w_scale),
                    constant(f"{name}.w_zero", w_zero),
                ],
                [f"{name}.wdq"],
                **({"axis": 0} if per_channel else {}),
            )
        )
        bias_scale = (scale * wq.scale.double()).numpy().astype(np.float32)
        channels = quant.bias.shape[0]
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
        if name.startswith("conv"):
            nodes.append(helper.make_node("Conv", [f"{name}.xdq", f"{name}.wdq", f"{name}.bdq"], [f"{name}.out"]))
            nodes.append(
                helper.make_node("MaxPool", [f"{name}.out"], [f"{name}.pool"], kernel_shape=[2, 2], strides=[2, 2])
            )
            nodes.append(helper.make_node("Relu", [f"{name}.pool"], [f"{name}.act"]))
            current = f"{name}.act"
            if LAYER_NAMES[index + 1] == "fc1":
                nodes.append(helper.make_node("Flatten", [current], ["flat"], axis=1))
                current = "flat"
        else:
            output = "logits" if name == LAYER_NAMES[-1] else f"{name}.out"
            nodes.append(helper.make_node("Gemm", [f"{name}.xdq", f"{name}.wdq", f"{name}.bdq"], [output], transB=1))
            if name != LAYER_NAMES[-1]:
                nodes.append(helper.make_node("Relu", [output], [f"{name}.act"]))
                current = f"{name}.act"
    graph = helper.make_graph(
        nodes,
        "qlab_quantized_net",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], producer_name="quantization-lab"
    )
    onnx.checker.check_model(model)
    return model.SerializeToString()


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
