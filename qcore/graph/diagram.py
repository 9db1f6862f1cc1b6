"""The model graph laid out for a picture: boxes for the input, each layer, pool, add and cat (activations
and reshapes are the arrows between them), in execution order from left to right, the main path on
lane 0 and the branches (a residual block's convs beside its shortcut, a cat's other inputs) below it.
The Model page's card and the Diagnose page draw it; so does the diagnosis's HTML report."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from qcore.graph.ops import ModelGraph, OpKind

BOX_KINDS = (OpKind.INPUT, OpKind.CONV, OpKind.LINEAR, OpKind.MAXPOOL, OpKind.AVGPOOL, OpKind.ADD, OpKind.CAT)


@dataclass(frozen=True)
class DiagramBox:
    name: str  # the op's name (a layer's is its module path)
    label: str  # what the box says: a layer's name, else input / pool / add / cat
    kind: str  # conv, depthwise_conv, linear, maxpool, avgpool, global_avgpool, add, concat, input
    x: int  # column: the box's place in execution order
    lane: int  # 0: the main path; 1: a branch beside it
    parameters: int  # a layer's weights and biases (0 for the rest)
    shape: tuple[int, ...]  # its output without the batch

    @property
    def is_layer(self) -> bool:
        return self.kind in ("conv", "depthwise_conv", "linear")


@dataclass(frozen=True)
class Diagram:
    boxes: tuple[DiagramBox, ...]
    edges: tuple[tuple[str, str], ...]  # (from box, to box): what a box reads, through activations and reshapes

    def box(self, name: str) -> DiagramBox:
        return next(box for box in self.boxes if box.name == name)

    def passes_over(self, source: str, target: str) -> bool:
        """Whether the arrow source -> target runs along one lane past other boxes on it (drawn as an arc)."""
        a, b = self.box(source), self.box(target)
        return a.lane == b.lane and any(box.lane == a.lane and a.x < box.x < b.x for box in self.boxes)

    @staticmethod
    def short_label(label: str, width: int = 8) -> list[str]:
        """A long name in lines of its parts ('layer2_shortcut_0' -> 'layer2', 'shortcut_0'), for a box."""
        if len(label) <= width:
            return [label]
        parts = label.replace(".", "_").split("_")
        lines = [parts[0]]
        for part in parts[1:]:
            if len(lines[-1]) + 1 + len(part) <= width:
                lines[-1] += "_" + part
            else:
                lines.append(part)
        return lines


def _kind(graph: ModelGraph, name: str) -> str:
    op = graph.op(name)
    if op.kind is OpKind.CONV:
        return "depthwise_conv" if graph.is_depthwise(name) else "conv"
    if op.kind is OpKind.AVGPOOL:
        return "global_avgpool" if graph.is_global_pool(name) else "avgpool"
    return {OpKind.CAT: "concat"}.get(op.kind, op.kind.value)


def graph_diagram(graph: ModelGraph) -> Diagram:
    """The boxes and arrows of `graph` (see the module's docstring)."""
    boxes = [op for op in graph.ops if op.kind in BOX_KINDS]
    is_box = {op.name for op in boxes}

    def sources(name: str) -> list[str]:
        """The boxes whose value reaches op `name` through non-box ops only, in input order."""
        if name in is_box:
            return [name]
        found: list[str] = []
        for argument in graph.op(name).inputs:
            found += [source for source in sources(argument) if source not in found]
        return found

    edges = [(source, op.name) for op in boxes for argument in op.inputs for source in sources(argument)]
    # the main path: back from the last box, always through the first input (a residual add's first
    # operand is its block's convs in torch's usual `out + shortcut(x)`)
    main, current = set(), boxes[-1].name
    while True:
        main.add(current)
        before = [source for source, target in edges if target == current]
        if not before:
            break
        current = before[0]
    labels = {
        OpKind.INPUT: "input",
        OpKind.MAXPOOL: "pool",
        OpKind.AVGPOOL: "pool",
        OpKind.ADD: "add",
        OpKind.CAT: "cat",
    }
    return Diagram(
        tuple(
            DiagramBox(
                op.name,
                op.name if op.is_layer else labels[op.kind],
                _kind(graph, op.name),
                x,
                0 if op.name in main else 1,
                sum(t.numel() for t in graph.parameters[op.name]) if op.is_layer else 0,
                op.shape[1:],
            )
            for x, op in enumerate(boxes)
        ),
        tuple(dict.fromkeys(edges)),
    )


def layer_rows(graph: ModelGraph, labels: Mapping[str, str] | None = None) -> list[dict[str, object]]:
    """A model card's table: each layer's kind, settings, output shape and parameters, BatchNorm folded;
    with `labels` (an imported file's own name for each layer's node, shortened plain text), that too."""
    rows = []
    for op in graph.layer_ops():
        weight = graph.weight(op.name)
        settings = ""
        if op.kind is OpKind.CONV:
            settings = f"{weight.shape[2]}x{weight.shape[3]}, stride {op.attrs['stride'][0]}"  # type: ignore[index]
            if op.attrs["padding"] != (0, 0):
                settings += f", padding {op.attrs['padding'][0]}"  # type: ignore[index]
            if op.attrs["groups"] != 1:
                settings += f", {op.attrs['groups']} groups"
        rows.append(
            {
                "layer": op.name,
                "kind": _kind(graph, op.name).replace("_", " "),
                "settings": settings,
                "output": "x".join(str(d) for d in op.shape[1:]),
                "parameters": sum(t.numel() for t in graph.parameters[op.name]),
                "BatchNorm folded in": graph.folded_batchnorm.get(op.name, ""),
                **({} if labels is None else {"name in the file": labels.get(op.name, "")}),
            }
        )
    return rows


def stays_float(graph: ModelGraph, float_layers: tuple[str, ...] = (), quantize_input: bool = True) -> list[str]:
    """What is not quantized in this model under these settings, each with its reason."""
    reasons = ["the input's normalization (pixel/255, mean, std): done before the image is quantized"]
    if not quantize_input:
        reasons.append("the input image itself: 'Quantize the network's input' is off in the settings")
    if graph.op(graph.output).kind is OpKind.LOG_SOFTMAX:
        reasons.append(
            "the final log_softmax: the integer engine stops at the int32 logits, whose largest names the class"
        )
    if graph.folded_batchnorm:
        reasons.append(
            f"no BatchNorm at all: {len(graph.folded_batchnorm)} are folded into the convolutions before them "
            "(every path quantizes the folded weights)"
        )
    reasons += [f"{name}: kept in float in the settings (weights and input)" for name in float_layers]
    return reasons
