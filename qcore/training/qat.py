"""Quantization-aware training (QAT): fine-tune a float Net with the simulation's quantizer in the
forward pass, so that the network learns to live on the grid it will be deployed on.

The forward pass is QuantizedNet's, op for op: each layer's input fake-quantized affine at
`act_bits` (round(x / s) + z, clamped, minus z, times s; round half to even), weights per-channel
symmetric at `weight_bits`, bias rounded at s_in * s_w, the logits left at the accumulator's scale.
Rounding has no useful derivative, so the backward pass uses the straight-through estimator
(Bengio et al. 2013): d round(v) / dv := 1, so inside the clipping range the quantizer passes the
gradient unchanged and outside it passes zero (the clamp's own derivative).

Two ways to choose the grid while training:
  lsq  Learned Step size Quantization (Esser et al. 2019): every scale s is a parameter. With
       v = x / s, Qn = qmin - z and Qp = qmax - z, the quantizer x' = s * clamp(round(v), Qn, Qp)
       has dx'/ds = round(v) - v inside the range, Qn below it and Qp above it, scaled by
       g = 1 / sqrt(N * Qp) (N: values sharing the scale) so that step sizes learn at the pace of
       the weights. Scales start from PTQ calibration (the default QuantConfig at the same bits).
  ste  A plain STE: weight scales stay at their PTQ values and each activation range follows an
       exponential moving average of the batch min and max (torch.ao's 0.01), as PyTorch's QAT does.

After training, `to_quantized_net` turns the trained weights and scales into a QuantizedNet (integer
weights, int32 bias), the same object PTQ builds, so the integer engine, the exports and every page
use it as they are. `save_qat` writes it as a tensors-only file; `load_qat` reads one back with the
same bounds as a state_dict.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import BinaryIO

import torch
import torch.nn.functional as F
from torch import nn

from qcore import cancel
from qcore.analysis.tables import quantize_for
from qcore.data import MAX_SEED, TRAIN_SIZE, Dataset
from qcore.files import JsonFileError, read_json, shorten
from qcore.graph import GraphRun, ModelGraphModule, Op, OpKind, model_graph
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
from qcore.training.train import MAX_EPOCHS, MAX_TRAIN_BATCH, resolve_device

QAT_FORMAT = "qlab-qat/1"
QAT_METHODS = ("lsq", "ste")
EMA_CONSTANT = 0.01  # torch.ao's MovingAverageMinMaxObserver averaging constant
HELD_OUT = 2000  # the last training images, never trained on: the live curve's accuracy
HISTOGRAM_BINS = 61
MAX_QAT_EPOCHS = 5  # the Model page's QAT tab offers 1 to 5; the CLI the same
MAX_META_CHARS = 200_000
MIN_SCALE = 1e-12
# int32 bias values stay below 2^24, so that with 8-bit products (800 x 255 x 127 < 2^25) the
# accumulators of every layer fit int32 with room to spare
BIAS_HEADROOM_BITS = 24
# a channel's weight step stays within 2^12 of its layer's largest: a step that much finer makes the
# channel's levels negligible anyway, and keeps every multiplier inside TFLite's fixed-point range
CHANNEL_STEP_SPAN_BITS = 12


class QatError(ValueError):
    """A QAT setting out of range; the message lists each problem."""


@dataclass(frozen=True)
class QatConfig:
    """QAT settings. The defaults: LSQ, Adam at lr 1e-3 with a cosine decay, batch 256, 2 epochs."""

    weight_bits: int = 2
    act_bits: int = 2
    edge_bits: int = 0  # > 0: the first and last layers (weights and inputs) at this many bits (LSQ's 8)
    add_bits: int = 0  # > 0: the tensors that are no layer's input (residual adds' inputs) at this many bits
    epochs: int = 2
    method: str = "lsq"
    lr: float = 1e-3
    batch_size: int = 256
    seed: int = 0
    train_samples: int | None = None  # None: every training image but the held-out slice
    device: str = "auto"
    eval_every: int = 100  # steps between held-out evaluations (the live curve)

    def problems(self) -> list[str]:
        found = []
        for name in ("weight_bits", "act_bits"):
            value = getattr(self, name)
            if not 2 <= value <= 8:
                found.append(f"{name} must be between 2 and 8 for QAT (got {value})")
        for name in ("edge_bits", "add_bits"):
            value = getattr(self, name)
            if value != 0 and not 2 <= value <= 8:
                found.append(f"{name} must be 0 (off) or between 2 and 8 for QAT (got {value})")
        if not 1 <= self.epochs <= MAX_QAT_EPOCHS:
            found.append(f"epochs must be between 1 and {MAX_QAT_EPOCHS} (got {self.epochs})")
        if self.method not in QAT_METHODS:
            found.append(f"method must be one of {', '.join(QAT_METHODS)} (got {str(self.method)[:40]!r})")
        if not (math.isfinite(self.lr) and 0 < self.lr <= 1):
            found.append(f"learning rate must be > 0 and at most 1 (got {self.lr})")
        if not 1 <= self.batch_size <= MAX_TRAIN_BATCH:
            found.append(f"batch size must be between 1 and {MAX_TRAIN_BATCH} (got {self.batch_size})")
        if not 0 <= self.seed <= MAX_SEED:
            found.append(f"seed must be between 0 and {MAX_SEED} (got {self.seed})")
        if self.train_samples is not None and not 1 <= self.train_samples <= TRAIN_SIZE - HELD_OUT:
            found.append(f"train samples must be between 1 and {TRAIN_SIZE - HELD_OUT} (got {self.train_samples})")
        if self.device not in ("auto", "cpu", "cuda"):
            found.append(f"device must be auto, cpu or cuda (got {str(self.device)[:20]!r})")
        elif self.device == "cuda" and not torch.cuda.is_available():
            found.append("device cuda was asked for but no CUDA device is available")
        if not 1 <= self.eval_every <= 100_000:
            found.append(f"eval_every must be between 1 and 100000 (got {self.eval_every})")
        return found

    def validate(self) -> QatConfig:
        problems = self.problems()
        if problems:
            raise QatError("; ".join(problems))
        return self

    def quant_config(self) -> QuantConfig:
        """The PTQ config QAT starts from and the deployed model follows: the defaults at these bits."""
        return QuantConfig(
            weight_bits=self.weight_bits, act_bits=self.act_bits, edge_bits=self.edge_bits, add_bits=self.add_bits
        )


# --- the quantizer with straight-through gradients ------------------------------------------------


class _FakeQuantizeSTE(torch.autograd.Function):
    """One fused node (instead of eight elementwise ones) for the quantizer and its STE/LSQ gradients."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, scale_factor):  # type: ignore[override]
        z = zero_point.to(x.dtype)
        v = x / scale
        rounded = torch.round(v)
        q = torch.clamp(rounded + z, qmin, qmax)
        low, high = qmin - z, qmax - z  # Qn and Qp
        below, above = v < low, v > high
        ctx.save_for_backward(v, rounded, below, above, low, high, scale)
        ctx.scale_factor = scale_factor
        return (q - z) * scale

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        v, rounded, below, above, low, high, scale = ctx.saved_tensors
        outside = below | above
        grad_x = grad.masked_fill(outside, 0.0) if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            slope = torch.where(below, low, torch.where(above, high, rounded - v))
            per_value = grad * slope * ctx.scale_factor
            # sum over every dimension the scale was broadcast along
            dims = [d for d in range(per_value.ndim) if scale.ndim == 0 or scale.shape[d] == 1]
            grad_scale = per_value.sum(dim=dims).reshape(scale.shape) if dims else per_value
        return grad_x, grad_scale, None, None, None, None


def fake_quantize_ste(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    scale_factor: float = 1.0,
) -> torch.Tensor:
    """(clamp(round(x / s) + z, qmin, qmax) - z) * s, as qcore.quantize.quant.fake_quantize computes it. With
    v = x / s, Qn = qmin - z and Qp = qmax - z, the gradient to x is 1 where Qn <= v <= Qp and 0
    outside (the STE), and the gradient to s is LSQ's: round(v) - v inside, Qn below, Qp above, times
    `scale_factor` (LSQ's g). `scale` is 0-d, or broadcastable to x with the channel dimension kept."""
    return _FakeQuantizeSTE.apply(x, scale, zero_point, qmin, qmax, scale_factor)


def lsq_gradient_factor(values_per_scale: int, qmax_level: int) -> float:
    """LSQ's g = 1 / sqrt(N * Qp)."""
    return 1.0 / math.sqrt(values_per_scale * max(qmax_level, 1))


# --- the model being trained ---------------------------------------------------------------------


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
        bias_q = bias + (torch.round(bias / bias_scale) * bias_scale - bias).detach()
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
        net = Net()
        with torch.no_grad():
            for name in LAYER_NAMES:
                layer(net, name).weight.copy_(parameters[name][0])
                layer(net, name).bias.copy_(parameters[name][1])
        return net.eval()

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
        points = {
            point: QuantPoint(
                point,
                QParams(
                    self.point_scale(point).detach().cpu().float().reshape(()).clone(),
                    self.input_zero(point).detach().cpu().to(torch.int64).reshape(()).clone(),
                    *self.input_range[point],
                ),
                None,
            )
            for point in self.plan.points
        }
        graph = self.graph.with_parameters(self.trained_parameters())
        weight_bits = layer_weight_bits(graph, config)
        layers = {
            name: _layer_quant(
                name,
                graph.weight(name),
                graph.bias(name),
                self.weight_scales[_key(name)].detach().cpu().float(),
                points[self.layer_input_point(name)].qparams,
                weight_bits[name],
            )
            for name in graph.layers
        }
        return QuantizedNet(layers, config, ModelGraphModule(graph), graph=graph, plan=self.plan, points=points).eval()


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
        return (levels + (rounded - levels).detach() - zero) * scale

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


# --- training ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QatProgress:
    """One optimizer step's report, for a live curve."""

    epoch: int  # 1-based
    epochs: int
    step: int  # 1-based within the epoch
    steps_per_epoch: int
    loss: float  # this step's quantized training loss
    held_out_accuracy: float | None  # quantized accuracy on the held-out slice, when measured at this step

    @property
    def fraction_done(self) -> float:
        return ((self.epoch - 1) * self.steps_per_epoch + self.step) / (self.epochs * self.steps_per_epoch)


@dataclass
class QatResult:
    qnet: QuantizedNet  # the deployed model (integer weights at the trained scales)
    model: nn.Module  # its float (latent) weights: a Net for the bundled architecture
    config: QatConfig
    cancelled: bool
    started_from: str  # fingerprint of the float model QAT started from
    seconds_per_epoch: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # one per step
    held_out: list[dict[str, float]] = field(default_factory=list)  # {"step", "epoch", "accuracy"}
    snapshots: list[dict[str, object]] = field(default_factory=list)  # weight histograms, per epoch
    ptq: QuantizedNet | None = None  # the PTQ-calibrated model it started from

    def meta(self) -> dict[str, object]:
        return {
            "qat_config": asdict(self.config),
            "cancelled": self.cancelled,
            "started_from": self.started_from,
            "seconds_per_epoch": self.seconds_per_epoch,
            "held_out": self.held_out,
            "snapshots": self.snapshots,
        }


def weight_snapshot(net: QatNet, epoch: int) -> dict[str, object]:
    """Each layer's weights in units of its channel's step (w / s_w), as a histogram: at low bits QAT
    gathers them on the integer levels."""
    layers = {}
    for name in net.graph.layers:
        qmin, qmax = net.weight_range[name]
        weight = net.weights[_key(name)].detach().cpu()
        steps = weight / _channel_view(net.weight_scales[_key(name)].detach().cpu(), weight.ndim)
        low, high = qmin - 1.5, qmax + 1.5
        counts = torch.histc(steps.clamp(low, high), bins=HISTOGRAM_BINS, min=low, max=high)
        layers[name] = {"low": low, "high": high, "counts": [int(c) for c in counts]}
    return {"epoch": epoch, "layers": layers}


def _held_out_accuracy(net: QatNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    was_training = net.training
    net.eval()
    with torch.no_grad():
        correct = sum(
            int((net(images[i : i + 1000]).argmax(1) == labels[i : i + 1000]).sum())
            for i in range(0, len(images), 1000)
        )
    net.train(was_training)
    return correct / len(images)


def qat(
    model: nn.Module,
    data: Dataset,
    config: QatConfig = QatConfig(),
    on_progress: Callable[[QatProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> QatResult:
    """Fine-tune `model` (never modified) with the quantizer in the loop. The grid starts from PTQ
    calibration of `model` at `config`'s bits; training uses every training image but the last
    HELD_OUT (or the first `train_samples`), shuffled by `seed`. `should_stop` is polled between steps."""
    return _fine_tune(model, data, config, True, on_progress, should_stop)


def qat_control(
    model: nn.Module,
    data: Dataset,
    config: QatConfig = QatConfig(),
    on_progress: Callable[[QatProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> QatResult:
    """The control for `qat(model, data, config)`: the same start (BatchNorm folded), optimizer,
    schedule, epochs, images and order, with no quantizer, so that QAT's drop can be measured against
    what the extra training alone does. The result's `model` is the fine-tuned float model."""
    return _fine_tune(model, data, config, False, on_progress, should_stop)


def _fine_tune(
    model: nn.Module,
    data: Dataset,
    config: QatConfig,
    quantize: bool,
    on_progress: Callable[[QatProgress], None] | None,
    should_stop: Callable[[], bool] | None,
) -> QatResult:
    config.validate()
    device = resolve_device(config.device)
    quant_config = config.quant_config()
    start = quantize_for(model, data, quant_config)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # nothing in the step is random, but cuda kernels may pick by seed
    net = QatNet(start, config.method, model, quantize).to(device)
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config.lr)
    count = TRAIN_SIZE - HELD_OUT if config.train_samples is None else config.train_samples
    count = min(count, len(data.train) - min(HELD_OUT, len(data.train) // 2))
    images = data.train.images[:count].to(device).contiguous(memory_format=torch.channels_last)
    labels = data.train.labels[:count].to(device)
    held_images = data.train.images[-HELD_OUT:].to(device)
    held_labels = data.train.labels[-HELD_OUT:].to(device)
    steps_per_epoch = (count + config.batch_size - 1) // config.batch_size
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
    result = QatResult(start, model, config, False, fingerprint(model), ptq=start)
    result.snapshots.append(weight_snapshot(net, 0))
    result.held_out.append({"step": 0, "epoch": 0, "accuracy": _held_out_accuracy(net, held_images, held_labels)})
    net.train()
    for epoch in range(1, config.epochs + 1):
        order = torch.randperm(count, generator=generator).to(device)
        began = time.perf_counter()
        for step in range(1, steps_per_epoch + 1):
            cancel.checkpoint()  # per step: abandoned work stops here
            if should_stop is not None and should_stop():
                result.cancelled = True
                return _finish(net, result, quant_config)
            batch = order[(step - 1) * config.batch_size : step * config.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = F.nll_loss(net(images[batch]), labels[batch])
            loss.backward()
            optimizer.step()
            schedule.step()
            if quantize:
                with torch.no_grad():
                    _keep_scales_deployable(net)
            result.losses.append(loss.item())
            accuracy = None
            if step % config.eval_every == 0 or step == steps_per_epoch:
                accuracy = _held_out_accuracy(net, held_images, held_labels)
                global_step = (epoch - 1) * steps_per_epoch + step
                result.held_out.append({"step": global_step, "epoch": epoch, "accuracy": accuracy})
            if on_progress is not None:
                on_progress(QatProgress(epoch, config.epochs, step, steps_per_epoch, result.losses[-1], accuracy))
        result.seconds_per_epoch.append(time.perf_counter() - began)
        result.snapshots.append(weight_snapshot(net, epoch))
    return _finish(net, result, quant_config)


def _keep_scales_deployable(net: QatNet) -> None:
    """Step sizes stay positive, and a weight step never shrinks so far that the channel's bias, as an
    integer at s_in * s_w, exceeds 2^BIAS_HEADROOM_BITS, nor below 2^-CHANNEL_STEP_SPAN_BITS of its
    layer's largest step: LSQ drives the step of a channel whose weights are near zero towards zero,
    and its int32 bias (and accumulator) would overflow, and its requantization multiplier (or the
    logits' ratio to the finest channel) would leave the fixed-point range (seen: fc1's 1.05e-10 on the
    notebook's net at W2A2, batch 128, lr 2e-3)."""
    for scale in net.input_scales.values():
        scale.clamp_(min=MIN_SCALE)
    for name in net.graph.layers:
        input_scale = net.point_scale(net.layer_input_point(name))
        bias_floor = net.biases[_key(name)].detach().abs() / (input_scale * 2.0**BIAS_HEADROOM_BITS)
        weight_scale = net.weight_scales[_key(name)]
        span_floor = weight_scale.detach().max() * 2.0**-CHANNEL_STEP_SPAN_BITS
        weight_scale.copy_(torch.maximum(weight_scale, torch.maximum(bias_floor, span_floor).clamp(min=MIN_SCALE)))


def _finish(net: QatNet, result: QatResult, quant_config: QuantConfig) -> QatResult:
    net = net.cpu().eval()
    result.model = net.float_model()
    if isinstance(result.model, Net):  # the checkpoint's path, so a saved model loads back identical
        result.qnet = to_quantized_net(result.model, net.qparams(), quant_config)
    else:
        result.qnet = net.quantized_net(quant_config)
    return result


# --- the quantized checkpoint --------------------------------------------------------------------
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
