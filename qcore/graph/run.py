"""The one float forward pass over a model graph. The simulation, calibration, QAT and the layer
captures are this walk with different hooks (which weights, what happens to a value after an op),
so no path writes the order of operations again."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from qcore.graph.ops import ModelGraph, Op, OpKind, activation, max_pool, normalization

# A batch whose ops write about this many values in all (64 MB of float32) stays mostly in the CPU's
# caches: on this project's 2-core machine the simulation of fashion-resnet ran 2.3x faster in batches
# of 128 than of 1,000, mnist-net's 1.7x in batches of 500 (see batch_size_for).
BATCH_VALUES = 2**24
DEFAULT_BATCH = 256  # for a model without a graph, whose working set is unknown


def batch_size_for(graph: ModelGraph | None, values: int = BATCH_VALUES) -> int:
    """The power of two (32 to 1,024) nearest to `values` / the values one image writes in `graph`.
    An image's arithmetic is its own whatever the batch: test_zoo compares every zoo model's predictions
    with those recorded in batches of 1,000 (the integer engine's, of 500)."""
    if graph is None:
        return DEFAULT_BATCH
    per_image = max(1, graph.values_per_image())
    return 2 ** min(10, max(5, round(math.log2(values / per_image))))


class GraphRun:
    """Runs a graph in float. Subclasses change what the hooks do; the defaults give the float model."""

    def __init__(self, graph: ModelGraph) -> None:
        self.graph = graph

    # --- hooks -----------------------------------------------------------------------------------
    def weight(self, op: Op) -> torch.Tensor:
        return self.graph.weight(op.name)

    def bias(self, op: Op) -> torch.Tensor:
        return self.graph.bias(op.name)

    def layer_input(self, op: Op, x: torch.Tensor) -> torch.Tensor:
        """The tensor a layer computes on (the simulation keeps it as given; a capture records it)."""
        return x

    def layer_output(self, op: Op, y: torch.Tensor) -> None:
        """A layer's output before anything after it (a capture records it)."""

    def after(self, op: Op, value: torch.Tensor) -> torch.Tensor:
        """Each op's output on its way to the ops that read it (the simulation fake-quantizes here)."""
        return value

    def cat_input(self, op: Op, value: torch.Tensor) -> torch.Tensor:
        """One input of a channel cat, before the cat (the simulation moves it to the cat's grid)."""
        return value

    def avg_pool(self, op: Op, x: torch.Tensor) -> torch.Tensor:
        kernel, stride = op.attrs["kernel"], op.attrs["stride"]
        return F.avg_pool2d(x, kernel, stride)  # type: ignore[arg-type]

    def lookup(self, op: Op, x: torch.Tensor) -> torch.Tensor:
        """An activation other than ReLU (the simulation reads it from its table on the integers)."""
        return activation(str(op.attrs["function"]), op.attrs["parameter"], x)  # type: ignore[arg-type]

    # --- the walk --------------------------------------------------------------------------------
    def compute(self, op: Op, args: list[torch.Tensor]) -> torch.Tensor:
        kind = op.kind
        if kind is OpKind.CONV:
            x = self.layer_input(op, args[0])
            y = F.conv2d(
                x,
                self.weight(op),
                self.bias(op),
                op.attrs["stride"],  # type: ignore[arg-type]
                op.attrs["padding"],  # type: ignore[arg-type]
                1,
                op.attrs["groups"],  # type: ignore[arg-type]
            )
            self.layer_output(op, y)
            return y
        if kind is OpKind.LINEAR:
            y = F.linear(self.layer_input(op, args[0]), self.weight(op), self.bias(op))
            self.layer_output(op, y)
            return y
        if kind is OpKind.RELU:
            return F.relu(args[0])
        if kind is OpKind.RELU6:
            return F.hardtanh(args[0], 0.0, 6.0)
        if kind is OpKind.MAXPOOL:
            return max_pool(args[0], op.attrs["kernel"], op.attrs["stride"], op.attrs["padding"])  # type: ignore[arg-type]
        if kind is OpKind.AVGPOOL:
            return self.avg_pool(op, args[0])
        if kind is OpKind.FLATTEN:
            return args[0].flatten(1)
        if kind is OpKind.ADD:
            return args[0] + args[1]
        if kind is OpKind.CAT:
            return torch.cat([self.cat_input(op, value) for value in args], dim=1)
        if kind is OpKind.LOG_SOFTMAX:
            return F.log_softmax(args[0], dim=1)
        if kind is OpKind.LOOKUP:
            return self.lookup(op, args[0])
        if kind is OpKind.NORMALIZE:
            a = op.attrs
            return normalization(args[0], a["axes"], a["eps"], a["weight"], a["bias"])  # type: ignore[arg-type]
        raise AssertionError(f"no float rule for {kind}")

    def _step(self, index: int, op: Op, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Op `index`'s value (before `after`), dropping the values nothing after it reads."""
        value = self.compute(op, [values[name] for name in op.inputs])
        for name in self.graph.freed_after(index):
            del values[name]
        return value

    def run(self, x: torch.Tensor, log_probs: bool = True) -> torch.Tensor:
        """The graph's output for `x`; with `log_probs`, as log-probabilities (log_softmax is added
        when the model ends without one, so every model the lab holds returns the same thing)."""
        values: dict[str, torch.Tensor] = {}
        for index, op in enumerate(self.graph.ops):
            value = x if op.kind is OpKind.INPUT else self._step(index, op, values)
            values[op.name] = self.after(op, value)
        out = values[self.graph.output]
        if log_probs and self.graph.op(self.graph.output).kind is not OpKind.LOG_SOFTMAX:
            out = F.log_softmax(out, dim=1)
        return out

    def run_between(self, start: str, x: torch.Tensor, end: str) -> torch.Tensor:
        """Op `end`'s value (before `after` is applied to it) when op `start`'s value (after it) is `x`:
        the ops after `start` up to `end`, in order. `start` must be the only value anything after it
        reads (a block's entry: qcore.graph.blocks)."""
        names = [op.name for op in self.graph.ops]
        first, last = names.index(start), names.index(end)
        values = {start: x}
        for index in range(first + 1, last + 1):
            op = self.graph.ops[index]
            value = self._step(index, op, values)
            if index == last:
                return value
            values[op.name] = self.after(op, value)
        raise ValueError(f"{end} does not come after {start}")


def run_float(graph: ModelGraph, x: torch.Tensor) -> torch.Tensor:
    """The float model: log-probabilities for `x`."""
    return GraphRun(graph).run(x)


class _Capture(GraphRun):
    def __init__(self, graph: ModelGraph, keep: Callable[[str, torch.Tensor], None], what: str) -> None:
        super().__init__(graph)
        self._keep, self._what = keep, what

    def layer_input(self, op: Op, x: torch.Tensor) -> torch.Tensor:
        if self._what == "input":
            self._keep(op.name, x)
        return x

    def layer_output(self, op: Op, y: torch.Tensor) -> None:
        if self._what == "output":
            self._keep(op.name, y)


@torch.inference_mode()
def capture(graph: ModelGraph, images: torch.Tensor, what: str) -> dict[str, torch.Tensor]:
    """Every layer's input, or its output (before anything after it), for `images`, in float."""
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str, tensor: torch.Tensor) -> None:
        captured[name] = tensor.detach().clone()

    _Capture(graph, keep, what).run(images)
    return captured


@torch.inference_mode()
def visit_layers(
    graph: ModelGraph, images: torch.Tensor, what: str, visit: Callable[[str, torch.Tensor], None]
) -> None:
    """`visit(layer, tensor)` with every layer's input, or its output, for `images`, in float, as it is
    computed: what `capture` gives, without holding every layer's at once (read it, never keep it)."""
    _Capture(graph, visit, what).run(images)
