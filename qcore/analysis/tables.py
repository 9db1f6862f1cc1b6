"""What the dashboard and CLI report about a quantized model: per-layer tables, weight histograms,
SQNR, bit-width sweeps, per-layer sensitivity and a full float-vs-quantized report."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from qcore.data import Dataset, Split
from qcore.graph import model_graph
from qcore.graph.run import visit_layers
from qcore.inference.evaluate import EvalResult, evaluate, flipped_indices
from qcore.models.net import Net
from qcore.quantize.config import QuantConfig
from qcore.quantize.qmodel import LayerQuant, QuantizedNet, calibration_data, quantize_model
from qcore.quantize.quant import fake_quantize, sqnr_db

SQNR_SAMPLES = 1000  # activation SQNR is measured on the first this-many test images
MAX_LEVELS_SHOWN = 256


@dataclass(frozen=True)
class WeightHistogram:
    """Float and quantized weights counted on the same bins, and the quantization levels."""

    layer: str
    channel: int | None
    edges: list[float]
    float_counts: list[int]
    quant_counts: list[int]
    levels: list[float]  # the representable values inside the float range (empty when too many)
    errors: list[float]  # quantized minus float, per weight


def _channel_view(quant: LayerQuant, channel: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    weight, effective = quant.weight, quant.effective_weight()
    if channel is None:
        return weight.flatten(), effective.flatten()
    if not 0 <= channel < weight.shape[0]:
        raise ValueError(f"{quant.name} has channels 0..{weight.shape[0] - 1} (got {channel})")
    return weight[channel].flatten(), effective[channel].flatten()


def quantization_levels(quant: LayerQuant, channel: int | None) -> list[float]:
    """s * (q - z) for every integer q, for the tensor (or the channel when per-channel)."""
    qparams = quant.weight_qparams
    if qparams is None or qparams.qmax - qparams.qmin + 1 > MAX_LEVELS_SHOWN:
        return []
    if qparams.axis is not None and channel is None:
        return []  # per-channel: every channel has its own grid, none is "the" levels of the layer
    index = 0 if channel is None else channel
    scale = float(qparams.scale.flatten()[index]) if qparams.scale.ndim else float(qparams.scale)
    zero = int(qparams.zero_point.flatten()[index]) if qparams.zero_point.ndim else int(qparams.zero_point)
    return [scale * (q - zero) for q in range(qparams.qmin, qparams.qmax + 1)]


def weight_histogram(quant: LayerQuant, channel: int | None = None, bins: int = 80) -> WeightHistogram:
    weight, effective = _channel_view(quant, channel)
    low = float(torch.minimum(weight.min(), effective.min()))
    high = float(torch.maximum(weight.max(), effective.max()))
    if high <= low:
        high = low + 1e-8
    edges = torch.linspace(low, high, bins + 1)
    float_counts = torch.histogram(weight, bins=edges).hist
    quant_counts = torch.histogram(effective, bins=edges).hist
    return WeightHistogram(
        quant.name,
        channel,
        edges.tolist(),
        [int(c) for c in float_counts],
        [int(c) for c in quant_counts],
        quantization_levels(quant, channel),
        (effective - weight).tolist(),
    )


@dataclass(frozen=True)
class LayerRow:
    """One row of the per-layer table."""

    layer: str
    quantized: bool
    weight_scale: list[float]
    weight_zero_point: list[int]
    input_quantized: bool
    act_observed_min: float | None
    act_observed_max: float | None
    act_clip_min: float | None
    act_clip_max: float | None
    act_scale: float | None
    act_zero_point: int | None
    weight_sqnr_db: float | None
    act_sqnr_db: float | None

    def to_dict(self) -> dict[str, object]:
        return {key: _json_number(value) for key, value in self.__dict__.items()}

    def summary(self) -> dict[str, object]:
        """Flat values for a table: per-channel scales summarised by their range."""
        scales = self.weight_scale
        return {
            "layer": self.layer,
            "weights": "quantized" if self.quantized else "float",
            "weight scale": _span(scales),
            "weight zero point": _span(self.weight_zero_point),
            "input": "quantized" if self.input_quantized else "float",
            "observed min": self.act_observed_min,
            "observed max": self.act_observed_max,
            "clip min": self.act_clip_min,
            "clip max": self.act_clip_max,
            "act scale": self.act_scale,
            "act zero point": self.act_zero_point,
            "weight SQNR (dB)": self.weight_sqnr_db,
            "act SQNR (dB)": self.act_sqnr_db,
        }


def _span(values: list[float] | list[int]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.6g}"
    return f"{min(values):.4g} .. {max(values):.4g} ({len(values)} ch)"


def _json_number(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def layer_rows(qnet: QuantizedNet, input_sqnrs: dict[str, float]) -> list[LayerRow]:
    rows = []
    for name in qnet.graph.layers:
        quant = qnet.layers[name]
        wq, iq, stats = quant.weight_qparams, quant.input_qparams, quant.activation
        rows.append(
            LayerRow(
                layer=name,
                quantized=wq is not None,
                weight_scale=[] if wq is None else wq.scale.flatten().tolist(),
                weight_zero_point=[] if wq is None else wq.zero_point.flatten().tolist(),
                input_quantized=iq is not None,
                act_observed_min=None if stats is None else stats.observed_min,
                act_observed_max=None if stats is None else stats.observed_max,
                act_clip_min=None if stats is None else stats.clip_min,
                act_clip_max=None if stats is None else stats.clip_max,
                act_scale=None if iq is None else float(iq.scale),
                act_zero_point=None if iq is None else int(iq.zero_point),
                weight_sqnr_db=None if wq is None else sqnr_db(quant.weight, quant.effective_weight()),
                act_sqnr_db=None if iq is None else input_sqnrs[name],
            )
        )
    return rows


@dataclass
class Report:
    """Float vs quantized for one model and config: everything `evaluate` prints."""

    config: QuantConfig
    float_result: EvalResult
    quant_result: EvalResult
    layers: list[LayerRow]
    qnet: QuantizedNet = field(repr=False)
    flips: dict[str, list[int]] = field(default_factory=dict)

    @property
    def accuracy_drop(self) -> float:
        return self.float_result.accuracy - self.quant_result.accuracy

    def to_dict(self) -> dict[str, object]:
        return {
            "config": self.config.to_dict(),
            "float_accuracy": self.float_result.accuracy,
            "quant_accuracy": self.quant_result.accuracy,
            "float_loss": self.float_result.loss,
            "quant_loss": self.quant_result.loss,
            "float_per_class_accuracy": list(self.float_result.per_class_accuracy),
            "quant_per_class_accuracy": list(self.quant_result.per_class_accuracy),
            "flipped": {key: len(value) for key, value in self.flips.items()},
            "layers": [row.to_dict() for row in self.layers],
            "methods": self.qnet.methods.to_dict(),
            "activation_stats": {
                name: quant.activation.to_dict()
                for name, quant in self.qnet.layers.items()
                if quant.activation is not None
            },
        }


def block_rows(blocks: dict[str, dict[str, object]]) -> list[dict[str, object]]:
    """Block reconstruction per block, as the Methods page and `evaluate` print it: the block's float
    output reconstructed with nearest rounding and with what it learned (mean squared error summed over
    the block's output values, on the calibration images), and how much it learned."""
    rows = []
    for name, row in blocks.items():
        nearest, learned = float(row["objective_nearest"]), float(row["objective_reconstructed"])  # type: ignore[arg-type]
        rows.append(
            {
                "block": name,
                "kind": row["kind"],
                "layers": ", ".join(row["layers"]),  # type: ignore[arg-type]
                "error, nearest rounding": round(nearest, 4),
                "error, reconstructed": round(learned, 4),
                "error removed (%)": round(100 * (1 - learned / nearest), 1) if nearest > 0 else 0.0,
                "weights rounded the other way (%)": round(100 * float(row["flipped_fraction"]), 1),  # type: ignore[arg-type]
                "activation scales learned": len(row.get("scales_learned", [])),  # type: ignore[arg-type]
                "kept": "yes" if row["kept"] else "no (nearest reconstructs better)",
            }
        )
    return rows


def quantize_for(model: Net, data: Dataset, config: QuantConfig) -> QuantizedNet:
    return quantize_model(model, config, calibration_data(data.train, config))


def build_report(
    model: Net,
    data: Dataset,
    config: QuantConfig,
    float_result: EvalResult | None = None,
    qnet: QuantizedNet | None = None,
) -> Report:
    """Quantize `model` under `config`, evaluate both on the full test set, and tabulate layers.
    Pass `float_result` to reuse a float evaluation already made for this model, and `qnet` to report
    a quantized model built elsewhere (a QAT checkpoint's) instead of calibrating one."""
    qnet = quantize_for(model, data, config) if qnet is None else qnet
    float_result = float_result or evaluate(model, data.test)
    quant_result = evaluate(qnet, data.test)
    sqnrs = input_sqnrs(qnet, model, data.test.images[:SQNR_SAMPLES])
    flips = flipped_indices(float_result, quant_result, data.test.labels)
    return Report(config, float_result, quant_result, layer_rows(qnet, sqnrs), qnet, flips)


def input_sqnrs(qnet: QuantizedNet, model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Each quantized layer's input SQNR on `images`: its float input (from the float model the quantizer
    saw, equalized when that method ran) against that input fake-quantized on its grid. Computed as each
    input is produced: holding them all took 0.7 GB for fashion-resnet's 1,000 images."""
    sqnrs: dict[str, float] = {}

    def measure(name: str, x: torch.Tensor) -> None:
        qparams = qnet.layers[name].input_qparams
        if qparams is not None:
            sqnrs[name] = sqnr_db(x, fake_quantize(x, qparams))

    visit_layers(model_graph(qnet.float_model or model), images, "input", measure)
    return sqnrs


def per_class_rows(report: Report, classes: Sequence[str]) -> list[dict[str, object]]:
    """Float and quantized accuracy per class, in percent, and their difference in points."""
    pairs = zip(report.float_result.per_class_accuracy, report.quant_result.per_class_accuracy, strict=True)
    return [
        {
            "class": classes[label],
            "float accuracy (%)": round(100 * f, 2),
            "quantized accuracy (%)": round(100 * q, 2),
            "difference (points)": round(100 * (q - f), 2),
        }
        for label, (f, q) in enumerate(pairs)
    ]


def flip_gallery(report: Report, data: Dataset, limit: int) -> tuple[list[list[list[float]]], list[str]]:
    """The first `limit` test images whose prediction flips (broken first, then fixed, then changed), as
    pixels in [0, 1] and titles "#index true: float→quantized" with the dataset's class names."""
    classes = data.spec.class_names
    shown = (report.flips.get("broke", []) + report.flips.get("fixed", []) + report.flips.get("other", []))[:limit]
    images = [(data.test.images[i, 0] * data.spec.std + data.spec.mean).tolist() for i in shown]
    titles = [
        f"#{i} {classes[int(data.test.labels[i])]}: {classes[int(report.float_result.predictions[i])]}"
        f"→{classes[int(report.quant_result.predictions[i])]}"
        for i in shown
    ]
    return images, titles


@dataclass(frozen=True)
class SweepPoint:
    weight_bits: int
    act_bits: int
    accuracy: float
    loss: float


SWEEP_TARGETS = ("both", "weights", "activations")


def bit_sweep(
    model: Net,
    data: Dataset,
    base: QuantConfig,
    bits: Iterable[int] = range(2, 9),
    target: str = "both",
    test: Split | None = None,
    on_point: Callable[[SweepPoint], None] | None = None,
) -> list[SweepPoint]:
    """Accuracy as the weight bits, the activation bits, or both (`target`) take each value in
    `bits`; the other settings come from `base`."""
    if target not in SWEEP_TARGETS:
        raise ValueError(f"sweep target must be one of {', '.join(SWEEP_TARGETS)} (got {target!r})")
    split = test or data.test
    points = []
    for value in bits:
        weight_bits = value if target in ("both", "weights") else base.weight_bits
        act_bits = value if target in ("both", "activations") else base.act_bits
        config = base.with_changes(weight_bits=weight_bits, act_bits=act_bits)
        result = evaluate(quantize_for(model, data, config), split)
        point = SweepPoint(weight_bits, act_bits, result.accuracy, result.loss)
        points.append(point)
        if on_point is not None:
            on_point(point)
    return points


@dataclass(frozen=True)
class Sensitivity:
    layer: str
    accuracy: float  # only this layer quantized, the rest float
    drop: float  # float accuracy minus that


SENSITIVITY_NOISE_POINTS = 0.2  # 20 of 10,000 test images


def sensitivity_advice(rows: Sequence[Sensitivity]) -> str:
    """What to try next, from the one-layer-at-a-time measurement itself (never a template naming a layer
    the measurement clears)."""
    worst = max(rows, key=lambda row: row.drop)
    if 100 * worst.drop < SENSITIVITY_NOISE_POINTS:
        return (
            f"No layer quantized alone costs {SENSITIVITY_NOISE_POINTS} points or more at this config (the most: "
            f"{worst.layer}, {100 * worst.drop:+.2f}): the loss, if any, comes from the layers together. Try fewer "
            "bits, or sweep activations only to see which side it comes from."
        )
    return (
        f"Try next: keep {worst.layer} in float (sidebar), or give it more bits: quantized alone it costs "
        f"{100 * worst.drop:.2f} points, the most of any layer; then sweep again."
    )


def layer_sensitivity(
    model: Net, data: Dataset, config: QuantConfig, float_accuracy: float | None = None
) -> list[Sensitivity]:
    """Quantize one layer at a time (its weights and its input), every other layer float."""
    if float_accuracy is None:
        float_accuracy = evaluate(model, data.test).accuracy
    rows = []
    layers = model_graph(model).layers
    for name in layers:
        only = replace(config, float_layers=tuple(n for n in layers if n != name)).validate(layers)
        accuracy = evaluate(quantize_for(model, data, only), data.test).accuracy
        rows.append(Sensitivity(name, accuracy, float_accuracy - accuracy))
    return rows
