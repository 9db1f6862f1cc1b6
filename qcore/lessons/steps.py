"""Lessons 1, 2 and 4: one number, one kernel, one outlier; all through qcore's own quantizer."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from qcore.analysis.tables import quantize_for
from qcore.data import Dataset, Split, calibration_indices
from qcore.graph import OpKind, model_graph
from qcore.inference.evaluate import evaluate
from qcore.models.net import capture_layers
from qcore.quantize.config import QuantConfig
from qcore.quantize.qmodel import weight_qparams
from qcore.quantize.quant import QParams, Scheme, choose_qparams, dequantize, fake_quantize, quantize, sqnr_db

OUTLIER_CALIB_BATCHES = 4
MAX_LEVELS_SHOWN = 256  # a number line with more levels than this is a smear; say so instead


# --- 1. one number -----------------------------------------------------------------------------


@dataclass(frozen=True)
class OneNumber:
    """Every step of q = clamp(round(x / s) + z, qmin, qmax) and x_hat = s (q - z) for one value."""

    scheme: str
    bits: int
    x: float
    observed_min: float
    observed_max: float
    range_min: float  # the range the grid covers: widened to hold 0 (affine), or [-max|x|, max|x|]
    range_max: float
    scale: float
    zero_point: int
    qmin: int
    qmax: int
    x_over_s: float
    rounded: int
    plus_zero_point: int
    q: int  # after the clamp
    clipped: bool
    x_hat: float
    error: float
    levels: list[float]  # every representable value (empty when there are more than MAX_LEVELS_SHOWN)


def one_number(x: float, observed_min: float, observed_max: float, bits: int, scheme: Scheme) -> OneNumber:
    """Quantize one value with the qparams qcore chooses for the observed range."""
    qparams = choose_qparams(observed_min, observed_max, bits, scheme)
    s, z = float(qparams.scale), int(qparams.zero_point)
    value = torch.tensor([x], dtype=torch.float32)
    q = int(quantize(value, qparams)[0])
    x_hat = float(dequantize(torch.tensor([q]), qparams)[0])
    x_over_s = float(value[0] / qparams.scale)
    rounded = int(torch.round(value / qparams.scale)[0])  # half to even, as the quantizer rounds
    count = qparams.qmax - qparams.qmin + 1
    grid = torch.arange(qparams.qmin, qparams.qmax + 1) if count <= MAX_LEVELS_SHOWN else torch.tensor([])
    return OneNumber(
        scheme=str(Scheme(scheme).value),
        bits=bits,
        x=float(value[0]),
        observed_min=observed_min,
        observed_max=observed_max,
        range_min=s * (qparams.qmin - z),
        range_max=s * (qparams.qmax - z),
        scale=s,
        zero_point=z,
        qmin=qparams.qmin,
        qmax=qparams.qmax,
        x_over_s=x_over_s,
        rounded=rounded,
        plus_zero_point=rounded + z,
        q=q,
        clipped=q != rounded + z,
        x_hat=x_hat,
        error=x_hat - float(value[0]),
        levels=dequantize(grid, qparams).tolist() if grid.numel() else [],
    )


# --- 2. one kernel ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelView:
    granularity: str
    scale: float
    ints: list[list[int]]
    reconstructed: list[list[float]]
    error: list[list[float]]
    sqnr_db: float


@dataclass(frozen=True)
class OneKernel:
    channel: int
    weights: list[list[float]]
    per_channel: KernelView
    per_tensor: KernelView


def _picture(weight: torch.Tensor, channel: int) -> torch.Tensor:
    """What the lesson draws of output channel `channel`: a conv filter's first input channel, or a linear
    layer's row as a square when it is one (784 weights: the image's 28x28 pixels), else as one line."""
    if weight.ndim == 4:
        return weight[channel, 0]
    row = weight[channel]
    side = math.isqrt(row.numel())
    return row.reshape(side, side) if side * side == row.numel() else row.reshape(1, -1)


def _kernel_view(weight: torch.Tensor, channel: int, qparams: QParams, granularity: str) -> KernelView:
    q = quantize(weight, qparams)
    ints, reconstructed = _picture(q, channel), _picture(dequantize(q, qparams), channel)
    scale = qparams.scale.reshape(-1)
    return KernelView(
        granularity,
        float(scale[channel] if scale.numel() > 1 else scale[0]),
        ints.tolist(),
        reconstructed.tolist(),
        (reconstructed - _picture(weight, channel)).tolist(),
        sqnr_db(_picture(weight, channel), reconstructed),
    )


def kernel_layers(model: nn.Module) -> list[str]:
    """The conv layers whose filters are more than one weight wide, in execution order (the lesson's
    choices); for a model with none (a perceptron, a net of 1x1 convolutions), its linear layers, whose
    rows the lesson shows instead."""
    graph = model_graph(model)
    convs = [name for name in graph.layers if graph.op(name).kind is OpKind.CONV and graph.weight(name).shape[-1] > 1]
    return convs or [name for name in graph.layers if graph.op(name).kind is OpKind.LINEAR]


def one_kernel(model: nn.Module, config: QuantConfig, channel: int, layer_name: str = "conv1") -> OneKernel:
    """Filter `channel` of conv layer `layer_name` (its first input channel; BatchNorm folded in, as
    every path quantizes it), or row `channel` of a linear layer of a model without such convolutions,
    at the config's weight bits, scheme and range rule, with a scale of its own (per-channel) and with
    the one scale of the whole layer (per-tensor)."""
    graph = model_graph(model)
    if layer_name not in kernel_layers(model):
        raise ValueError(f"{layer_name} is not one of the lesson's layers ({', '.join(kernel_layers(model))})")
    weight = graph.weight(layer_name).detach()
    if not 0 <= channel < weight.shape[0]:
        raise ValueError(f"{layer_name} has filters 0 to {weight.shape[0] - 1} (got {channel})")
    views = {
        granularity: _kernel_view(
            weight, channel, weight_qparams(weight, replace(config, granularity=granularity)), granularity
        )
        for granularity in ("per-channel", "per-tensor")
    }
    return OneKernel(channel, _picture(weight, channel).tolist(), views["per-channel"], views["per-tensor"])


# --- 4. an outlier -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutlierRow:
    setting: str  # e.g. "per-tensor, min/max ranges"
    with_outlier: bool
    scale: float  # fc1's weight scale (per-channel: the median channel's) or its input's scale
    levels_in_typical_range: int  # grid levels inside the middle 99% of the values without the outlier
    sqnr_db: float  # of the layer's weights (or its input on the test images), outlier element left out
    accuracy: float
    # the float model's on the same images, with the outlier when the row has it: what the outlier does
    # alone (an outlier in a calibration image leaves the float model as it is)
    float_accuracy: float = float("nan")

    @property
    def quantization_cost(self) -> float:
        """Points the quantized model loses against the float model with the same outlier."""
        return 100 * (self.float_accuracy - self.accuracy)


SETTINGS = (
    ("per-tensor, min/max ranges", {"granularity": "per-tensor", "weight_range": "minmax", "observer": "minmax"}),
    ("per-channel, min/max ranges", {"granularity": "per-channel", "weight_range": "minmax", "observer": "minmax"}),
    ("per-tensor, MSE-clipped ranges", {"granularity": "per-tensor", "weight_range": "mse", "observer": "mse"}),
    ("per-channel, MSE-clipped ranges", {"granularity": "per-channel", "weight_range": "mse", "observer": "mse"}),
)


def _levels_within(low: float, high: float, scale: float) -> int:
    return int(math.floor(high / scale) - math.ceil(low / scale) + 1)


def outlier_layer(model: nn.Module) -> str:
    """The lesson's layer: the first linear layer (fc1 in the notebook's net; never BatchNorm-folded,
    so its module's weights are the ones quantized)."""
    graph = model_graph(model)
    return next(name for name in graph.layers if graph.op(name).kind is OpKind.LINEAR)


def outlier_lesson(
    model: nn.Module,
    data: Dataset,
    config: QuantConfig,
    target: str,
    factor: float,
    test_images: int = 2000,
    calib_batches: int = OUTLIER_CALIB_BATCHES,
) -> list[OutlierRow]:
    """Put one outlier in and watch: `target` "weights" multiplies the first linear layer's (fc1's)
    largest weight by `factor`; "calibration" multiplies the first calibration image by `factor`,
    which widens that layer's input range.
    For each range setting, with and without the outlier: the layer's scale, the levels left where its
    values are, SQNR and accuracy (on the first `test_images` test images). Eight calibrations, each
    on `calib_batches` batches so the lesson stays quick."""
    config = replace(config, calib_batches=min(config.calib_batches, calib_batches)).validate(None)
    if target not in OUTLIER_TARGETS:
        raise ValueError(f"target must be weights or calibration (got {target!r})")
    test = data.test.subset(test_images)
    clean_data = Dataset(data.train, test)
    name = outlier_layer(model)
    weight = model.get_submodule(name).weight.detach()
    outlier_index = int(weight.abs().argmax())
    clean_inputs = capture_layers(model, test.images[:500], "input")[name]
    values = weight.reshape(-1) if target == "weights" else clean_inputs.reshape(-1)
    low, high = torch.quantile(values, torch.tensor([0.005, 0.995])).tolist()
    rows = []
    for with_outlier in (False, True):
        subject, calibration = model, clean_data
        if with_outlier and target == "weights":
            subject = copy.deepcopy(model)
            subject.get_submodule(name).weight.data.view(-1)[outlier_index] *= factor
        float_accuracy = evaluate(subject, test).accuracy
        if with_outlier and target == "calibration":
            images = data.train.images.clone()
            images[int(calibration_indices(len(images), 1, 1, config.seed)[0])] *= factor
            calibration = Dataset(Split(images, data.train.labels), test)
        for setting, changes in SETTINGS:
            qnet = quantize_for(subject, calibration, replace(config, **changes).validate(None))
            quant = qnet.layers[name]
            if target == "weights":
                assert quant.weight_qparams is not None
                keep = torch.ones(weight.numel(), dtype=torch.bool)
                keep[outlier_index] = False  # the outlier itself is not the signal we judge by
                scale = float(quant.weight_qparams.scale.median())  # the typical channel's
                sqnr = sqnr_db(weight.reshape(-1)[keep], quant.effective_weight().reshape(-1)[keep])
            else:
                assert quant.input_qparams is not None
                scale = float(quant.input_qparams.scale)
                sqnr = sqnr_db(clean_inputs, fake_quantize(clean_inputs, quant.input_qparams))
            accuracy = evaluate(qnet, test).accuracy
            levels = _levels_within(low, high, scale)
            rows.append(OutlierRow(setting, with_outlier, scale, levels, sqnr, accuracy, float_accuracy))
    return rows


OUTLIER_TARGETS = ("weights", "calibration")  # where the lesson puts the outlier
OUTLIER_DEFAULT_FACTOR = 50.0  # the factor the lesson opens with
OUTLIER_FACTORS = (2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0)  # what the lesson offers to multiply the outlier by
OUTLIER_NOISE_POINTS = 0.5  # differences below this on the lesson's 2,000 test images are not told apart


def outlier_conclusion(rows: list[OutlierRow]) -> str:
    """What the measurements say, separating what the outlier does to the float model from what quantization
    adds on top of it; every number and every verdict comes from `rows`."""
    clean = next(r for r in rows if not r.with_outlier).float_accuracy
    with_outlier = [r for r in rows if r.with_outlier]
    spoiled = with_outlier[0].float_accuracy
    lost = 100 * (clean - spoiled)
    if lost >= OUTLIER_NOISE_POINTS:
        first = (
            f"The outlier alone costs the float model {lost:.2f} points ({100 * clean:.2f}% without it, "
            f"{100 * spoiled:.2f}% with it): that loss is the outlier's, and no range setting can win it back."
        )
    else:
        first = (
            f"The float model hardly notices the outlier ({100 * clean:.2f}% without it, {100 * spoiled:.2f}% with "
            "it), so what the quantized rows lose below it is quantization's."
        )
    worst = max(with_outlier, key=lambda r: r.quantization_cost)
    best = min(with_outlier, key=lambda r: r.quantization_cost)
    if worst.quantization_cost - best.quantization_cost < OUTLIER_NOISE_POINTS:
        second = (
            f"Against the float model with the outlier, every setting costs between {best.quantization_cost:+.2f} "
            f"and {worst.quantization_cost:+.2f} points: less apart than this lesson's noise "
            f"({OUTLIER_NOISE_POINTS} point on 2,000 images), so this outlier does not tell the settings apart here."
        )
    else:
        second = (
            f"Against the float model with the outlier, {worst.setting} costs {worst.quantization_cost:.2f} points "
            f"({worst.levels_in_typical_range} level(s) left where the values are) and {best.setting} "
            f"{best.quantization_cost:.2f} ({best.levels_in_typical_range} levels)."
        )
    return f"{first} {second}"
