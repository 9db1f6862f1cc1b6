"""Where a model graph is quantized: which tensors get an observer and their own scale and zero point
(the quantization points), and which share another tensor's (the TFLite quantization spec; PT2E's
SharedQuantizationSpec).

The rules, for the simulation and the integer engine alike:
- A quantized layer's input, both inputs of an add and the input of an average pool must be on a
  grid. Where the tensor is not on one already, it becomes a point: the input image, a layer's output
  (after the ReLU, ReLU6, max-pool and flatten that follow it, which commute with the requantization
  and become clamps), an add's output (after its optional ReLU, TFLite's fused activation).
- A channel cat is always a point; its inputs are requantized to its scale and zero point.
- An activation other than ReLU (a lookup) reads its input on a grid and is always a point itself: on
  integers it is a table from its input's levels to its own.
- A normalization by the sample's own statistics likewise: float between a dequantize and a quantize.
- Max-pool, ReLU, ReLU6 and flatten of a tensor on a grid, and an average pool, share its grid.
The network's input feeds a layer on a grid only when the config quantizes the input.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from qcore.graph.ops import PASSTHROUGH_KINDS, ModelGraph, OpKind


@dataclass(frozen=True)
class QuantPlan:
    """points: the ops whose output has its own observer and qparams, in execution order. grid: each op
    whose output lies on a grid -> the point whose qparams it uses (a point maps to itself). layer_input:
    each layer whose input is quantized -> the point its input lies on (a layer absent: float input)."""

    points: tuple[str, ...]
    grid: dict[str, str]
    layer_input: dict[str, str]


def reads_network_input(graph: ModelGraph, name: str) -> bool:
    """Whether op `name`'s value is the input image seen through pass-through ops only."""
    op = graph.op(name)
    while op.kind in PASSTHROUGH_KINDS:
        op = graph.op(op.inputs[0])
    return op.kind is OpKind.INPUT


def quant_plan(graph: ModelGraph, quantized_layers: Collection[str], quantize_input: bool) -> QuantPlan:
    """The points for a config that quantizes `quantized_layers` (weights and input) and, when
    `quantize_input`, the network's input. One pass in execution order: an op whose output some op
    requires on a grid becomes a point unless the points before it already put it on one (pass-through
    ops share their input's grid), so marking the earliest such op first and walking on finds the same
    points as marking one at a time until nothing is missing, in time linear in the graph's size."""
    wants_input = {
        op.name
        for op in graph.layer_ops()
        if op.name in quantized_layers and (quantize_input or not reads_network_input(graph, op.inputs[0]))
    }
    required = {
        name
        for op in graph.ops
        if op.name in wants_input or op.kind in (OpKind.ADD, OpKind.AVGPOOL, OpKind.LOOKUP, OpKind.NORMALIZE)
        for name in op.inputs
    }
    points: list[str] = []
    grid: dict[str, str] = {}
    for op in graph.ops:
        if (op.kind in PASSTHROUGH_KINDS or op.kind is OpKind.AVGPOOL) and op.inputs[0] in grid:
            grid[op.name] = grid[op.inputs[0]]
        if op.kind in (OpKind.CAT, OpKind.LOOKUP, OpKind.NORMALIZE) or (op.name in required and op.name not in grid):
            points.append(op.name)
            grid[op.name] = op.name
    layer_input = {name: grid[graph.op(name).inputs[0]] for name in graph.layers if name in wants_input}
    return QuantPlan(tuple(points), grid, layer_input)
