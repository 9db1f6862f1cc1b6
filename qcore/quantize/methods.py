"""Post-training methods beyond choosing ranges, no retraining (applied in this fixed order):

1. equalization: cross-layer equalization of layer pairs joined by ReLU, max-pool and flatten (Nagel et al. 2019, DFQ):
   output channel i of the first layer is divided by s_i and the matching inputs of the second
   multiplied by it, s_i = sqrt(r1_i / r2_i), so both weight ranges become sqrt(r1_i * r2_i). ReLU and
   max-pool commute with a positive scale, so the float function is unchanged.
2. mixed precision (weight_bits_budget > 0): per-layer weight bits chosen by measured sensitivity
   (KL divergence of the output on the calibration images, one layer quantized at a time) to
   minimise the summed sensitivity under a budget on the parameter-weighted average bits.
3. adaround: learned rounding per layer (Nagel et al. 2020): each weight rounds down or up as a
   rectified-sigmoid variable decides, trained to reconstruct the layer's float output on the
   calibration data with a regulariser that drives each variable to 0 or 1. Kept only where it
   reconstructs better than nearest rounding.
4. block-reconstruction: learned rounding per block (BRECQ, Li et al. 2021, with QDrop's dropping of
   activation quantization, Wei et al. 2022): the layers of a residual block, a depthwise-separable
   pair or a pair of layers learn their roundings together to reproduce the block's float output, its
   activations quantized in the loop (qcore.quantize.reconstruction). Instead of AdaRound, not after it.
5. bias-correction: empirical bias correction (Nagel et al. 2019): layer by layer, the mean
   difference between the float and the quantized layer output on the calibration data, per
   output channel, is added to the bias.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from qcore import cancel, progress
from qcore.graph import ModelGraph, Op, OpKind, batch_size_for, run_float
from qcore.quantize.quant import QParams

# the order they are applied in; adaround and block-reconstruction both learn the rounding: one at a time
METHODS = ("equalization", "adaround", "block-reconstruction", "bias-correction")
ROUNDING_METHODS = ("adaround", "block-reconstruction")
EQUALIZATION_ROUNDS = 10
ADAROUND_ITERATIONS = 1000
PROGRESS_STEPS = 25  # a learning loop reports how far it has got every this many steps
ADAROUND_BATCH = 128
ADAROUND_LR = 1e-2
ADAROUND_REG = 0.01
ZETA, GAMMA = 1.1, -0.1  # rectified sigmoid stretch (AdaRound)
ADAROUND_WARMUP = 0.2  # the first fifth of the steps without the rounding regulariser
MIXED_BITS = (2, 3, 4, 5, 6, 7, 8)


@dataclass
class MethodsReport:
    """What each method changed, for the dashboard and the JSON report."""

    weight_bits: dict[str, int] = field(default_factory=dict)
    equalization: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    sensitivity: dict[str, dict[int, float]] = field(default_factory=dict)
    adaround: dict[str, dict[str, float]] = field(default_factory=dict)
    blocks: dict[str, dict[str, object]] = field(default_factory=dict)  # block reconstruction, per block
    bias_shift: dict[str, list[float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    parameters: dict[str, int] = field(default_factory=dict)  # weights per layer, for the averages

    def to_dict(self) -> dict[str, object]:
        return {
            "weight_bits": self.weight_bits,
            "average_weight_bits": average_bits(self.weight_bits, self.parameters) if self.weight_bits else None,
            "equalization": self.equalization,
            "sensitivity": {name: {str(b): v for b, v in row.items()} for name, row in self.sensitivity.items()},
            "adaround": self.adaround,
            "block_reconstruction": self.blocks,
            "bias_shift": self.bias_shift,
            "seconds": self.seconds,
        }


def parameter_counts(graph: ModelGraph) -> dict[str, int]:
    return {name: graph.weight(name).numel() for name in graph.layers}


def average_bits(bits: dict[str, int], counts: dict[str, int]) -> float:
    """Weight bits averaged over parameters (in the bundled net fc1 holds 93% of them)."""
    return sum(counts[n] * b for n, b in bits.items()) / sum(counts[n] for n in bits)


# --- 1. cross-layer equalization -------------------------------------------------------------


def _output_ranges(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1).abs().max(dim=1).values


def _input_ranges(weight: torch.Tensor, group: int) -> torch.Tensor:
    """Per input channel of the first layer: max |w| over the second layer's matching inputs."""
    columns = weight.transpose(0, 1).reshape(weight.shape[1], -1)  # [in, out * rest]
    per_input = columns.abs().max(dim=1).values
    return per_input.reshape(-1, group).max(dim=1).values


# Between two layers these keep the float function when the first layer's output channels are scaled
# by positive factors: ReLU (max(0, s x) = s max(0, x)), max-pool, average pool and flatten. ReLU6 does
# not (its clip at 6 would move to 6 / s per channel), so equalization crosses it by replacing it with ReLU, as Nagel
# et al. 2019 (section 5) did for MobileNetV2; the report names each one replaced. A tensor something
# else also reads (an add) is never crossed: the other reader would change.
EQUALIZATION_THROUGH = (OpKind.RELU, OpKind.RELU6, OpKind.MAXPOOL, OpKind.AVGPOOL, OpKind.FLATTEN)


def _between(graph: ModelGraph, first: str) -> tuple[list[str], Op | None]:
    """The pass-through ops after layer `first` up to the next op, and that op when it is the only reader
    of what they pass on (None where something else also reads it, or the network ends there)."""
    crossed, name, users = [], first, graph.consumers(first)
    while len(users) == 1 and users[0].kind in EQUALIZATION_THROUGH:
        name, users = users[0].name, graph.consumers(users[0].name)
        crossed.append(name)
    if len(users) != 1 or name == graph.output:
        return crossed, None
    return crossed, users[0]


def equalization_pairs(graph: ModelGraph) -> list[tuple[str, str, int]]:
    """(first layer, second layer, inputs of the second per output channel of the first) for every
    pair of layers joined by ReLU, ReLU6, max-pool and flatten only, with nothing else reading between
    them and the second a plain (groups 1) or depthwise convolution or a linear layer (a depthwise second
    has one input per channel). In the bundled net: conv1->conv2, conv2->fc1 (16 inputs per channel after
    the flatten), fc1->fc2; in a MobileNet block depthwise->pointwise and pointwise->the next depthwise."""
    pairs = []
    for first in graph.layer_ops():
        _, second = _between(graph, first.name)
        if second is None or not second.is_layer:
            continue
        if second.kind is OpKind.CONV and second.attrs["groups"] != 1 and not graph.is_depthwise(second.name):
            continue
        if graph.is_depthwise(second.name):
            pairs.append((first.name, second.name, 1))
            continue
        channels = graph.weight(first.name).shape[0]
        inputs = graph.weight(second.name).shape[1]
        if inputs % channels == 0:
            pairs.append((first.name, second.name, inputs // channels))
    return pairs


def equalize(
    graph: ModelGraph, rounds: int = EQUALIZATION_ROUNDS
) -> tuple[ModelGraph, dict[str, dict[str, list[float]]]]:
    """A copy of `graph` with every equalization pair equalized, and per pair the channel ranges
    of the first layer before and after, and the total scale applied."""
    pairs = equalization_pairs(graph)
    depthwise = {second for _, second, _ in pairs if graph.is_depthwise(second)}
    parameters = {name: (w.detach().clone(), b.detach().clone()) for name, (w, b) in graph.parameters.items()}
    before = {f"{a}->{b}": _output_ranges(parameters[a][0]).tolist() for a, b, _ in pairs}
    totals = {f"{a}->{b}": torch.ones(parameters[a][0].shape[0]) for a, b, _ in pairs}
    with torch.no_grad():
        for _ in range(rounds):
            for first_name, second_name, group in pairs:
                (first_weight, first_bias), second_weight = parameters[first_name], parameters[second_name][0]
                r1 = _output_ranges(first_weight)
                # a depthwise second: its output channel c is the one that reads input channel c
                r2 = _output_ranges(second_weight) if second_name in depthwise else _input_ranges(second_weight, group)
                scale = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2), torch.ones_like(r1))
                shape = [-1] + [1] * (first_weight.ndim - 1)
                first_weight.div_(scale.reshape(shape))
                first_bias.div_(scale)
                expanded = scale.repeat_interleave(group)
                second_shape = [1, -1] + [1] * (second_weight.ndim - 2)
                if second_name in depthwise:  # [C, 1, k, k]: channel c's filter scales (its bias does not)
                    second_shape = [-1] + [1] * (second_weight.ndim - 1)
                second_weight.mul_(expanded.reshape(second_shape))
                totals[f"{first_name}->{second_name}"] *= scale
    report = {
        key: {
            "ranges_before": before[key],
            "ranges_after": _output_ranges(parameters[key.split("->")[0]][0]).tolist(),
            "scales": totals[key].tolist(),
        }
        for key in before
    }
    replaced = []
    for first, second, _ in pairs:
        crossed = [name for name in _between(graph, first)[0] if graph.op(name).kind is OpKind.RELU6]
        report[f"{first}->{second}"]["relu6_replaced_by_relu"] = crossed  # type: ignore[assignment]
        replaced += crossed
    return graph.with_parameters(parameters).with_kinds({name: OpKind.RELU for name in replaced}), report


# --- 2. mixed precision ----------------------------------------------------------------------


@torch.inference_mode()
def sensitivities(
    graph: ModelGraph,
    images: torch.Tensor,
    weight_quantizer: Callable[[torch.Tensor, int], torch.Tensor],
    bits_options: Sequence[int] = MIXED_BITS,
) -> dict[str, dict[int, float]]:
    """KL(float || one layer's weights quantized at b bits) of the output distribution on `images`."""
    # in batches sized to the graph, as evaluation runs: fashion-resnet's 1,024 calibration images in one
    # batch took 0.94 s a pass, 4.9x its 10,000 test images in batches of 128
    step = batch_size_for(graph)

    def run(model_graph: ModelGraph) -> torch.Tensor:
        return torch.cat(
            [run_float(model_graph, images[start : start + step]) for start in range(0, len(images), step)]
        )

    reference = run(graph)
    result: dict[str, dict[int, float]] = {}
    for name in graph.layers:
        result[name] = {}
        for bits in bits_options:
            cancel.checkpoint()
            parameters = dict(graph.parameters)
            parameters[name] = (weight_quantizer(graph.weight(name), bits), graph.bias(name))
            output = run(graph.with_parameters(parameters))
            result[name][bits] = float(F.kl_div(output, reference, log_target=True, reduction="batchmean"))
    return result


EXHAUSTIVE_LAYERS = 6  # 7^6 = 117,649 allocations; beyond that the greedy descent below


def choose_bits(sensitivity: dict[str, dict[int, float]], budget: float, counts: dict[str, int]) -> dict[str, int]:
    """The per-layer bits with the least summed sensitivity whose parameter-weighted average is
    within `budget`: every allocation is tried for up to EXHAUSTIVE_LAYERS layers (ties go to fewer
    bits); for more, from the most bits everywhere, the step down that costs the least sensitivity per
    bit saved is taken until the budget holds."""
    names = list(sensitivity)
    total = sum(counts[n] for n in names)
    smallest = min(min(row) for row in sensitivity.values())
    if budget + 1e-9 < smallest:
        raise ValueError(f"weight bits budget {budget} is below the smallest allocation ({smallest} bits everywhere)")
    if len(names) > EXHAUSTIVE_LAYERS:
        bits = {n: max(sensitivity[n]) for n in names}
        while sum(counts[n] * b for n, b in bits.items()) / total > budget + 1e-9:
            steps = []
            for n in names:
                lower = [b for b in sensitivity[n] if b < bits[n]]
                if lower:
                    b = max(lower)
                    extra = sensitivity[n][b] - sensitivity[n][bits[n]]
                    steps.append((extra / (counts[n] * (bits[n] - b)), n, b))
            _, n, b = min(steps)
            bits[n] = b
        return bits
    best: tuple[float, float, dict[str, int]] | None = None
    options = [sorted(sensitivity[name]) for name in names]
    for combo in itertools.product(*options):
        bits = dict(zip(names, combo, strict=True))
        average = sum(counts[n] * b for n, b in bits.items()) / total
        if average > budget + 1e-9:
            continue
        cost = sum(sensitivity[n][b] for n, b in bits.items())
        if best is None or (cost, average) < best[:2]:
            best = (cost, average, bits)
    assert best is not None  # the smallest allocation fits the budget
    return best[2]


# --- 3. AdaRound -----------------------------------------------------------------------------


def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _layer_apply(weight: torch.Tensor, x: torch.Tensor, layer: Op | None = None) -> torch.Tensor:
    """The layer without its bias (a conv with its stride, padding and groups)."""
    if weight.ndim == 2:
        return F.linear(x, weight)
    if layer is None:
        return F.conv2d(x, weight)
    return F.conv2d(x, weight, None, layer.attrs["stride"], layer.attrs["padding"], 1, layer.attrs["groups"])  # type: ignore[arg-type]


def reconstruction_error(
    weight: torch.Tensor, weight_hat: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor, layer: Op | None = None
) -> float:
    """AdaRound's objective: mean over samples of || W x - W_hat x_hat ||^2."""
    with torch.no_grad():
        difference = _layer_apply(weight, x, layer) - _layer_apply(weight_hat, x_hat, layer)
        return float(difference.pow(2).flatten(1).sum(dim=1).mean())


class SoftRounding:
    """One layer's weights on the grid of `qparams`, each rounded down or up as a learned variable `v`
    decides through a rectified sigmoid, starting where nearest rounding is (AdaRound; block
    reconstruction learns several at once)."""

    def __init__(self, weight: torch.Tensor, qparams: QParams) -> None:
        self.scale, self.zero = qparams.scale_for(weight), qparams.zero_point_for(weight)
        scaled = weight / self.scale
        self.floor = torch.floor(scaled)
        rest = torch.clamp(scaled - self.floor, 0.01, 0.99)  # start where nearest rounding is, inside (0, 1)
        self.v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_(True)
        self.lo, self.hi = qparams.qmin - self.zero, qparams.qmax - self.zero
        self.nearest = (torch.clamp(torch.round(scaled), self.lo, self.hi) + self.zero).to(torch.int32)

    def weight(self) -> torch.Tensor:
        """The soft-rounded weights (differentiable in `v`)."""
        return self.scale * torch.clamp(self.floor + _rectified_sigmoid(self.v), self.lo, self.hi)

    def regularizer(self, beta: float) -> torch.Tensor:
        """Drives each variable to 0 or 1."""
        return (1 - (2 * _rectified_sigmoid(self.v) - 1).abs().pow(beta)).sum()

    def integers(self) -> torch.Tensor:
        """The learned rounding as integer weights."""
        with torch.no_grad():
            rounded = torch.clamp(self.floor + (self.v >= 0).to(self.floor.dtype), self.lo, self.hi)
            return (rounded + self.zero).to(torch.int32)


def rounding_regularizer_beta(step: int, iterations: int) -> float | None:
    """AdaRound's schedule: no regulariser for the first ADAROUND_WARMUP of the steps, then its beta
    annealed from 20 to 2 (None: not yet)."""
    progress = step / iterations
    if progress < ADAROUND_WARMUP:
        return None
    return 20.0 + (2.0 - 20.0) * (progress - ADAROUND_WARMUP) / (1 - ADAROUND_WARMUP)


def adaround(
    weight: torch.Tensor,
    qparams: QParams,
    x: torch.Tensor,
    x_hat: torch.Tensor,
    iterations: int = ADAROUND_ITERATIONS,
    seed: int = 0,
    layer: Op | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Learned rounding of `weight` on the grid of `qparams`, reconstructing W x from W_hat x_hat.
    Returns integer weights and what it did; nearest rounding is returned if it reconstructs better."""
    generator = torch.Generator().manual_seed(seed)
    rounding = SoftRounding(weight, qparams)
    optimizer = torch.optim.Adam([rounding.v], lr=ADAROUND_LR)
    with torch.no_grad():
        target = _layer_apply(weight, x, layer)
    for step in range(iterations):
        cancel.checkpoint()  # per step: abandoned work stops here
        if step % PROGRESS_STEPS == 0:
            progress.report(step / iterations)
        batch = torch.randint(0, len(x), (min(ADAROUND_BATCH, len(x)),), generator=generator)
        output = _layer_apply(rounding.weight(), x_hat[batch], layer)
        loss = (output - target[batch]).pow(2).flatten(1).sum(dim=1).mean()
        beta = rounding_regularizer_beta(step, iterations)
        if beta is not None:
            loss = loss + ADAROUND_REG * rounding.regularizer(beta)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    learned, nearest = rounding.integers(), rounding.nearest
    scale, zero = rounding.scale, rounding.zero
    error_learned = reconstruction_error(weight, scale * (learned - zero), x, x_hat, layer)
    error_nearest = reconstruction_error(weight, scale * (nearest - zero), x, x_hat, layer)
    kept = error_learned <= error_nearest
    chosen = learned if kept else nearest
    return chosen, {
        "flipped": int((chosen != nearest).sum()),
        "flipped_fraction": float((chosen != nearest).float().mean()),
        "objective_nearest": error_nearest,
        "objective_adaround": min(error_learned, error_nearest),
        "kept": float(kept),
    }


# --- 4. empirical bias correction -------------------------------------------------------------


def channel_means(y: torch.Tensor) -> torch.Tensor:
    """Mean over samples (and positions, for conv outputs) per output channel."""
    return y.transpose(0, 1).reshape(y.shape[1], -1).mean(dim=1)


@contextmanager
def timed(report: MethodsReport, key: str) -> Iterator[None]:
    """Adds the seconds spent inside the block to report.seconds[key]."""
    started = time.perf_counter()
    try:
        yield
    finally:
        report.seconds[key] = report.seconds.get(key, 0.0) + time.perf_counter() - started
