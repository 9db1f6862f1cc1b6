"""The model graph: a float network as an ordered list of the operations the lab supports. This is
the one place that knows the order of operations; the simulation, calibration, methods, QAT, the
integer engine and the exports all walk it."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import nn


class GraphError(ValueError):
    """A model the lab cannot run: one line naming the operation and where it is."""


class OpKind(StrEnum):
    INPUT = "input"
    CONV = "conv"  # Conv2d (any stride, zero padding, groups; BatchNorm folded in)
    LINEAR = "linear"
    RELU = "relu"
    RELU6 = "relu6"
    MAXPOOL = "maxpool"
    AVGPOOL = "avgpool"  # AvgPool2d without padding, and global average pooling
    FLATTEN = "flatten"  # flatten / view / reshape to (batch, features)
    ADD = "add"  # residual add of two tensors of one shape
    CAT = "cat"  # along channels
    LOG_SOFTMAX = "log_softmax"
    # an elementwise activation other than ReLU (sigmoid, tanh, ...): its input and output are quantization
    # points, and on integers it is a table over its input's levels (TFLite's int8 LOGISTIC and TANH)
    LOOKUP = "lookup"
    # a normalization by the sample's own statistics (MeanVarianceNormalization, InstanceNormalization,
    # LayerNormalization): float between a dequantize and a quantize (ONNX Runtime's QDQ treatment of an
    # operator without an integer kernel); the integer engine has no rule for it
    NORMALIZE = "normalize"


LAYER_KINDS = (OpKind.CONV, OpKind.LINEAR)
# The operation kinds `python -m qcore models` lists, in this order
OP_KIND_NAMES = (
    "conv",
    "depthwise_conv",
    "linear",
    "batchnorm",
    "relu",
    "relu6",
    "maxpool",
    "avgpool",
    "global_avgpool",
    "add",
    "concat",
    "flatten",
    *("sigmoid", "tanh", "leaky_relu", "elu", "hardsigmoid", "hardswish"),
    *("mvn", "instance_norm", "layer_norm"),
)


class Activation(nn.Module):
    """An elementwise activation the lab computes by lookup on integers: `function` is one of
    ACTIVATIONS, `parameter` its setting (LeakyReLU's slope, ELU's alpha, HardSigmoid's alpha and beta)."""

    def __init__(self, function: str, parameter: tuple[float, ...] = ()) -> None:
        super().__init__()
        if function not in ACTIVATIONS:
            raise GraphError(f"unknown activation {function!r}")
        self.function, self.parameter = function, tuple(float(p) for p in parameter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return activation(self.function, self.parameter, x)

    def extra_repr(self) -> str:
        return f"{self.function}{self.parameter or ''}"


class Normalization(nn.Module):
    """x normalized by its own mean and variance over `axes` (never the batch), then times `weight` plus
    `bias` when given (broadcast over the normalized axes' positions, as ONNX's operators define them):
    `function` names the ONNX operator it came from."""

    def __init__(
        self,
        function: str,
        axes: tuple[int, ...],
        eps: float,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if 0 in axes:
            raise GraphError("a normalization over the batch")
        self.function, self.axes, self.eps = function, tuple(axes), float(eps)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalization(x, self.axes, self.eps, self.weight, self.bias)


def normalization(
    x: torch.Tensor, axes: tuple[int, ...], eps: float, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over `axes` (the biased variance), then * weight + bias."""
    mean = x.mean(dim=axes, keepdim=True)
    variance = ((x - mean) ** 2).mean(dim=axes, keepdim=True)
    y = (x - mean) / torch.sqrt(variance + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


# the activations and their float definitions (the float model, the simulation's tables and the engine's)
ACTIVATIONS = ("sigmoid", "tanh", "leaky_relu", "elu", "hardsigmoid", "hardswish")


def activation(function: str, parameter: tuple[float, ...], x: torch.Tensor) -> torch.Tensor:
    """`function` of ACTIVATIONS applied to `x`, as ONNX defines it (HardSigmoid: clamp(alpha x + beta, 0, 1),
    alpha and beta given; HardSwish: x * clamp(x / 6 + 1/2, 0, 1))."""
    if function == "sigmoid":
        return torch.sigmoid(x)
    if function == "tanh":
        return torch.tanh(x)
    if function == "leaky_relu":
        return F.leaky_relu(x, parameter[0])
    if function == "elu":
        return F.elu(x, parameter[0])
    if function == "hardsigmoid":
        return torch.clamp(parameter[0] * x + parameter[1], 0.0, 1.0)
    if function == "hardswish":
        return F.hardswish(x)
    raise GraphError(f"unknown activation {function!r}")


def max_pool(
    x: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int] = (0, 0),
    pad_value: float = float("-inf"),
) -> torch.Tensor:
    """Max-pooling (dilation 1, no ceil_mode: what the graph accepts) as the elementwise maximum of the
    kernel's taps, each a strided slice: the same values as F.max_pool2d, padding included (`pad_value`
    never wins a window) and 3 to 6x faster on CPU, where max_pool2d also computes the indices it keeps
    for the backward pass (measured: a 2x2 pool of a [1000, 20, 24, 24] batch, 13.7 ms against 48.4 ms).
    A tensor that needs gradients goes to F.max_pool2d, which sends a tie's gradient to one input as
    QAT always has; integers (the engine's) take the slices whatever `pad_value`."""
    if x.requires_grad:
        return F.max_pool2d(x, kernel, stride, padding)
    if padding != (0, 0):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]), value=pad_value)
    out_h = (x.shape[-2] - kernel[0]) // stride[0] + 1
    out_w = (x.shape[-1] - kernel[1]) // stride[1] + 1
    pooled: torch.Tensor | None = None
    for row in range(kernel[0]):
        for col in range(kernel[1]):
            rows = slice(row, row + stride[0] * (out_h - 1) + 1, stride[0])
            cols = slice(col, col + stride[1] * (out_w - 1) + 1, stride[1])
            tap = x[..., rows, cols]
            pooled = tap.clone() if pooled is None else torch.maximum(pooled, tap, out=pooled)
    assert pooled is not None  # a kernel has at least one tap
    return pooled


def hash_tensor(hasher: hashlib._Hash, tensor: torch.Tensor) -> None:
    """Feed `hasher` a tensor's dtype, shape and bytes: content, never identity (every digest that keys a
    cache by tensors goes through here)."""
    tensor = tensor.detach().cpu().contiguous()
    hasher.update(f"tensor{tensor.dtype}{tuple(tensor.shape)}|".encode())
    hasher.update(tensor.numpy().tobytes())


# Operations that commute with a positive per-channel scale and a monotone rounding: on the integer
# path they run on whatever the tensor holds (accumulators or quantized integers) and share its grid
PASSTHROUGH_KINDS = (OpKind.RELU, OpKind.RELU6, OpKind.MAXPOOL, OpKind.FLATTEN)


@dataclass(frozen=True)
class Op:
    """One operation: its name (a layer's module path, else the traced node's name), kind, the names
    of the ops it reads, its output shape for a batch of two, and its settings (stride, padding, ...)."""

    name: str
    kind: OpKind
    inputs: tuple[str, ...]
    shape: tuple[int, ...]
    attrs: dict[str, object] = field(default_factory=dict, compare=False)

    @property
    def is_layer(self) -> bool:
        return self.kind in LAYER_KINDS


@dataclass
class ModelGraph:
    """Operations in execution order, the op whose value is the output, each layer's float weight and
    bias (BatchNorm already folded in), and which BatchNorm was folded into which conv."""

    ops: tuple[Op, ...]
    output: str
    parameters: dict[str, tuple[torch.Tensor, torch.Tensor]]
    folded_batchnorm: dict[str, str] = field(default_factory=dict)
    input_shape: tuple[int, ...] = (1, 28, 28)

    def __post_init__(self) -> None:
        self.by_name = {op.name: op for op in self.ops}
        self._consumers: dict[str, list[Op]] = {op.name: [] for op in self.ops}
        for op in self.ops:
            for name in dict.fromkeys(op.inputs):  # x + x reads x once as far as consumers go
                self._consumers[name].append(op)
        last_read = {name: index for index, op in enumerate(self.ops) for name in op.inputs}
        self._freed_after: list[tuple[str, ...]] = [
            tuple(n for n in dict.fromkeys(op.inputs) if last_read[n] == index and n != self.output)
            for index, op in enumerate(self.ops)
        ]

    @property
    def layers(self) -> tuple[str, ...]:
        """The conv and linear layers in execution order: the names every per-layer table uses."""
        return tuple(op.name for op in self.ops if op.is_layer)

    def op(self, name: str) -> Op:
        return self.by_name[name]

    def freed_after(self, index: int) -> tuple[str, ...]:
        """The values op `index` is the last to read (never the output): a walk over the ops drops them
        there, so their memory is reused while warm (the simulation's and the integer engine's walks)."""
        return self._freed_after[index]

    def digest(self) -> str:
        """A content hash of everything that decides the graph's outputs: each op's name, kind, inputs,
        shape and settings (tensors by their bytes), and every parameter, to key caches by."""
        hasher = hashlib.blake2b(digest_size=20)

        def feed(value: object) -> None:
            if isinstance(value, torch.Tensor):
                hash_tensor(hasher, value)
            else:
                hasher.update(repr(value).encode())
            hasher.update(b"|")

        for op in self.ops:
            feed((op.name, op.kind.value, op.inputs, op.shape))
            for key in sorted(op.attrs):
                feed(key)
                value = op.attrs[key]
                for part in value if isinstance(value, tuple | list) else (value,):
                    feed(part)
        feed(self.output)
        for name in sorted(self.parameters):
            feed(name)
            for tensor in self.parameters[name]:
                feed(tensor)
        return hasher.hexdigest()

    def values_per_image(self) -> int:
        """How many values one image writes across every op's output: what a batch's working set scales with."""
        return sum(math.prod(op.shape[1:]) for op in self.ops)

    def consumers(self, name: str) -> list[Op]:
        """The ops that read `name`, in execution order."""
        return list(self._consumers[name])

    def weight(self, name: str) -> torch.Tensor:
        return self.parameters[name][0]

    def bias(self, name: str) -> torch.Tensor:
        return self.parameters[name][1]

    def with_parameters(self, parameters: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> ModelGraph:
        """The same operations with other weights (equalization, bias correction, QAT's trained ones)."""
        return ModelGraph(self.ops, self.output, dict(parameters), dict(self.folded_batchnorm), self.input_shape)

    def with_kinds(self, kinds: dict[str, OpKind]) -> ModelGraph:
        """The same graph with some ops of another kind (equalization turns the ReLU6 it crosses into ReLU)."""
        ops = tuple(replace(op, kind=kinds[op.name]) if op.name in kinds else op for op in self.ops)
        return ModelGraph(ops, self.output, dict(self.parameters), dict(self.folded_batchnorm), self.input_shape)

    def is_depthwise(self, name: str) -> bool:
        """A conv with one group per input channel (MobileNet's depthwise layer)."""
        op = self.op(name)
        channels = self.op(op.inputs[0]).shape[1]
        return op.kind is OpKind.CONV and channels > 1 and op.attrs.get("groups") == channels

    def is_global_pool(self, name: str) -> bool:
        """An average pool whose window is the whole feature map (global average pooling)."""
        op = self.op(name)
        return op.kind is OpKind.AVGPOOL and tuple(op.attrs["kernel"]) == tuple(self.op(op.inputs[0]).shape[2:])

    def op_kinds(self) -> list[str]:
        """The kinds of operation in this model, in OP_KIND_NAMES' order: a conv counts as
        depthwise_conv when it is one, folded BatchNorm as batchnorm, a whole-map average pool as
        global_avgpool (the final log_softmax is not listed: it is not quantized)."""
        found = {"batchnorm"} if self.folded_batchnorm else set()
        for op in self.ops:
            if op.kind is OpKind.CONV:
                found.add("depthwise_conv" if self.is_depthwise(op.name) else "conv")
            elif op.kind is OpKind.AVGPOOL:
                found.add("global_avgpool" if self.is_global_pool(op.name) else "avgpool")
            elif op.kind in (OpKind.LOOKUP, OpKind.NORMALIZE):
                found.add(str(op.attrs["function"]))
            else:
                found.add({OpKind.CAT: "concat"}.get(op.kind, op.kind.value))
        return [kind for kind in OP_KIND_NAMES if kind in found]

    def layer_ops(self) -> Iterator[Op]:
        return (op for op in self.ops if op.is_layer)

    def is_chain(self) -> bool:
        """Every op reads the op just before it and nothing else reads that (the bundled net's shape)."""
        return all(op.inputs == (self.ops[i].name,) for i, op in enumerate(self.ops[1:])) and all(
            len(self.consumers(op.name)) <= 1 for op in self.ops
        )

    def check(self) -> None:
        """What every path relies on: at least one layer, a layer before the output, and the output a
        vector of class scores."""
        if not self.layers:
            raise GraphError("the model has no Conv2d or Linear layer to quantize")
        out = self.op(self.output)
        if len(out.shape) != 2:
            raise GraphError(f"the model's output must be (batch, classes), not {list(out.shape)}")
        for op in self.ops:
            if op.kind is OpKind.LINEAR and len(self.op(op.inputs[0]).shape) != 2:
                raise GraphError(f"Linear layer {op.name} needs a flattened input (batch, features)")
            if op.kind is OpKind.CONV and len(self.op(op.inputs[0]).shape) != 4:
                raise GraphError(f"Conv2d layer {op.name} needs an image-shaped input (batch, channels, h, w)")
