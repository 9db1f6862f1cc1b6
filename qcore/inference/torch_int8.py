"""Cross-check against PyTorch's own int8 kernels: torch.ao.quantization eager mode on the x86
(fbgemm/oneDNN) engine, calibrated on the same training batches as ours. Torch picks its own
ranges (histogram observer, 7-bit reduced-range activations, per-channel symmetric int8 weights).

Eager mode needs a module per operation, with stubs where tensors enter and leave the quantized
domain and FloatFunctional for adds and cats; `_EagerGraph` builds exactly that from the model graph
(BatchNorm already folded) and walks the graph's ops in order, so no forward pass is written here.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qcore.graph import ModelGraph, Op, OpKind, model_graph

TORCH_ENGINE = "x86"


def _eager_order(graph: ModelGraph) -> list[Op]:
    """The graph's ops, with a ReLU that follows a max-pool right after a layer moved before the pool
    (ReLU and max commute) so that torch can fuse it with the layer, as its eager fusion needs."""
    ops = list(graph.ops)
    for index, op in enumerate(ops[:-2]):
        pool, relu = ops[index + 1], ops[index + 2]
        if (
            op.is_layer
            and pool.kind is OpKind.MAXPOOL
            and relu.kind is OpKind.RELU
            and pool.inputs == (op.name,)
            and relu.inputs == (pool.name,)
            and len(graph.consumers(op.name)) == 1
            and len(graph.consumers(pool.name)) == 1
        ):
            # the kinds swap places; the names stay, so what reads the ReLU still reads the last of the two
            ops[index + 1] = Op(pool.name, OpKind.RELU, (op.name,), op.shape, relu.attrs)
            ops[index + 2] = Op(relu.name, OpKind.MAXPOOL, (pool.name,), relu.shape, pool.attrs)
    return ops


class _EagerGraph(nn.Module):
    """The model graph as eager mode's module: a QuantStub, one submodule per operation (the layers
    with their folded float weights), FloatFunctional for adds and cats, a DeQuantStub before the
    log_softmax; forward walks the ops in the graph's order."""

    def __init__(self, graph: ModelGraph) -> None:
        from torch.ao.nn.quantized import FloatFunctional
        from torch.ao.quantization import DeQuantStub, QuantStub

        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.ops_ = _eager_order(graph)
        self.output = graph.output
        self.names: dict[str, str] = {}  # op -> submodule name (module names cannot hold dots)
        for index, op in enumerate(self.ops_):
            module: nn.Module | None = None
            if op.kind is OpKind.CONV:
                weight, bias = graph.parameters[op.name]
                module = nn.Conv2d(
                    weight.shape[1] * op.attrs["groups"],  # type: ignore[operator]
                    weight.shape[0],
                    tuple(weight.shape[2:]),
                    op.attrs["stride"],  # type: ignore[arg-type]
                    op.attrs["padding"],  # type: ignore[arg-type]
                    groups=op.attrs["groups"],  # type: ignore[arg-type]
                )
            elif op.kind is OpKind.LINEAR:
                weight, bias = graph.parameters[op.name]
                module = nn.Linear(weight.shape[1], weight.shape[0])
            elif op.kind is OpKind.RELU:
                module = nn.ReLU()
            elif op.kind is OpKind.RELU6:
                module = nn.ReLU6()
            elif op.kind is OpKind.MAXPOOL:
                module = nn.MaxPool2d(op.attrs["kernel"], op.attrs["stride"], op.attrs["padding"])  # type: ignore[arg-type]
            elif op.kind is OpKind.AVGPOOL:
                module = nn.AvgPool2d(op.attrs["kernel"], op.attrs["stride"])  # type: ignore[arg-type]
            elif op.kind in (OpKind.ADD, OpKind.CAT):
                module = FloatFunctional()
            elif op.kind is OpKind.LOOKUP:
                module = _torch_activation(str(op.attrs["function"]), op.attrs["parameter"])  # type: ignore[arg-type]
            if module is None:
                continue
            if op.is_layer:
                with torch.no_grad():
                    module.weight.copy_(weight)  # type: ignore[union-attr]
                    module.bias.copy_(bias)  # type: ignore[union-attr]
            self.names[op.name] = f"op{index}"
            self.add_module(f"op{index}", module)

    def fusions(self) -> list[list[str]]:
        """[layer, its ReLU] submodule pairs that eager mode fuses (the ReLU the layer's only reader)."""
        readers: dict[str, list[Op]] = {}
        for op in self.ops_:
            for name in op.inputs:
                readers.setdefault(name, []).append(op)
        return [
            [self.names[op.name], self.names[readers[op.name][0].name]]
            for op in self.ops_
            if op.is_layer and len(readers.get(op.name, [])) == 1 and readers[op.name][0].kind is OpKind.RELU
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: dict[str, torch.Tensor] = {}
        for op in self.ops_:
            if op.kind is OpKind.INPUT:
                value = self.quant(x)
            elif op.kind is OpKind.FLATTEN:
                value = values[op.inputs[0]].flatten(1)
            elif op.kind is OpKind.ADD:
                value = getattr(self, self.names[op.name]).add(values[op.inputs[0]], values[op.inputs[1]])
            elif op.kind is OpKind.CAT:
                value = getattr(self, self.names[op.name]).cat([values[name] for name in op.inputs], dim=1)
            elif op.kind is OpKind.LOG_SOFTMAX:
                value = F.log_softmax(self.dequant(values[op.inputs[0]]), dim=1)
            else:
                value = getattr(self, self.names[op.name])(values[op.inputs[0]])
            values[op.name] = value
        out = values[self.output]
        if self.ops_[-1].kind is OpKind.LOG_SOFTMAX and self.output == self.ops_[-1].name:
            return out
        return F.log_softmax(self.dequant(out), dim=1)


def _torch_activation(function: str, parameter: tuple[float, ...]) -> nn.Module:
    """torch's own module for an activation, which its eager int8 mode quantizes (its own kernels)."""
    if function == "hardsigmoid":
        if abs(parameter[0] - 1 / 6) > 1e-6 or parameter[1] != 0.5:  # ONNX stores alpha as float32
            raise ValueError(
                f"torch's int8 engine has HardSigmoid with alpha 1/6 and beta 1/2 only (this one: {parameter})"
            )
        return nn.Hardsigmoid()
    modules = {
        "sigmoid": lambda: nn.Sigmoid(),
        "tanh": lambda: nn.Tanh(),
        "leaky_relu": lambda: nn.LeakyReLU(parameter[0]),
        "elu": lambda: nn.ELU(parameter[0]),
        "hardswish": lambda: nn.Hardswish(),
    }
    return modules[function]()


def torch_int8_model(model: nn.Module, batches: Sequence[torch.Tensor]) -> nn.Module:
    """PyTorch's int8 version of `model`'s graph: fused conv/linear+ReLU, calibrated on `batches`."""
    import torch.ao.quantization as tq

    if TORCH_ENGINE not in torch.backends.quantized.supported_engines:
        raise RuntimeError(f"this PyTorch build has no {TORCH_ENGINE} quantized engine")
    torch.backends.quantized.engine = TORCH_ENGINE
    with warnings.catch_warnings():
        # torch.ao.quantization announces its own deprecation on every call; the API still works in
        # the pinned torch, and this module exists only to compare against it.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        eager = _EagerGraph(model_graph(model)).eval()
        if eager.fusions():  # fuse_modules reads an empty list as one fusion of nothing
            eager = tq.fuse_modules(eager, eager.fusions())
        eager.qconfig = tq.get_default_qconfig(TORCH_ENGINE)
        tq.prepare(eager, inplace=True)
        with torch.inference_mode():
            for images in batches:
                eager(images)
        tq.convert(eager, inplace=True)
    return eager
