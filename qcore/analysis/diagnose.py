"""Why did accuracy drop? Per-layer damage, ranked fixes measured for real, and where the integer
engine and the simulation part.

Every per-layer variant comes from ONE calibration of the config: a variant switches a layer's
weight quantization or input quantization off (its LayerQuant keeps float weights, or a float
input) and is evaluated on the full test set. So the numbers are comparable with one another and
with the config's own accuracy, which is the variant with everything on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from qcore.analysis.tables import quantize_for
from qcore.data import Dataset
from qcore.graph import Diagram, OpKind, graph_diagram
from qcore.inference.evaluate import evaluate
from qcore.models.net import Net, capture_layers
from qcore.quantize.config import DASHBOARD, QuantConfig, integer_path_problems
from qcore.quantize.qmodel import LayerQuant, QuantizedNet
from qcore.quantize.quant import QParams, quantize, sqnr_db

if TYPE_CHECKING:
    from qcore.inference.integer import Requantization

SQNR_IMAGES = 1000  # test images for the SQNR columns (the accuracies use all 10,000)
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class LayerDiagnosis:
    layer: str
    only_this_accuracy: float  # only this layer (weights and input) quantized, the rest float
    all_but_this_accuracy: float  # everything quantized except this layer
    weights_only_accuracy: float  # only this layer's weights quantized
    activations_only_accuracy: float  # only this layer's input quantized
    sqnr_isolated_db: float  # this layer's output, only this layer quantized, vs float (inf: no error)
    sqnr_accumulated_db: float  # this layer's output, everything quantized, vs float


@dataclass(frozen=True)
class Suggestion:
    """One change to the config, with its effect measured by running it."""

    text: str
    changes: dict[str, object]  # QuantConfig fields to set
    accuracy: float
    gain_points: float  # accuracy minus the config's, in percentage points
    extra_weight_bits: float  # average weight bits (parameter-weighted) added by the change


@dataclass(frozen=True)
class LayerGap:
    """Integer engine minus simulation for the integers of one quantization point, in LSBs: a layer's
    requantized output (named by the layer), an add's output or a cat (named by the op)."""

    layer: str
    differences: dict[int, int]  # LSB difference -> count (0 included)
    values: int
    # differing values that lie within `tie_window` of a tie (None: no window measured, adds and cats)
    differing_near_tie: int | None
    largest_tie_distance: float  # of the differing values, how far (in LSB) the worst lay from x.5
    # in LSB, measured for a layer's requantization: the largest distance between the two paths'
    # unrounded values (M0's fixed-point error on the engine's side, float32's on the simulation's);
    # only values this close to a tie can part. None for an add (two roundings of its own) or a cat.
    tie_window: float | None


@dataclass
class EngineGap:
    available: bool
    reason: str = ""  # why not available
    disagreeing_images: list[int] = field(default_factory=list)
    layers: list[LayerGap] = field(default_factory=list)


@dataclass
class Diagnosis:
    config: QuantConfig
    float_accuracy: float
    quant_accuracy: float
    layers: list[LayerDiagnosis]
    suggestions: list[Suggestion]
    engine_gap: EngineGap
    diagram: Diagram | None = None  # the network diagram (qcore.graph's boxes and arrows); not in to_dict

    def to_dict(self) -> dict[str, object]:
        """JSON-ready; an infinite SQNR (no error at all) becomes null."""

        def finite(value: object) -> object:
            return None if isinstance(value, float) and not math.isfinite(value) else value

        return {
            "config": self.config.to_dict(),
            "float_accuracy": self.float_accuracy,
            "quant_accuracy": self.quant_accuracy,
            "layers": [{key: finite(value) for key, value in asdict(row).items()} for row in self.layers],
            "suggestions": [asdict(s) for s in self.suggestions],
            "engine_gap": {
                **asdict(self.engine_gap),
                "layers": [
                    {**asdict(gap), "differences": {str(k): v for k, v in gap.differences.items()}}
                    for gap in self.engine_gap.layers
                ],
            },
        }


def layer_table(rows: Sequence[LayerDiagnosis]) -> list[dict[str, object]]:
    """The per-layer diagnosis as table rows, percentages and dB rounded to two places."""
    return [
        {
            "layer": r.layer,
            "only this quantized (%)": round(100 * r.only_this_accuracy, 2),
            "all but this quantized (%)": round(100 * r.all_but_this_accuracy, 2),
            "weights only (%)": round(100 * r.weights_only_accuracy, 2),
            "activations only (%)": round(100 * r.activations_only_accuracy, 2),
            "SQNR isolated (dB)": round(r.sqnr_isolated_db, 2),
            "SQNR accumulated (dB)": round(r.sqnr_accumulated_db, 2),
        }
        for r in rows
    ]


# --- variants of one quantized net ---------------------------------------------------------------


def variant(qnet: QuantizedNet, weights: Collection[str], inputs: Collection[str]) -> QuantizedNet:
    """`qnet` with weight quantization kept only for `weights` and input quantization only for
    `inputs` (a layer already float in qnet stays float). Bias stays int32 only where both are on."""
    layers: dict[str, LayerQuant] = {}
    for name, quant in qnet.layers.items():
        keep_weights, keep_input = name in weights, name in inputs
        changes: dict[str, object] = {}
        if not keep_weights:
            changes |= {"weight_qparams": None, "weight_int": None, "weight_bits": None}
        if not keep_input:
            changes["input_qparams"] = None
        if not (keep_weights and keep_input):
            changes["bias_int"] = None
        layers[name] = replace(quant, **changes)
    return qnet.with_layers(layers)


def _average_weight_bits(qnet: QuantizedNet) -> float:
    """Parameter-weighted average weight bits, a float layer counting 32."""
    sizes = {n: q.weight.numel() for n, q in qnet.layers.items()}
    return sum(size * (qnet.layers[n].weight_bits or 32) for n, size in sizes.items()) / sum(sizes.values())


def _candidates(config: QuantConfig, layers: Sequence[str]) -> list[tuple[str, dict[str, object]]]:
    """Changes worth measuring, from the config: keep a layer float, the first and last layers at 8
    bits, one more bit of weights or of activations, a better range rule or granularity."""
    found: list[tuple[str, dict[str, object]]] = []
    for name in layers:
        if name not in config.float_layers:
            found.append((f"keep {name} in float", {"float_layers": [*config.float_layers, name]}))
    if not config.edge_bits and not config.weight_bits_budget and min(config.weight_bits, config.act_bits) < 8:
        found.append(("the first and last layers at 8 bits", {"edge_bits": 8}))
    for key, noun in (("weight_bits", "weights"), ("act_bits", "activations")):
        current = getattr(config, key)
        higher = [b for b in DASHBOARD.bits if current < b <= 8]
        if higher:
            found.append((f"{noun} at {higher[0]} bits instead of {current}", {key: higher[0]}))
    if config.observer != "mse":
        found.append((f"activation ranges by MSE instead of {config.observer}", {"observer": "mse"}))
    if config.granularity != "per-channel":
        found.append(("per-channel weight scales instead of per-tensor", {"granularity": "per-channel"}))
    if config.weight_range != "mse":
        found.append(("MSE-clipped weight ranges instead of min/max", {"weight_range": "mse"}))
    return found


# --- where the integer engine and the simulation part ----------------------------------------------


@torch.inference_mode()
def engine_gap(qnet: QuantizedNet, data: Dataset, images: int = SQNR_IMAGES) -> EngineGap:
    """Images whose prediction differs between the integer engine and the simulation (full test
    set), and, on the first `images` test images, the integer differences at every quantization point
    when the engine gets the simulation's own integers at every point before it (so each point's gap
    is its own, not inherited): each layer's requantized output, each add's and cat's output. The
    logits are compared by prediction only."""
    problems = integer_path_problems(qnet.config)
    if problems:
        return EngineGap(False, "; ".join(problems))
    from qcore.inference.integer import IntegerEngineError, IntegerNet

    try:
        engine = IntegerNet(qnet)
    except IntegerEngineError as error:
        return EngineGap(False, str(error))
    simulated = evaluate(qnet, data.test).predictions
    disagreeing = (engine.predict(data.test.images) != simulated).nonzero().flatten().tolist()
    reals = qnet.point_values(data.test.images[:images])
    fed = {point: quantize(value, qnet.points[point].qparams).to(torch.int64) for point, value in reals.items()}
    before: dict[str, torch.Tensor] = {}
    integers = engine.values_int(fed[qnet.graph.ops[0].name], feed=fed, before=before)
    gaps = []
    for point in qnet.plan.points:
        if qnet.graph.op(point).kind is OpKind.INPUT:
            continue
        qparams = qnet.points[point].qparams
        difference = (integers[point] - fed[point]).flatten()
        values, counts = difference.unique(return_counts=True)
        unrounded = reals[point].double() / float(qparams.scale) + int(qparams.zero_point)
        tie_distance = ((unrounded - unrounded.floor()) - 0.5).abs().flatten()[difference != 0]
        requant = engine._requant.get(point)
        name, step = point if requant is None else requant.source, None  # a layer's or an add's name
        if requant is not None and requant.source in qnet.layers:
            step = tie_window(requant, before[point], unrounded, _activation(qnet, requant.source, point), qparams)
        gaps.append(
            LayerGap(
                name,
                {int(v): int(c) for v, c in zip(values, counts, strict=True)},
                int(difference.numel()),
                None if step is None else int((tie_distance <= step).sum()),
                float(tie_distance.max()) if tie_distance.numel() else 0.0,
                step,
            )
        )
    return EngineGap(True, "", disagreeing, gaps)


def _activation(qnet: QuantizedNet, layer: str, point: str) -> OpKind | None:
    """The ReLU or ReLU6 between a layer and the point its output is requantized to, if any."""
    op = qnet.graph.op(point)
    while op.name != layer:
        if op.kind in (OpKind.RELU, OpKind.RELU6):
            return op.kind
        op = qnet.graph.op(op.inputs[0])
    return None


def tie_window(
    requant: Requantization,
    accumulators: torch.Tensor,
    unrounded: torch.Tensor,
    activation: OpKind | None,
    qparams: QParams,
) -> float:
    """How far apart, in output LSB, the two paths' unrounded values lie for a layer's integer
    `accumulators` (as the requantization reads them), measured: each is compared with the exact value
    acc * s_in * s_w / s_out (+ z), through the same ReLU or ReLU6, in float64. The engine's side is
    M0's error (at most 2^-32 of M, relative), the simulation's is float32's summation error."""
    acc = accumulators.to(torch.float64)
    multiplier, shift, real = requant.multiplier, requant.shift, requant.real_multiplier.double()
    if requant.repeat > 1:
        multiplier, shift, real = (t.repeat_interleave(requant.repeat) for t in (multiplier, shift, real))
    shape = [1] * acc.ndim
    if multiplier.numel() > 1:
        shape[1] = -1
    fixed = (multiplier.double() * 2.0 ** (shift.double() - 31)).reshape(shape)
    exact_multiplier = real.reshape(shape)
    exact = acc * exact_multiplier + requant.output_zero
    if activation is not None:  # at or below the zero point both paths give the zero point: nothing to round
        exact = torch.clamp(exact, min=requant.output_zero)
    if activation is OpKind.RELU6:
        exact = torch.clamp(exact, max=6.0 / float(qparams.scale) + int(qparams.zero_point))
    engine_side = (acc * (fixed - exact_multiplier)).abs()
    simulation_side = (unrounded.reshape(exact.shape) - exact).abs()
    return float((engine_side + simulation_side).max())


# --- the whole diagnosis ---------------------------------------------------------------------


def diagnose(
    model: Net,
    data: Dataset,
    config: QuantConfig,
    float_accuracy: float | None = None,
    on_progress: Progress | None = None,
    suggestions: int = 3,
    on_row: Callable[[list[LayerDiagnosis]], None] | None = None,
) -> Diagnosis:
    """Per-layer accuracies and SQNR, the best `suggestions` fixes (each measured), and the
    integer engine's gap. `on_progress(done, total, what)` is called as the runs finish, and
    `on_row(rows so far)` as each layer's row is complete (a page fills its table in)."""
    qnet = quantize_for(model, data, config)
    layers = qnet.graph.layers
    candidates = _candidates(config, layers)
    total = 1 + 4 * len(layers) + len(candidates) + 1
    done = 0

    def step(what: str) -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(done, total, what)

    if float_accuracy is None:
        float_accuracy = evaluate(model, data.test).accuracy
    everything = set(layers)
    cache: dict[tuple[frozenset[str], frozenset[str]], float] = {}

    def accuracy(weights: set[str], inputs: set[str]) -> float:
        key = (frozenset(weights), frozenset(inputs))
        if key not in cache:
            cache[key] = (
                float_accuracy
                if not weights and not inputs
                else evaluate(variant(qnet, weights, inputs), data.test).accuracy
            )
        return cache[key]

    quant_accuracy = accuracy(everything, everything)
    step("the config itself")
    reference = qnet.float_model if qnet.float_model is not None else model
    x = data.test.images[:SQNR_IMAGES]
    float_outputs = capture_layers(reference, x, "output")
    with torch.inference_mode():
        accumulated = qnet.trace(x)[1]
    rows = []
    for name in layers:
        only = accuracy({name}, {name})
        step(f"{name}: only this layer")
        all_but = accuracy(everything - {name}, everything - {name})
        step(f"{name}: all but this layer")
        weights_only = accuracy({name}, set())
        step(f"{name}: weights only")
        activations_only = accuracy(set(), {name})
        step(f"{name}: activations only")
        with torch.inference_mode():
            isolated = variant(qnet, {name}, {name}).trace(x)[1][name]
        rows.append(
            LayerDiagnosis(
                name,
                only,
                all_but,
                weights_only,
                activations_only,
                sqnr_db(float_outputs[name], isolated),
                sqnr_db(float_outputs[name], accumulated[name]),
            )
        )
        if on_row is not None:
            on_row(list(rows))
    measured = []
    bits_now = _average_weight_bits(qnet)
    for text, changes in candidates:
        applied = quantize_for(model, data, _changed(config, changes, layers))
        result = evaluate(applied, data.test).accuracy
        measured.append(
            Suggestion(text, changes, result, 100 * (result - quant_accuracy), _average_weight_bits(applied) - bits_now)
        )
        step(f"trying: {text}")
    helpful = sorted((s for s in measured if s.gain_points > 0), key=lambda s: (-s.gain_points, s.extra_weight_bits))
    gap = engine_gap(qnet, data)
    step("integer engine vs simulation")
    diagram = graph_diagram(qnet.graph)
    return Diagnosis(config, float_accuracy, quant_accuracy, rows, helpful[:suggestions], gap, diagram)


def _changed(config: QuantConfig, changes: dict[str, object], layers: Sequence[str] | None = None) -> QuantConfig:
    """`config` with `changes` made (lists, as JSON and the sidebar hold them, become tuples)."""
    return config.with_changes(layers, **{k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()})


def apply_suggestion(config: QuantConfig, suggestion: Suggestion) -> QuantConfig:
    """The config with the suggestion's changes made: the config its accuracy was measured on."""
    return _changed(config, suggestion.changes)


@dataclass(frozen=True)
class ChannelError:
    channel: int
    weight_sqnr_db: float  # this output channel's weights, quantized vs float


def worst_channels(quant: LayerQuant, count: int = 5) -> list[ChannelError]:
    """The output channels whose quantized weights are furthest from their float weights."""
    if quant.weight_qparams is None:
        return []
    reference, quantized = quant.weight.flatten(1), quant.effective_weight().flatten(1)
    errors = [ChannelError(c, sqnr_db(reference[c], quantized[c])) for c in range(reference.shape[0])]
    return sorted(errors, key=lambda e: e.weight_sqnr_db)[:count]
