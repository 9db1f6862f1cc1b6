"""One image on integers: the integer engine's computation for one output of each layer and each
residual add, written out, for any model graph.

`explain` returns, for each layer, every (input integer, weight integer) pair of one output's dot
product (the padded, strided patch the output reads; one group's channels for a grouped or depthwise
convolution), the int32 accumulator, the fixed-point multiplier and shift, and the requantized output;
for each add, TFLite's steps: each input's integer minus its zero point shifted left by 20, rescaled
by its own fixed-point multiplier, the sum, and its requantization. Every number is taken from the
integer engine's own tensors for that image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from qcore.analysis.tables import quantize_for
from qcore.data import Dataset
from qcore.graph import GraphRun, ModelGraph, Op, OpKind, model_graph
from qcore.inference.integer import IntegerNet, Requantization
from qcore.quantize.config import QuantConfig
from qcore.quantize.integer_rules import ADD_LEFT_SHIFT, INT32_MAX, multiply_by_quantized_multiplier
from qcore.quantize.qmodel import QuantizedNet


@dataclass(frozen=True)
class LayerWalk:
    name: str
    position: list[int]  # the output index, channel first: [c, row, col] of the conv's output (before any pool), [j]
    input_zero_point: int
    weight_zero_point: int
    terms: list[list[int]]  # every [input_int, weight_int] pair of the dot product, in order
    bias: int
    accumulator: int  # sum((x - zx) * (w - zw)) + bias
    multiplier: int  # M0 in [2^30, 2^31)
    shift: int  # TFLite's convention: M = M0 * 2^(shift - 31)
    real_multiplier: float  # M0 * 2^(shift - 31): what they stand for
    exact_multiplier: float  # s_in * s_w / s_out in float64
    scaled: int  # the accumulator after the high multiply and the shift, before the zero point and clamp
    output_zero_point: int
    output_min: int  # the clamp's lower end: the zero point where a ReLU follows
    output_max: int
    output: int  # the requantized, clamped value at `position` (the last layer: the logit at the common scale)
    pooled_window: list[int]  # convs followed by a max-pool: the window of requantized outputs it reduces
    pooled: int | None  # that max-pool's output
    input_ints: list[list[int]]  # convs: the first input channel of the patch behind this output, for display
    feature_map_int: list[list[int]]  # convs: this output channel's map on the grid it reaches (after any pool)
    feature_map_float: list[list[float]]  # convs: the float model's map for the same channel there


@dataclass(frozen=True)
class AddWalk:
    """One output of a residual add, TFLite's int8 ADD step by step."""

    name: str
    position: list[int]  # [c, row, col] or [j]
    inputs: list[str]  # the two ops it reads
    input_values: list[int]  # their integers at `position`
    input_zero_points: list[int]
    left_shift: int  # 20
    input_multipliers: list[int]  # M0 of s_i / (2 max(s1, s2)) for each input
    input_shifts: list[int]
    rescaled: list[int]  # ((q_i - z_i) << 20) times its multiplier, rounded once
    total: int  # their sum, at the scale 2 max(s1, s2) / 2^20
    multiplier: int  # M0 of the sum's requantization to the output grid
    shift: int
    scaled: int  # the sum after that multiply and shift, before the zero point and clamp
    output_zero_point: int
    output_min: int  # a ReLU after the add: the clamp at the zero point
    output_max: int
    output: int


@dataclass(frozen=True)
class LookupWalk:
    """One activation other than ReLU on integers: its input's level at `position` read in its table
    (TFLite's int8 LOGISTIC and TANH), with the reals each level stands for."""

    name: str
    function: str  # sigmoid, tanh, ...
    position: list[int]
    input_level: int
    input_real: float  # s_in * (q_in - z_in)
    activation_real: float  # the activation of that real, in float
    output_level: int  # the table's entry: round(activation / s_out) + z_out, clamped
    output_real: float  # s_out * (q_out - z_out)
    table_size: int  # entries: one per level of the input's grid


@dataclass(frozen=True)
class Walk:
    image: int
    label: int
    prediction: int
    float_prediction: int
    logits_int32: list[int]
    float_probabilities: list[float]
    layers: list[LayerWalk]
    adds: list[AddWalk]
    order: list[str]  # layers, adds and lookups in execution order (display)
    lookups: list[LookupWalk] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        """The CLI's JSON (the display-only maps and order left out)."""
        display_only = ("input_ints", "feature_map_int", "feature_map_float")
        return {
            "image": self.image,
            "label": self.label,
            "prediction": self.prediction,
            "float_prediction": self.float_prediction,
            "logits_int32": self.logits_int32,
            "float_probabilities": self.float_probabilities,
            "layers": [{k: v for k, v in asdict(layer).items() if k not in display_only} for layer in self.layers],
            "adds": [asdict(add) for add in self.adds],
            "lookups": [asdict(lookup) for lookup in self.lookups],
        }


def walk_shapes(graph: ModelGraph) -> dict[str, tuple[int, ...]]:
    """Each layer's and add's output shape without the batch (where `positions` pick an output)."""
    return {op.name: op.shape[1:] for op in graph.ops if op.is_layer or op.kind in (OpKind.ADD, OpKind.LOOKUP)}


def _check_position(name: str, position: Sequence[int], shape: Sequence[int]) -> list[int]:
    if len(position) != len(shape) or any(not 0 <= p < s for p, s in zip(position, shape, strict=True)):
        raise ValueError(f"{name}: position {list(position)} outside the output's shape {list(shape)}")
    return [int(p) for p in position]


class _Values(GraphRun):
    """The float model's value of every op (the maps shown beside the integer ones)."""

    def __init__(self, graph: ModelGraph) -> None:
        super().__init__(graph)
        self.values: dict[str, torch.Tensor] = {}

    def after(self, op: Op, value: torch.Tensor) -> torch.Tensor:
        self.values[op.name] = value
        return value


def _channel(vector: torch.Tensor, channel: int) -> torch.Tensor:
    """A per-channel value of a requantization (the one value when it is per-tensor)."""
    flat = vector.reshape(-1)
    return flat[channel if flat.numel() > 1 else 0]


def _rescale(value: int | torch.Tensor, multiplier: int, shift: int) -> int:
    """One value times M0 * 2^(shift - 31), rounded once (the engine's own function)."""
    x = torch.as_tensor(value, dtype=torch.int64).reshape(1)
    return int(multiply_by_quantized_multiplier(x, torch.tensor([multiplier]), torch.tensor([shift]))[0])


def _point_after(graph: ModelGraph, engine: IntegerNet, name: str) -> tuple[str, Op | None]:
    """The op whose integers hold layer `name`'s requantized output (its point, or the output for the
    logits), and the max-pool on the way there, if any."""
    op, pool = graph.op(name), None
    while op.name not in engine._requant and op.name != graph.output:
        (op,) = graph.consumers(op.name)[:1]
        if op.kind is OpKind.MAXPOOL:
            pool = op
    return op.name, pool


def _pool_window(requantized: torch.Tensor, pool: Op, row: int, col: int) -> list[int]:
    """The max-pool window holding output (row, col): the one whose top-left corner the position
    falls in, padding left out."""
    (kh, kw), (sh, sw), (ph, pw) = pool.attrs["kernel"], pool.attrs["stride"], pool.attrs["padding"]  # type: ignore[misc]
    top = ((row + ph) // sh) * sh - ph
    left = ((col + pw) // sw) * sw - pw
    height, width = requantized.shape[-2:]
    rows = range(max(top, 0), min(top + kh, height))
    cols = range(max(left, 0), min(left + kw, width))
    return [int(requantized[r, c]) for r in rows for c in cols]


def _layer_walk(
    engine: IntegerNet,
    graph: ModelGraph,
    op: Op,
    x: torch.Tensor,
    integers: dict[str, torch.Tensor],
    floats: dict[str, torch.Tensor],
    position: Sequence[int] | None,
) -> LayerWalk:
    layer = engine.layers[op.name]
    requant: Requantization = engine.layer_requantization(op.name)
    acc = engine.layer_accumulators(op.name, x)  # [1, O, H, W] or [1, O]
    requantized = requant.apply(acc)[0]  # every output before any pool, as the engine requantizes it
    default = divmod_index(int(requantized.argmax()), requantized.shape)
    where = _check_position(op.name, default if position is None else position, requantized.shape)
    channel = where[0]
    zx, zw = layer.input_zero, int(layer.weight_zero[channel])
    window: list[int] = []
    pooled = None
    input_patch: list[list[int]] = []
    feature_int: list[list[int]] = []
    feature_float: list[list[float]] = []
    if op.kind is OpKind.CONV:
        _, row, col = where
        (sh, sw), (ph, pw), groups = op.attrs["stride"], op.attrs["padding"], op.attrs["groups"]  # type: ignore[misc]
        kh, kw = layer.weight.shape[-2:]
        padded = torch.nn.functional.pad(x, (pw, pw, ph, ph), value=zx) if (ph, pw) != (0, 0) else x
        per_group = layer.weight.shape[1]
        first = (channel // (layer.weight.shape[0] // groups)) * per_group  # type: ignore[operator]
        patch = padded[0, first : first + per_group, row * sh : row * sh + kh, col * sw : col * sw + kw]
        terms = [[int(a), int(b)] for a, b in zip(patch.flatten(), layer.weight[channel].flatten(), strict=True)]
        input_patch = patch[0].tolist()
        point, pool = _point_after(graph, engine, op.name)
        if pool is not None:
            window = _pool_window(requantized[channel], pool, row, col)
            pooled = max(window)
        if point != graph.output:
            before_flatten = graph.op(point)
            while len(before_flatten.shape) != 4:  # the requantization sits on a flatten: its input's map
                before_flatten = graph.op(before_flatten.inputs[0])
            shape = before_flatten.shape[1:]
            feature_int = integers[point][0].reshape(shape)[channel].tolist()
            feature_float = floats[point][0].reshape(shape)[channel].tolist()
    else:
        terms = [[int(a), int(b)] for a, b in zip(x.flatten(1)[0], layer.weight[channel], strict=True)]
    multiplier, shift = int(_channel(requant.multiplier, channel)), int(_channel(requant.shift, channel))
    accumulator = int(acc[0][tuple(where)])
    return LayerWalk(
        name=op.name,
        position=where,
        input_zero_point=zx,
        weight_zero_point=zw,
        terms=terms,
        bias=int(layer.bias[channel]),
        accumulator=accumulator,
        multiplier=multiplier,
        shift=shift,
        real_multiplier=multiplier * 2.0 ** (shift - 31),
        exact_multiplier=float(_channel(requant.real_multiplier, channel)),
        scaled=_rescale(accumulator, multiplier, shift),
        output_zero_point=requant.output_zero,
        output_min=requant.output_min,
        output_max=min(requant.output_max, INT32_MAX),
        output=int(requantized[tuple(where)]),
        pooled_window=window,
        pooled=pooled,
        input_ints=input_patch,
        feature_map_int=feature_int,
        feature_map_float=feature_float,
    )


def _add_walk(
    engine: IntegerNet,
    op: Op,
    integers: dict[str, torch.Tensor],
    position: Sequence[int] | None,
) -> AddWalk:
    zeros, multipliers, shifts = engine._adds[op.name]
    requant = engine.layer_requantization(op.name)
    total = engine._compute(op, [integers[name] for name in op.inputs])  # the raw sum, as the engine adds
    output = requant.apply(total)[0]
    default = divmod_index(int(output.argmax()), output.shape)
    where = tuple(_check_position(op.name, default if position is None else position, output.shape))
    values = [int(integers[name][0][where]) for name in op.inputs]
    rescaled = [
        _rescale((value - zero) << ADD_LEFT_SHIFT, int(multiplier), int(shift))
        for value, zero, multiplier, shift in zip(values, zeros, multipliers, shifts, strict=True)
    ]
    multiplier, shift = int(_channel(requant.multiplier, 0)), int(_channel(requant.shift, 0))
    return AddWalk(
        name=op.name,
        position=list(where),
        inputs=list(op.inputs),
        input_values=values,
        input_zero_points=list(zeros),
        left_shift=ADD_LEFT_SHIFT,
        input_multipliers=[int(m) for m in multipliers],
        input_shifts=[int(s) for s in shifts],
        rescaled=rescaled,
        total=int(total[0][where]),
        multiplier=multiplier,
        shift=shift,
        scaled=_rescale(total[0][where], multiplier, shift),
        output_zero_point=requant.output_zero,
        output_min=requant.output_min,
        output_max=requant.output_max,
        output=int(output[where]),
    )


def _lookup_walk(
    engine: IntegerNet, op: Op, integers: dict[str, torch.Tensor], position: Sequence[int] | None
) -> LookupWalk:
    from qcore.graph.ops import activation

    low, table = engine._tables[op.name]
    source, target = engine.points[engine.plan.grid[op.inputs[0]]], engine.points[op.name]
    output = integers[op.name][0]
    default = divmod_index(int(output.argmax()), output.shape)
    where = tuple(_check_position(op.name, default if position is None else position, output.shape))
    level = int(integers[op.inputs[0]][0][where])
    real = float((level - int(source.zero_point)) * source.scale)
    function, parameter = str(op.attrs["function"]), op.attrs["parameter"]
    out = int(table[level - low])
    return LookupWalk(
        name=op.name,
        function=function,
        position=list(where),
        input_level=level,
        input_real=real,
        activation_real=float(activation(function, parameter, torch.tensor(real))),  # type: ignore[arg-type]
        output_level=out,
        output_real=float((out - int(target.zero_point)) * target.scale),
        table_size=len(table),
    )


@torch.inference_mode()
def explain(
    model: torch.nn.Module,
    data: Dataset,
    config: QuantConfig,
    image: int,
    positions: dict[str, Sequence[int]] | None = None,
    qnet: QuantizedNet | None = None,
) -> Walk:
    """The integer walk of test image `image`. `positions` picks each layer's or add's output (channel
    first; `walk_shapes` gives their shapes); by default the largest requantized output of each (the
    last layer: the predicted class). Pass `qnet` to walk a quantized model built elsewhere (a QAT
    checkpoint's) instead of calibrating."""
    if not 0 <= image < len(data.test):
        raise ValueError(f"image must be between 0 and {len(data.test) - 1} (got {image})")
    positions = positions or {}
    qnet = quantize_for(model, data, config) if qnet is None else qnet
    engine = IntegerNet(qnet)  # raises IntegerEngineError for configs that cannot run on integers
    graph = engine.graph
    shapes = walk_shapes(graph)
    unknown = sorted(set(positions) - set(shapes))
    if unknown:
        raise ValueError(f"no layer or add named {unknown[0]!r}; they are {', '.join(shapes)}")
    x_real = data.test.images[image : image + 1]
    integers = engine.values_int(engine.quantize_input(x_real))
    reference = qnet.float_model if qnet.float_model is not None else model
    float_run = _Values(model_graph(reference))  # the maps beside the integer ones: what the quantizer saw
    float_run.run(x_real)
    float_log_probs = model(x_real)[0]
    layers, adds, lookups, order = [], [], [], []
    for op in graph.ops:
        if op.is_layer:
            x = integers[op.inputs[0]]
            layers.append(_layer_walk(engine, graph, op, x, integers, float_run.values, positions.get(op.name)))
        elif op.kind is OpKind.ADD:
            adds.append(_add_walk(engine, op, integers, positions.get(op.name)))
        elif op.kind is OpKind.LOOKUP:
            lookups.append(_lookup_walk(engine, op, integers, positions.get(op.name)))
        else:
            continue
        order.append(op.name)
    logits = integers["<logits>"][0]
    return Walk(
        image=image,
        label=int(data.test.labels[image]),
        prediction=int(logits.argmax()),
        float_prediction=int(float_log_probs.argmax()),
        logits_int32=[int(v) for v in logits],
        float_probabilities=[float(p) for p in float_log_probs.exp()],
        layers=layers,
        adds=adds,
        order=order,
        lookups=lookups,
    )


def divmod_index(flat: int, shape: Sequence[int]) -> list[int]:
    """The multi-index of a flat (row-major) index."""
    index = []
    for size in reversed(list(shape)):
        flat, rest = divmod(flat, size)
        index.append(rest)
    return list(reversed(index))
