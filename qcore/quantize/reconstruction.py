"""Block reconstruction: learned rounding for a whole block at once (BRECQ, Li et al. 2021), with QDrop's
random dropping of activation quantization while it learns (Wei et al. 2022).

AdaRound (qcore.quantize.methods) learns each layer's rounding to reproduce that layer's float output.
Here the layers of a block (a residual block, a depthwise-separable pair, a pair of layers: the blocks
qcore.graph.blocks finds) learn their roundings together to reproduce the block's float output, with
the block's own activations quantized in the loop, so a layer's rounding can make up for the next
layer's and for the rounding of the activations between them. Blocks are learned in order, each from
the input the quantized blocks before it really give.

QDrop: during learning, each quantized activation inside the block keeps its float value with
probability DROP_PROBABILITY (elementwise), and the block's input is the quantized model's or the float
model's, elementwise at random; Wei et al. found that this flatter objective generalizes from the
calibration images to the test set better at 2 to 4 bits. Rounding and clipping of activations pass
gradients straight through (inside the range) so the first layer of a block learns through the second.

By default only weight integers change (the activation ranges stay the calibrated ones); asked for,
the scales of the activations inside each block are learned too (QDrop's LSQ step sizes). Either way
the result is integers and grids, so the integer engine runs it unchanged. A block keeps nearest
rounding (and its calibrated scales) where what it learned reconstructs its output worse on the
calibration images.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from qcore import cancel, progress
from qcore.graph import GraphRun, ModelGraph, Op, batch_size_for
from qcore.graph.blocks import Block, reconstruction_blocks
from qcore.graph.ops import activation
from qcore.quantize.methods import (
    ADAROUND_LR,
    ADAROUND_REG,
    PROGRESS_STEPS,
    SoftRounding,
    rounding_regularizer_beta,
)


class QuantizedNet(Protocol):
    """What this method needs of qcore.quantize.qmodel.QuantizedNet (which applies it, so it is not imported)."""

    graph: ModelGraph
    layers: dict[str, Any]  # name -> LayerQuant
    points: dict[str, Any]  # name -> QuantPoint
    plan: Any  # QuantPlan

    def simulation(self) -> GraphRun: ...

    def point_quantized_after(self, op_name: str) -> str | None: ...

    def with_point_scales(self, scales: dict[str, torch.Tensor]) -> QuantizedNet: ...

    def with_layers(self, layers: dict[str, Any]) -> QuantizedNet: ...


BLOCK_ITERATIONS = 1000  # Adam steps per block
BLOCK_BATCH = 32  # BRECQ's; here 3.7x faster a step than 64 (a residual block's maps stay in cache)
DROP_PROBABILITY = 0.5  # QDrop's: each activation keeps its float value with this probability
SCALE_LR = 1e-3  # an activation scale's Adam step, as a fraction of its calibrated value


@dataclass(frozen=True)
class ReconstructionSettings:
    """How long and how each block learns; the config's seed decides the batches and QDrop's drops."""

    iterations: int = BLOCK_ITERATIONS
    batch: int = BLOCK_BATCH
    drop_probability: float = DROP_PROBABILITY
    # QDrop's LSQ step sizes for the activations inside each block: measured here at W4A4 they moved
    # test accuracy by at most 0.3 point either way (fashion-resnet 91.50% without, 91.17% with;
    # fashion-mobilenet 90.38% and 90.34%) for 1.2 to 3x the time, so they are off unless asked for
    learn_activation_scales: bool = False

    def problems(self) -> list[str]:
        found = []
        if not 1 <= self.iterations <= 100_000:
            found.append(f"iterations must be between 1 and 100000 (got {self.iterations})")
        if not 1 <= self.batch <= 4096:
            found.append(f"batch must be between 1 and 4096 (got {self.batch})")
        if not 0.0 <= self.drop_probability < 1.0:
            found.append(f"drop probability must be at least 0 and below 1 (got {self.drop_probability})")
        return found


class _LearningRun(GraphRun):
    """The simulation with soft-rounded weights for the block's layers, rounding that passes gradients
    straight through, and QDrop's dropping of activation quantization. Each hook computes the
    simulation's own value (`exact`) and lets the gradient of the float value through it."""

    def __init__(
        self,
        qnet: QuantizedNet,
        soft: dict[str, SoftRounding],
        scales: dict[str, torch.Tensor],
        drop: float,
        generator: torch.Generator,
    ) -> None:
        super().__init__(qnet.graph)
        self.qnet, self.exact, self.soft, self.scales = qnet, qnet.simulation(), soft, scales
        self.drop, self.generator = drop, generator
        self.pool = torch.empty(0)

    def weight(self, op: Op) -> torch.Tensor:
        rounding = self.soft.get(op.name)
        return self.exact.weight(op) if rounding is None else rounding.weight()

    def bias(self, op: Op) -> torch.Tensor:
        return self.exact.bias(op)

    def _random(self, like: torch.Tensor) -> torch.Tensor:
        """Uniform [0, 1) values shaped like `like`: a slice of a pool drawn once, at a random offset.
        Drawing them anew took 3 to 5 ms per activation map here, more than the block's convolutions."""
        count = like.numel()
        if count > len(self.pool):
            self.pool = torch.rand(2 * count, generator=self.generator)
        offset = int(torch.randint(0, len(self.pool) - count + 1, (1,), generator=self.generator))
        values = self.pool[offset : offset + count]
        if like.ndim == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
            n, c, h, w = like.shape  # in the layout of the map (conv outputs are channels-last): where() is 5x faster
            return values.view(n, h, w, c).permute(0, 3, 1, 2)
        return values.view(like.shape)

    def _quantized(self, x: torch.Tensor, exact: torch.Tensor, detached: torch.Tensor) -> torch.Tensor:
        """`exact` with the gradient of `x`; with QDrop, `x` itself at random. A hook that left its input as
        it was (nothing quantized there) returns `x`."""
        if exact is detached:
            return x
        value = x + (exact - detached)
        if self.drop > 0:
            value = torch.where(self._random(value) < self.drop, x, value)
        return value

    def _learned(self, x: torch.Tensor, point: str) -> torch.Tensor:
        """`x` on `point`'s grid at its learned scale (zero point kept): rounding passes the gradient
        straight through, clipping stops it, and the scale gets LSQ's gradient (Esser et al. 2019)."""
        qparams, scale = self.qnet.points[point].qparams, self.scales[point]
        zero = float(qparams.zero_point)
        levels = x / scale
        levels = levels + (torch.round(levels) - levels).detach()
        value = torch.clamp(levels, qparams.qmin - zero, qparams.qmax - zero) * scale
        if self.drop > 0:
            value = torch.where(self._random(value) < self.drop, x, value)
        return value

    def layer_input(self, op: Op, x: torch.Tensor) -> torch.Tensor:
        point = self.qnet.plan.layer_input.get(op.name)
        if point in self.scales and self.qnet.layers[op.name].weight_qparams is not None:
            return self._learned(x, point)
        detached = x.detach()
        return self._quantized(x, self.exact.layer_input(op, detached), detached)

    def after(self, op: Op, value: torch.Tensor) -> torch.Tensor:
        point = self.qnet.point_quantized_after(op.name)
        if point in self.scales:
            return self._learned(value, point)
        detached = value.detach()
        return self._quantized(value, self.exact.after(op, detached), detached)

    def cat_input(self, op: Op, value: torch.Tensor) -> torch.Tensor:
        detached = value.detach()
        return self._quantized(value, self.exact.cat_input(op, detached), detached)

    def avg_pool(self, op: Op, x: torch.Tensor) -> torch.Tensor:
        smooth = F.avg_pool2d(x, op.attrs["kernel"], op.attrs["stride"])  # type: ignore[arg-type]
        return smooth + (self.exact.avg_pool(op, x.detach()) - smooth.detach())

    def lookup(self, op: Op, x: torch.Tensor) -> torch.Tensor:
        smooth = activation(str(op.attrs["function"]), op.attrs["parameter"], x)  # type: ignore[arg-type]
        return smooth + (self.exact.lookup(op, x.detach()) - smooth.detach())


def _squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over samples of the summed squared difference (AdaRound's objective, for a block's output)."""
    return (output - target).pow(2).flatten(1).sum(dim=1).mean()


@torch.no_grad()
def _through(run: GraphRun, block: Block, x: torch.Tensor, step: int) -> torch.Tensor:
    """The block's output for every sample of `x` (the value its `end` op passes on), in batches."""
    parts = [run.run_between(block.start, x[i : i + step], block.end) for i in range(0, len(x), step)]
    return torch.cat(parts)


def _next_input(simulation: GraphRun, block: Block, x_quantized: torch.Tensor, step: int) -> torch.Tensor:
    """What the quantized model hands the next block: the block's output, then its `end` op's `after`."""
    output = _through(simulation, block, x_quantized, step)
    with torch.no_grad():
        return simulation.after(simulation.graph.op(block.end), output)


def block_error(qnet: QuantizedNet, block: Block, x_quantized: torch.Tensor, target: torch.Tensor) -> float:
    """The block's reconstruction error: mean over samples of || float output - quantized output ||^2,
    the quantized block (as `qnet` decides it) fed `x_quantized`."""
    output = _through(qnet.simulation(), block, x_quantized, batch_size_for(qnet.graph))
    return float(_squared_error(output, target))


def block_inputs(qnet: QuantizedNet, images: torch.Tensor) -> list[tuple[Block, torch.Tensor, torch.Tensor]]:
    """Each block with its quantized input (from `qnet`'s blocks before it) and its float output."""
    step = batch_size_for(qnet.graph)
    simulation, float_run = qnet.simulation(), GraphRun(qnet.graph)
    with torch.no_grad():
        x_quantized = simulation.after(qnet.graph.ops[0], images.clone())
    x_float = images
    found = []
    for block in reconstruction_blocks(qnet.graph):
        target = _through(float_run, block, x_float, step)
        found.append((block, x_quantized, target))
        x_quantized = _next_input(simulation, block, x_quantized, step)
        x_float = target
    return found


def block_errors(qnet: QuantizedNet, images: torch.Tensor) -> dict[str, float]:
    """Every block's reconstruction error under `qnet`'s decisions, each fed what `qnet` itself gives it."""
    return {block.name: block_error(qnet, block, x, target) for block, x, target in block_inputs(qnet, images)}


def learned_points(qnet: QuantizedNet, block: Block) -> list[str]:
    """The points the block puts values on inside itself, whose scales it learns: its layers' inputs and
    the values quantized where they are made strictly inside it, when nothing outside the block reads
    them. A point applied to the block's input (quantized after `start`) belongs to the block before."""
    names = [op.name for op in qnet.graph.ops]
    inside = names[names.index(block.start) + 1 : names.index(block.end)]
    within = {*inside, block.end}
    found = [
        qnet.plan.layer_input.get(layer) for layer in block.layers if qnet.layers[layer].weight_qparams is not None
    ]
    found += [qnet.point_quantized_after(name) for name in inside]

    def read_only_within(point: str) -> bool:
        on_grid = [op for op in qnet.graph.ops if qnet.plan.grid.get(op.name) == point]
        return all(user.name in within for op in on_grid for user in qnet.graph.consumers(op.name))

    before = qnet.point_quantized_after(block.start)
    return [p for p in dict.fromkeys(found) if p is not None and p != before and read_only_within(p)]


def _learn_block(
    qnet: QuantizedNet,
    block: Block,
    x_quantized: torch.Tensor,
    x_float: torch.Tensor,
    target: torch.Tensor,
    settings: ReconstructionSettings,
    generator: torch.Generator,
) -> tuple[dict[str, SoftRounding], dict[str, torch.Tensor]]:
    soft = {
        name: SoftRounding(qnet.layers[name].weight, qnet.layers[name].weight_qparams)
        for name in block.layers
        if qnet.layers[name].weight_qparams is not None
    }
    scales = {
        point: qnet.points[point].qparams.scale.detach().clone().requires_grad_(True)
        for point in (learned_points(qnet, block) if settings.learn_activation_scales else [])
    }
    run = _LearningRun(qnet, soft, scales, settings.drop_probability, generator)
    groups: list[dict[str, Any]] = [{"params": [rounding.v for rounding in soft.values()], "lr": ADAROUND_LR}]
    # each scale moves in steps of a fixed fraction of its calibrated value, whatever its magnitude
    groups += [{"params": [scale], "lr": SCALE_LR * float(scale.detach())} for scale in scales.values()]
    optimizer = torch.optim.Adam(groups)
    for step in range(settings.iterations):
        cancel.checkpoint()  # per step: abandoned work stops here
        if step % PROGRESS_STEPS == 0:
            progress.report(step / settings.iterations)
        batch = torch.randint(0, len(x_quantized), (min(settings.batch, len(x_quantized)),), generator=generator)
        x = x_quantized[batch]
        if settings.drop_probability > 0:  # QDrop: the block's input mixes the quantized and float models'
            from_float = run._random(x) < settings.drop_probability
            x = torch.where(from_float, x_float[batch], x)
        loss = _squared_error(run.run_between(block.start, x, block.end), target[batch])
        beta = rounding_regularizer_beta(step, settings.iterations)  # AdaRound's schedule
        if beta is not None:
            loss = loss + ADAROUND_REG * sum(rounding.regularizer(beta) for rounding in soft.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for scale in scales.values():
                scale.clamp_(min=1e-8)
    return soft, {point: scale.detach().clone() for point, scale in scales.items()}


@dataclass
class Reconstruction:
    """What block reconstruction learned: integer weights per layer, a scale per activation point it
    learned, and per block what it did (for the Methods page and the JSON report)."""

    weights: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor]
    report: dict[str, dict[str, object]]


def reconstruct_blocks(
    qnet: QuantizedNet, images: torch.Tensor, settings: ReconstructionSettings | None = None, seed: int = 0
) -> Reconstruction:
    """Learn every block's rounding (and its activation scales) in order on `images` (calibration
    images), each block from what the blocks learned before it give. A block keeps nearest rounding
    and its calibrated scales where what it learned reconstructs its output worse. `qnet` is not changed."""
    settings = settings or ReconstructionSettings()
    problems = settings.problems()
    if problems:
        raise ValueError("block reconstruction: " + "; ".join(problems))
    generator = torch.Generator().manual_seed(seed)
    step = batch_size_for(qnet.graph)
    float_run = GraphRun(qnet.graph)
    layers = {name: replace(quant) for name, quant in qnet.layers.items()}
    current = qnet.with_layers(layers)
    with torch.no_grad():
        x_quantized = current.simulation().after(qnet.graph.ops[0], images.clone())
    x_float = images
    result = Reconstruction({}, {}, {})
    blocks = reconstruction_blocks(qnet.graph)
    for index, block in enumerate(blocks):
        target = _through(float_run, block, x_float, step)
        what = f"block reconstruction, block {index + 1} of {len(blocks)}"
        with progress.part(index, len(blocks), what):
            soft, scales = _learn_block(current, block, x_quantized, x_float, target, settings, generator)
        nearest = {name: rounding.nearest for name, rounding in soft.items()}
        for name, integers in nearest.items():
            layers[name].weight_int = integers
        error_nearest = block_error(current.with_layers(layers), block, x_quantized, target)
        for name, rounding in soft.items():
            layers[name].weight_int = rounding.integers()
        candidate = current.with_layers(layers).with_point_scales(scales)
        error_learned = block_error(candidate, block, x_quantized, target)
        kept = error_learned <= error_nearest
        if kept:
            current = candidate
            layers = current.layers
            result.scales.update(scales)
        else:
            for name, integers in nearest.items():
                layers[name].weight_int = integers
            current = current.with_layers(layers)
        chosen = {name: layers[name].weight_int for name in soft}
        result.weights.update(chosen)
        flipped = sum(int((chosen[n] != nearest[n]).sum()) for n in chosen)
        total = sum(chosen[n].numel() for n in chosen)
        result.report[block.name] = {
            "kind": block.kind,
            "layers": list(block.layers),
            "objective_nearest": error_nearest,
            "objective_reconstructed": min(error_learned, error_nearest),
            "kept": kept,
            "flipped_fraction": flipped / total if total else 0.0,
            "scales_learned": sorted(scales) if kept else [],
        }
        x_quantized = _next_input(current.simulation(), block, x_quantized, step)
        x_float = target
    return result
