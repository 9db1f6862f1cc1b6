"""The model being trained: the model graph's layers with fake-quantized weights, biases and
quantization points (QatNet), its two walks (quantized and the control's float one), and the
deployed QuantizedNet built from what it learned."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qcore.graph import GraphRun, ModelGraph, ModelGraphModule, Op, OpKind, QuantPlan, model_graph
from qcore.models.net import LAYER_NAMES, Net, layer
from qcore.quantize.config import QuantConfig
from qcore.quantize.qmodel import (
    BIAS_BITS,
    LayerQuant,
    QuantizedNet,
    QuantPoint,
    config_plan,
    layer_weight_bits,
    point_bits,
    rounded_average_levels,
)
from qcore.quantize.quant import QParams, Scheme, integer_range, quantize, quantize_bias
from qcore.training.qat.config import EMA_CONSTANT, MIN_SCALE, QatError
from qcore.training.qat.fake_quantizer import fake_quantize_ste, lsq_gradient_factor, straight_through


def _channel_view(vector: torch.Tensor, ndim: int) -> torch.Tensor:
    return vector.reshape([-1] + [1] * (ndim - 1))


def _key(name: str) -> str:
    """A graph name as a ParameterDict key (which may not contain dots)."""
    return name.replace(".", "__")


class QatNet(nn.Module):
    """The model graph's layers with fake-quantized weights and biases and every quantization point
    fake-quantized; the grid starts at `start`'s (PTQ calibration)."""

    def __init__(
        self, start: QuantizedNet, method: str, source: nn.Module | None = None, quantize: bool = True
    ) -> None:
        super().__init__()
        self.method = method
        self.quantize = quantize  # False: the control run, the same weights and training without any quantizer
        self.config = start.config
        self.graph, self.plan = start.graph, start.plan
        self.__dict__["source"] = source  # the float model QAT started from (not a submodule)
        self.weights = nn.ParameterDict()
        self.biases = nn.ParameterDict()
        self.weight_scales = nn.ParameterDict()
        self.input_scales = nn.ParameterDict()  # one per quantization point
        self.weight_range: dict[str, tuple[int, int]] = {}
        self.input_range: dict[str, tuple[int, int]] = {}
        learn_scales = method == "lsq"
        self.register_buffer("no_zero", torch.zeros((), dtype=torch.int64))
        for name in self.graph.layers:
            quant = start.layers[name]
            wq, iq = quant.weight_qparams, quant.input_qparams
            if wq is None or iq is None or wq.axis != 0:
                raise QatError("QAT needs every layer and the input quantized, weights per-channel")
            # channels_last: oneDNN's convolution kernels run faster in it (as in qcore.training.train)
            weight = quant.weight.clone()
            if weight.ndim == 4:
                weight = weight.contiguous(memory_format=torch.channels_last)
            self.weights[_key(name)] = nn.Parameter(weight)
            self.biases[_key(name)] = nn.Parameter(quant.bias.clone())
            self.weight_scales[_key(name)] = nn.Parameter(wq.scale.clone().float(), requires_grad=learn_scales)
            self.weight_range[name] = (wq.qmin, wq.qmax)
        for point in self.plan.points:
            qparams = start.points[point].qparams
            # the network's input grid is the data's: it stays at its calibrated range (learning it would
            # also cost the first layer a gradient with respect to its input, about a fifth of a step)
            learn_input = learn_scales and self.graph.op(point).kind is not OpKind.INPUT
            self.input_scales[_key(point)] = nn.Parameter(qparams.scale.clone().float(), requires_grad=learn_input)
            self.register_buffer(f"{_key(point)}_input_zero", qparams.zero_point.clone().to(torch.int64))
            self.input_range[point] = (qparams.qmin, qparams.qmax)
            # the EMA-observed range of the plain STE (the range the calibrated qparams cover)
            low = (qparams.qmin - float(qparams.zero_point)) * float(qparams.scale)
            high = (qparams.qmax - float(qparams.zero_point)) * float(qparams.scale)
            self.register_buffer(f"{_key(point)}_ema", torch.tensor([low, high], dtype=torch.float32))

    def input_zero(self, point: str) -> torch.Tensor:
        return getattr(self, f"{_key(point)}_input_zero")

    def point_scale(self, point: str) -> torch.Tensor:
        return self.input_scales[_key(point)]

    def layer_input_point(self, layer: str) -> str:
        return self.plan.layer_input[layer]

    def _observe(self, point: str, x: torch.Tensor) -> None:
        """The plain STE's activation range: an EMA of batch min and max, then scale and zero point."""
        ema = getattr(self, f"{_key(point)}_ema")
        batch = torch.stack([x.detach().min(), x.detach().max()])
        ema.add_(EMA_CONSTANT * (batch - ema))
        qmin, qmax = self.input_range[point]
        low, high = float(min(ema[0], 0.0)), float(max(ema[1], 0.0))
        scale = max((high - low) / (qmax - qmin), MIN_SCALE)
        with torch.no_grad():
            self.point_scale(point).fill_(scale)
            self.input_zero(point).fill_(int(min(max(round(qmin - low / scale), qmin), qmax)))

    def _quantized_point(self, point: str, x: torch.Tensor, observe: bool = True) -> torch.Tensor:
        if observe and self.method == "ste" and self.training:
            self._observe(point, x)
        scale = self.point_scale(point)
        qmin, qmax = self.input_range[point]
        zero = self.input_zero(point)
        factor = lsq_gradient_factor(x[0].numel(), qmax - int(zero)) if self.method == "lsq" else 1.0
        return fake_quantize_ste(x, scale, zero, qmin, qmax, factor)

    def _quantized_weight_and_bias(self, name: str, input_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight, scale = self.weights[_key(name)], self.weight_scales[_key(name)]
        qmin, qmax = self.weight_range[name]
        factor = lsq_gradient_factor(weight[0].numel(), qmax) if self.method == "lsq" else 1.0
        view = _channel_view(scale, weight.ndim)
        weight_q = fake_quantize_ste(weight, view, self.no_zero, qmin, qmax, factor)
        # int32 bias: its rounding is far below the weights' and inputs', so plain STE, no scale gradient
        bias = self.biases[_key(name)]
        bias_scale = (input_scale * scale).detach()
        bias_q = straight_through(bias, torch.round(bias / bias_scale) * bias_scale)
        return weight_q, bias_q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QatRun(self).run(x) if self.quantize else _ControlRun(self).run(x)

    def trained_parameters(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {
            name: (
                self.weights[_key(name)].detach().cpu().contiguous().clone(),
                self.biases[_key(name)].detach().cpu().clone(),
            )
            for name in self.graph.layers
        }

    def float_model(self) -> nn.Module:
        """The trained float weights (the latent weights QAT updates): a Net for the bundled net's
        architecture, else the graph with the trained weights."""
        parameters = self.trained_parameters()
        if self.source is not None and not isinstance(self.source, Net):
            return ModelGraphModule(self.graph.with_parameters(parameters)).eval()
        return net_with_parameters(parameters)

    def qparams(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per layer: its weight scales and its input point's scale and zero point (the checkpoint's)."""
        return {
            name: {
                "weight_scale": self.weight_scales[_key(name)].detach().cpu().clone(),
                "input_scale": self.point_scale(self.layer_input_point(name)).detach().cpu().clone(),
                "input_zero_point": self.input_zero(self.layer_input_point(name)).detach().cpu().clone(),
            }
            for name in self.graph.layers
        }

    def quantized_net(self, config: QuantConfig) -> QuantizedNet:
        """The deployed model for any graph: integer weights and int32 biases at the trained scales,
        every point at its trained scale and zero point."""
        return deployed_net(
            self.graph.with_parameters(self.trained_parameters()),
            self.plan,
            config,
            {name: self.weight_scales[_key(name)].detach().cpu().float() for name in self.graph.layers},
            {
                point: QParams(
                    self.point_scale(point).detach().cpu().float().reshape(()).clone(),
                    self.input_zero(point).detach().cpu().to(torch.int64).reshape(()).clone(),
                    *self.input_range[point],
                )
                for point in self.plan.points
            },
        )


def net_with_parameters(parameters: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Net:
    """The notebook's Net holding per-layer (weight, bias), as the model graph names its layers."""
    net = Net()
    with torch.no_grad():
        for name in LAYER_NAMES:
            layer(net, name).weight.copy_(parameters[name][0])
            layer(net, name).bias.copy_(parameters[name][1])
    return net.eval()


def deployed_net(
    graph: ModelGraph,
    plan: QuantPlan,
    config: QuantConfig,
    weight_scales: dict[str, torch.Tensor],
    point_qparams: dict[str, QParams],
) -> QuantizedNet:
    """A graph with trained weights as the simulation runs it: each layer's weights rounded at its
    trained per-channel scales, its bias to int32 at s_in * s_w, every point on its trained grid. QAT's
    finished run and a loaded QAT checkpoint of any graph both build it here."""
    points = {point: QuantPoint(point, qparams, None) for point, qparams in point_qparams.items()}
    weight_bits = layer_weight_bits(graph, config)
    layers = {
        name: _layer_quant(
            name,
            graph.weight(name),
            graph.bias(name),
            weight_scales[name],
            points[plan.layer_input[name]].qparams,
            weight_bits[name],
        )
        for name in graph.layers
    }
    return QuantizedNet(layers, config, ModelGraphModule(graph), graph=graph, plan=plan, points=points).eval()


class _QatRun(GraphRun):
    """The model graph's walk with the STE quantizers on each layer's input, weights and bias."""

    def __init__(self, net: QatNet) -> None:
        super().__init__(net.graph)
        self.net = net
        self._bias: torch.Tensor | None = None

    def compute(self, op: Op, args: list[torch.Tensor]) -> torch.Tensor:
        if op.kind is OpKind.CAT and self.net.method == "ste" and self.net.training:
            # the cat's range is observed on its float inputs, before they are moved onto its grid
            self.net._observe(op.name, torch.cat(args, dim=1))
        return super().compute(op, args)

    def after(self, op: Op, value: torch.Tensor) -> torch.Tensor:
        if op.name in self.net.input_range:  # a quantization point
            return self.net._quantized_point(op.name, value, observe=op.kind is not OpKind.CAT)
        if op.kind is OpKind.RELU6 and op.name in self.net.plan.grid:  # 6 may lie off the grid
            return self.net._quantized_point(self.net.plan.grid[op.name], value, observe=False)
        return value

    def cat_input(self, op: Op, value: torch.Tensor) -> torch.Tensor:
        return self.net._quantized_point(op.name, value, observe=False)

    def avg_pool(self, op: Op, x: torch.Tensor) -> torch.Tensor:
        """The engine's rounded integer average (as the simulation computes it), with the average
        pool's own gradient (STE)."""
        point = self.net.plan.grid[op.inputs[0]]
        amin, amax = self.net.input_range[point]
        scale, zero = self.net.point_scale(point), self.net.input_zero(point)
        qparams = QParams(scale.detach().reshape(()), zero.reshape(()), amin, amax)
        zero = zero.to(x.dtype)
        levels = F.avg_pool2d(x / scale + zero, op.attrs["kernel"], op.attrs["stride"])  # type: ignore[arg-type]
        rounded = rounded_average_levels(x, qparams, op).to(x.dtype)
        return (straight_through(levels, rounded) - zero) * scale

    def weight(self, op: Op) -> torch.Tensor:
        input_scale = self.net.point_scale(self.net.layer_input_point(op.name))
        weight, self._bias = self.net._quantized_weight_and_bias(op.name, input_scale)
        return weight

    def bias(self, op: Op) -> torch.Tensor:
        assert self._bias is not None  # weight() runs first, for the same layer
        bias, self._bias = self._bias, None
        return bias


class _ControlRun(GraphRun):
    """The model graph's float walk on QatNet's latent weights: what the same fine-tuning does with no quantizer."""

    def __init__(self, net: QatNet) -> None:
        super().__init__(net.graph)
        self.net = net

    def weight(self, op: Op) -> torch.Tensor:
        return self.net.weights[_key(op.name)]

    def bias(self, op: Op) -> torch.Tensor:
        return self.net.biases[_key(op.name)]


def _layer_quant(
    name: str,
    weight: torch.Tensor,
    bias: torch.Tensor,
    weight_scale: torch.Tensor,
    input_qparams: QParams,
    weight_bits: int,
) -> LayerQuant:
    """One layer at trained scales: weights rounded to nearest (symmetric, `weight_bits`), the bias to
    int32 at s_in * s_w."""
    wmin, wmax = integer_range(weight_bits, Scheme.SYMMETRIC)
    weight_qparams = QParams(weight_scale, torch.zeros_like(weight_scale, dtype=torch.int64), wmin, wmax, 0)
    quant = LayerQuant(
        name,
        weight,
        bias,
        weight_qparams,
        quantize(weight, weight_qparams),
        input_qparams,
        None,
        None,
        weight_bits,
    )
    assert quant.bias_scale is not None
    quant.bias_int = quantize_bias(bias, quant.bias_scale, BIAS_BITS)
    return quant


def to_quantized_net(model: Net, qparams: dict[str, dict[str, torch.Tensor]], config: QuantConfig) -> QuantizedNet:
    """The deployed model: integer weights and int32 biases at the trained scales, as PTQ builds them."""
    graph = model_graph(model)
    plan = config_plan(graph, config)
    act_bits, weight_bits = point_bits(graph, plan, config), layer_weight_bits(graph, config)
    layers = {}
    for name in LAYER_NAMES:
        module = layer(model, name)
        input_qparams = QParams(
            qparams[name]["input_scale"].float().reshape(()),
            qparams[name]["input_zero_point"].to(torch.int64).reshape(()),
            *integer_range(act_bits[plan.layer_input[name]], Scheme.ASYMMETRIC),
        )
        layers[name] = _layer_quant(
            name,
            module.weight.detach().clone(),
            module.bias.detach().clone(),
            qparams[name]["weight_scale"].float(),
            input_qparams,
            weight_bits[name],
        )
    points = {point: QuantPoint(point, layers[name].input_qparams, None) for name, point in plan.layer_input.items()}  # type: ignore[arg-type]
    return QuantizedNet(layers, config, model, graph=graph, plan=plan, points=points).eval()
