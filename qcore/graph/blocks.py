"""The model graph cut into blocks: the units block reconstruction (qcore.quantize.reconstruction)
learns one at a time, BRECQ's (Li et al. 2021) residual blocks, depthwise-separable pairs and pairs of
layers, found in the graph rather than named per architecture.

A cut is an op whose value is the only one anything after it reads (the input, the output of a residual
block after its add, any value of a chain). The ops between two cuts that hold a layer form a segment;
the ops without a layer that follow one (its ReLU, pooling, flatten) join it, so a block's output is
what the next block reads. Segments of one layer are then paired (a depthwise conv with the layer after
it, else two neighbours), since one layer alone is what AdaRound already reconstructs.
"""

from __future__ import annotations

from dataclasses import dataclass

from qcore.graph.ops import ModelGraph, OpKind


@dataclass(frozen=True)
class Block:
    """Ops after `start` up to `end` (inclusive): `start`'s value is all they read from before."""

    name: str
    kind: str  # "residual", "separable" (depthwise then the next layer), "pair", "group" or "layer"
    start: str
    end: str
    layers: tuple[str, ...]


def cuts(graph: ModelGraph) -> list[int]:
    """Indices of the ops whose value is the only one live after them (the input's included)."""
    last_use = {name: index for index, op in enumerate(graph.ops) for name in op.inputs}
    found, live = [], set()
    for index, op in enumerate(graph.ops):
        live = {name for name in live if last_use.get(name, -1) > index}
        if last_use.get(op.name, -1) > index:
            live.add(op.name)
        if live == {op.name}:
            found.append(index)
    return found


def _name(layers: tuple[str, ...]) -> str:
    """The layers' common module path (a residual block's "layer2.0"), else their names joined by +."""
    prefix = layers[0].split(".")
    for layer in layers[1:]:
        parts = layer.split(".")
        length = 0
        while length < min(len(prefix), len(parts)) and prefix[length] == parts[length]:
            length += 1
        prefix = prefix[:length]
    return ".".join(prefix) if prefix and len(layers) > 1 else "+".join(layers)


def reconstruction_blocks(graph: ModelGraph) -> list[Block]:
    """The blocks in execution order, covering every layer once; the first starts at the input and
    each starts where the one before ends. The final log-softmax belongs to none."""
    ops = graph.ops
    stop = len(ops) - 1
    while stop > 0 and ops[stop].kind is OpKind.LOG_SOFTMAX:
        stop -= 1
    boundaries = [index for index in cuts(graph) if index <= stop]
    if boundaries[-1] != stop:
        boundaries.append(stop)
    # segments: (start index, end index, layers); a segment without a layer joins the one before it
    segments: list[tuple[int, int, tuple[str, ...]]] = []
    for begin, end in zip(boundaries, boundaries[1:], strict=False):
        layers = tuple(op.name for op in ops[begin + 1 : end + 1] if op.is_layer)
        if segments and not layers:
            first, _, held = segments[-1]
            segments[-1] = (first, end, held)
        elif segments and not segments[-1][2]:  # ops before the first layer join the first segment
            segments[-1] = (segments[-1][0], end, layers)
        else:
            segments.append((begin, end, layers))
    blocks: list[Block] = []
    index = 0
    while index < len(segments):
        begin, end, layers = segments[index]
        following = segments[index + 1] if index + 1 < len(segments) else None
        single = len(layers) == 1 and following is not None and len(following[2]) == 1
        # a depthwise conv pairs with the layer after it, so a layer before one is left alone
        if (
            single
            and following is not None
            and not (graph.is_depthwise(following[2][0]) and not graph.is_depthwise(layers[0]))
        ):
            pair = (layers[0], following[2][0])
            kind = "separable" if graph.is_depthwise(layers[0]) else "pair"
            blocks.append(Block(_name(pair), kind, ops[begin].name, ops[following[1]].name, pair))
            index += 2
            continue
        residual = any(op.kind is OpKind.ADD for op in ops[begin + 1 : end + 1])
        kind = "residual" if residual else ("layer" if len(layers) == 1 else "group")
        blocks.append(Block(_name(layers), kind, ops[begin].name, ops[end].name, layers))
        index += 1
    return [block for block in blocks if block.layers]
