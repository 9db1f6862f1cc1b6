"""The classic quantization failures, measured on the current model rather than quoted.

1. BatchNorm folding (Nagel et al. 2019): folding gamma / sqrt(var + eps) into each output channel of a
   conv spreads the channels' weight ranges; one per-tensor scale then serves the widest channel and
   leaves the narrow ones a few levels. Measured: the spread of every folded layer before and after
   folding, per-channel against per-tensor accuracy, the bit-width where per-tensor alone loses at least
   FAILURE_POINTS points, and what cross-layer equalization gets back there.
2. Residual requantization (TFLite's int8 ADD): the two inputs of an add live on grids of their own
   scales, and the sum is requantized to a third. Measured: the three scales of each add, and the error
   of the add's output on test images with those grids against one grid shared by all three (an add
   without requantization).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from qcore.analysis.tables import quantize_for
from qcore.data import Dataset
from qcore.graph import GraphRun, Op, OpKind, batchnorm_folding, model_graph
from qcore.inference.evaluate import evaluate
from qcore.quantize.config import QuantConfig
from qcore.quantize.qmodel import QuantizedNet
from qcore.quantize.quant import QParams, Scheme, choose_qparams, fake_quantize, sqnr_db

FAILURE_POINTS = 2.0  # a drop this large (accuracy points) is what the walk-through calls a failure
WALK_BITS = ((8, 8), (6, 6))  # the bit-widths always shown, weights and activations
RESIDUAL_IMAGES = 500  # test images the add errors are measured on

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class FoldedLayer:
    layer: str
    batchnorm: str
    depthwise: bool
    spread_before: float  # largest / smallest per-channel max |w| of the conv's own weights
    spread_after: float  # the same of the folded weights every path quantizes


@dataclass(frozen=True)
class GranularityRow:
    weight_bits: int
    act_bits: int
    per_channel: float  # accuracy on the full test set, weights' ranges their min/max (Nagel et al.'s setting)
    per_tensor: float
    per_tensor_equalized: float
    per_tensor_mse: float  # per-tensor with MSE-searched weight ranges (the lab's default): clipping, itself
    # a partial fix for one range serving channels of very different sizes

    @property
    def recovered(self) -> float | None:
        """The share of the per-channel advantage that equalization gets back for per-tensor (None
        unless per-tensor is at least FAILURE_POINTS below per-channel: a share of a few test images'
        difference is noise, W8A8's -40% of a 0.05-point gap on fashion-mobilenet)."""
        gap = self.per_channel - self.per_tensor
        return None if 100 * gap < FAILURE_POINTS else (self.per_tensor_equalized - self.per_tensor) / gap


@dataclass
class FoldingWalk:
    float_accuracy: float
    layers: list[FoldedLayer]
    rows: list[GranularityRow]  # WALK_BITS, then the failure's bit-width when one was found
    failure_bits: tuple[int, int] | None  # the widest weight bits (at 8-bit activations) where per-tensor
    # alone (min/max weight ranges) loses FAILURE_POINTS against float; None when none down to 2 bits does
    searched: list[dict[str, float]] = field(default_factory=list)  # per-tensor accuracy per weight bits tried

    def to_dict(self) -> dict[str, object]:
        return {
            "float_accuracy": self.float_accuracy,
            "layers": [asdict(layer) for layer in self.layers],
            "rows": [{**asdict(row), "recovered": row.recovered} for row in self.rows],
            "failure_bits": self.failure_bits,
            "searched": self.searched,
        }


def folded_spreads(model: nn.Module) -> list[FoldedLayer]:
    """Every conv with a BatchNorm folded into it, with the spread of its channel ranges before and after."""
    graph = model_graph(model)
    rows = []
    for layer, batchnorm in graph.folded_batchnorm.items():
        report = batchnorm_folding(model, layer, 0)
        rows.append(FoldedLayer(layer, batchnorm, graph.is_depthwise(layer), report.spread_before, report.spread_after))
    return rows


DEFAULT_CONFIG = QuantConfig()


EQUALIZATION_NOISE_POINTS = 0.2  # 20 of 10,000 test images: a smaller effect of equalization is not told apart


def granularity_table(walk: FoldingWalk) -> list[dict[str, object]]:
    """The walk's accuracy rows as a person reads them: percent with two decimals, plain headers, and what
    equalization did to per-tensor, in points, beside the share of per-channel's lead it won back."""

    def recovered(row: GranularityRow) -> str:
        if row.recovered is None:
            return f"no gap (under {FAILURE_POINTS:g} points)"
        return f"{100 * row.recovered:.0f}%"

    return [
        {
            "bits": f"W{row.weight_bits}A{row.act_bits}",
            "per-channel (%)": round(100 * row.per_channel, 2),
            "per-tensor (%)": round(100 * row.per_tensor, 2),
            "per-tensor + equalization (%)": round(100 * row.per_tensor_equalized, 2),
            "per-tensor, MSE-clipped weights (%)": round(100 * row.per_tensor_mse, 2),
            "equalization's effect on per-tensor (points)": round(100 * (row.per_tensor_equalized - row.per_tensor), 2),
            "share of per-channel's lead won back": recovered(row),
        }
        for row in walk.rows
    ]


def folding_conclusion(walk: FoldingWalk) -> str:
    """What the walk measured, in words generated from its numbers, the unfavourable outcome included (an
    equalization that makes per-tensor worse is said to, not presented as the fix)."""
    last = walk.rows[-1]
    bits = f"W{last.weight_bits}A{last.act_bits}"
    if walk.failure_bits is None:
        text = (
            f"Float {100 * walk.float_accuracy:.2f}%. Per-tensor never lost {FAILURE_POINTS:g} points against "
            f"per-channel down to 2 weight bits on this model (at {bits}: {100 * last.per_tensor:.2f}% against "
            f"{100 * last.per_channel:.2f}%)."
        )
    else:
        text = (
            f"Float {100 * walk.float_accuracy:.2f}%. Per-tensor alone first loses {FAILURE_POINTS:g} points at "
            f"{bits}: {100 * last.per_tensor:.2f}% against {100 * last.per_channel:.2f}% per-channel."
        )
    effect = 100 * (last.per_tensor_equalized - last.per_tensor)
    if abs(effect) < EQUALIZATION_NOISE_POINTS:
        text += (
            f" Equalization leaves per-tensor where it was ({100 * last.per_tensor_equalized:.2f}%, {effect:+.2f} "
            f"points, within {EQUALIZATION_NOISE_POINTS} of a point): it is no fix on this model at {bits}."
        )
    elif effect > 0:
        share = "" if last.recovered is None else f", {100 * last.recovered:.0f}% of per-channel's lead"
        text += (
            f" Equalization raises per-tensor to {100 * last.per_tensor_equalized:.2f}% ({effect:+.2f} points{share})."
        )
    else:
        text += (
            f" Equalization makes per-tensor worse here: {100 * last.per_tensor_equalized:.2f}% ({effect:+.2f} "
            f"points). It is no fix on this model at {bits}; the folded layers' ranges above show what it had "
            "to even out."
        )
    return text + f" Per-tensor with MSE-clipped weights, without equalization: {100 * last.per_tensor_mse:.2f}%."


def folding_walkthrough(
    model: nn.Module, data: Dataset, base: QuantConfig = DEFAULT_CONFIG, on_progress: Progress | None = None
) -> FoldingWalk:
    """The BatchNorm-folding failure on `model`: spreads, then accuracy per-channel, per-tensor and
    per-tensor with equalization at WALK_BITS and at the failure's bit-width (searched from 7 weight
    bits down at 8-bit activations, per-tensor alone, until it loses FAILURE_POINTS against float).

    The weights' ranges are their min/max, as in Nagel et al. 2019, whose per-tensor collapse and
    equalization's rescue this reproduces; `base`'s MSE range search clips the widest channels and so
    partly hides the failure by itself: each row also measures per-tensor with MSE-searched ranges."""
    layers = folded_spreads(model)
    float_accuracy = evaluate(model, data.test).accuracy
    done = [0]

    def accuracy(
        weight_bits: int, act_bits: int, granularity: str, methods: tuple[str, ...] = (), weight_range: str = "minmax"
    ) -> float:
        what = f"W{weight_bits}A{act_bits} {granularity}{' + equalization' if methods else ''}, {weight_range} weights"
        if on_progress is not None:
            on_progress(done[0], 0, what)
        config = base.with_changes(
            weight_bits=weight_bits,
            act_bits=act_bits,
            granularity=granularity,
            weight_range=weight_range,
            methods=methods,
            float_layers=(),
            weight_bits_budget=0.0,
        )
        done[0] += 1
        return evaluate(quantize_for(model, data, config), data.test).accuracy

    def row(weight_bits: int, act_bits: int, per_tensor: float | None = None) -> GranularityRow:
        return GranularityRow(
            weight_bits,
            act_bits,
            accuracy(weight_bits, act_bits, "per-channel"),
            per_tensor if per_tensor is not None else accuracy(weight_bits, act_bits, "per-tensor"),
            accuracy(weight_bits, act_bits, "per-tensor", ("equalization",)),
            accuracy(weight_bits, act_bits, "per-tensor", weight_range="mse"),
        )

    rows = [row(w, a) for w, a in WALK_BITS]
    failure, searched = None, []
    for weight_bits in range(7, 1, -1):
        per_tensor = accuracy(weight_bits, 8, "per-tensor")
        searched.append({"weight_bits": weight_bits, "act_bits": 8, "per_tensor": per_tensor})
        if 100 * (float_accuracy - per_tensor) >= FAILURE_POINTS:
            failure = (weight_bits, 8)
            rows.append(row(weight_bits, 8, per_tensor))
            break
    return FoldingWalk(float_accuracy, layers, rows, failure, searched)


# --- 2. residual requantization ----------------------------------------------------------------------


@dataclass(frozen=True)
class ResidualAdd:
    add: str
    inputs: tuple[str, str]
    input_scales: tuple[float, float]
    output_point: str  # the add's output as quantized (after its ReLU when it has one)
    output_scale: float
    shared_scale: float  # one grid covering both inputs and the output
    sqnr_own_db: float  # the add's output on test images: inputs and output on their own grids
    sqnr_shared_db: float  # ... and all three on the shared grid

    @property
    def scale_ratio(self) -> float:
        """How much coarser the finer input's grid becomes when shared."""
        return self.shared_scale / min(self.input_scales)


class _AddCapture(GraphRun):
    """The float walk, keeping every add's inputs and output (after its ReLU where it has one)."""

    def __init__(self, graph, names: set[str]) -> None:
        super().__init__(graph)
        self.names, self.values = names, {}

    def after(self, op: Op, value: torch.Tensor) -> torch.Tensor:
        if op.name in self.names:
            self.values[op.name] = value.detach()
        return value


def _covered(qparams: QParams) -> tuple[float, float]:
    scale, zero = float(qparams.scale), int(qparams.zero_point)
    return (qparams.qmin - zero) * scale, (qparams.qmax - zero) * scale


def residual_adds(qnet: QuantizedNet, data: Dataset, images: int = RESIDUAL_IMAGES) -> list[ResidualAdd]:
    """Every add of the quantized model: its input and output scales, and the SQNR of its output on the
    first `images` test images with its own grids against one shared grid (asymmetric, at the config's
    activation bits, covering all three ranges)."""
    graph, plan = qnet.graph, qnet.plan
    adds = [op for op in graph.ops if op.kind is OpKind.ADD]
    outputs = {}
    for op in adds:
        users = graph.consumers(op.name)
        relu = users[0] if len(users) == 1 and users[0].kind is OpKind.RELU else None
        outputs[op.name] = relu.name if relu is not None else op.name
    wanted = {name for op in adds for name in op.inputs} | set(outputs.values())
    capture = _AddCapture(graph, wanted)
    with torch.inference_mode():
        capture.run(data.test.images[:images])
    rows = []
    for op in adds:
        a, b = op.inputs
        out = outputs[op.name]
        if a not in plan.grid or b not in plan.grid or out not in plan.grid:
            continue  # a float add (an input kept float): nothing is requantized
        qa, qb, qy = (qnet.points[plan.grid[name]].qparams for name in (a, b, out))
        ranges = [_covered(q) for q in (qa, qb, qy)]
        shared = choose_qparams(
            min(low for low, _ in ranges), max(high for _, high in ranges), qnet.config.act_bits, Scheme.ASYMMETRIC
        )
        inputs, relu, reference = (capture.values[a], capture.values[b]), out != op.name, capture.values[out]

        def through(q_a: QParams, q_b: QParams, q_y: QParams, inputs=inputs, relu=relu) -> torch.Tensor:
            total = fake_quantize(inputs[0], q_a) + fake_quantize(inputs[1], q_b)
            return fake_quantize(total.clamp(min=0) if relu else total, q_y)

        rows.append(
            ResidualAdd(
                op.name,
                (a, b),
                (float(qa.scale), float(qb.scale)),
                out,
                float(qy.scale),
                float(shared.scale),
                sqnr_db(reference, through(qa, qb, qy)),
                sqnr_db(reference, through(shared, shared, shared)),
            )
        )
    return rows
