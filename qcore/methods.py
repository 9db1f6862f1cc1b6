"""Post-training methods beyond choosing ranges, no retraining (applied in this fixed order):

1. equalization: cross-layer equalization of ReLU-connected pairs (Nagel et al. 2019, DFQ):
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
4. bias-correction: empirical bias correction (Nagel et al. 2019): layer by layer, the mean
   difference between the float and the quantized layer output on the calibration data, per
   output channel, is added to the bias.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from qcore import cancel
from qcore.model import LAYER_NAMES, Net, layer
from qcore.quant import QParams

METHODS = ("equalization", "adaround", "bias-correction")  # the order they are applied in
EQUALIZATION_ROUNDS = 10
ADAROUND_ITERATIONS = 1000
ADAROUND_BATCH = 128
ADAROUND_LR = 1e-2
ADAROUND_REG = 0.01
ZETA, GAMMA = 1.1, -0.1  # rectified sigmoid stretch (AdaRound)
MIXED_BITS = (2, 3, 4, 5, 6, 7, 8)

# (first layer, second layer, how many inputs of the second belong to one channel of the first)
EQUALIZATION_PAIRS = (("conv1", "conv2", 1), ("conv2", "fc1", 16), ("fc1", "fc2", 1))


@dataclass
class MethodsReport:
    """What each method changed, for the dashboard and the JSON report."""

    weight_bits: dict[str, int] = field(default_factory=dict)
    equalization: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    sensitivity: dict[str, dict[int, float]] = field(default_factory=dict)
    adaround: dict[str, dict[str, float]] = field(default_factory=dict)
    bias_shift: dict[str, list[float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "weight_bits": self.weight_bits,
            "average_weight_bits": average_bits(self.weight_bits) if self.weight_bits else None,
            "equalization": self.equalization,
            "sensitivity": {name: {str(b): v for b, v in row.items()} for name, row in self.sensitivity.items()},
            "adaround": self.adaround,
            "bias_shift": self.bias_shift,
            "seconds": self.seconds,
        }


def parameter_counts() -> dict[str, int]:
    model = Net()
    return {name: layer(model, name).weight.numel() for name in LAYER_NAMES}


def average_bits(bits: dict[str, int]) -> float:
    """Weight bits averaged over parameters (fc1 holds 93% of them)."""
    counts = parameter_counts()
    return sum(counts[n] * b for n, b in bits.items()) / sum(counts[n] for n in bits)


# --- 1. cross-layer equalization -------------------------------------------------------------


def _output_ranges(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1).abs().max(dim=1).values


def _input_ranges(weight: torch.Tensor, group: int) -> torch.Tensor:
    """Per input channel of the first layer: max |w| over the second layer's matching inputs."""
    columns = weight.transpose(0, 1).reshape(weight.shape[1], -1)  # [in, out * rest]
    per_input = columns.abs().max(dim=1).values
    return per_input.reshape(-1, group).max(dim=1).values


def equalize(model: Net, rounds: int = EQUALIZATION_ROUNDS) -> tuple[Net, dict[str, dict[str, list[float]]]]:
    """A copy of `model` with every ReLU-connected pair equalized, and per pair the channel ranges
    of the first layer before and after, and the total scale applied."""
    model = copy.deepcopy(model)
    before = {f"{a}->{b}": _output_ranges(layer(model, a).weight.detach()).tolist() for a, b, _ in EQUALIZATION_PAIRS}
    totals = {f"{a}->{b}": torch.ones(layer(model, a).weight.shape[0]) for a, b, _ in EQUALIZATION_PAIRS}
    with torch.no_grad():
        for _ in range(rounds):
            for first_name, second_name, group in EQUALIZATION_PAIRS:
                first, second = layer(model, first_name), layer(model, second_name)
                r1 = _output_ranges(first.weight)
                r2 = _input_ranges(second.weight, group)
                scale = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2), torch.ones_like(r1))
                shape = [-1] + [1] * (first.weight.ndim - 1)
                first.weight.div_(scale.reshape(shape))
                first.bias.div_(scale)
                expanded = scale.repeat_interleave(group)
                second_shape = [1, -1] + [1] * (second.weight.ndim - 2)
                second.weight.mul_(expanded.reshape(second_shape))
                totals[f"{first_name}->{second_name}"] *= scale
    report = {
        key: {
            "ranges_before": before[key],
            "ranges_after": _output_ranges(layer(model, key.split("->")[0]).weight.detach()).tolist(),
            "scales": totals[key].tolist(),
        }
        for key in before
    }
    return model, report


# --- 2. mixed precision ----------------------------------------------------------------------


@torch.inference_mode()
def sensitivities(
    model: Net,
    images: torch.Tensor,
    weight_quantizer: Callable[[torch.Tensor, int], torch.Tensor],
    bits_options: Sequence[int] = MIXED_BITS,
) -> dict[str, dict[int, float]]:
    """KL(float || one layer's weights quantized at b bits) of the output distribution on `images`."""
    reference = model(images)
    result: dict[str, dict[int, float]] = {}
    for name in LAYER_NAMES:
        result[name] = {}
        for bits in bits_options:
            trial = copy.deepcopy(model)
            target = layer(trial, name)
            target.weight.copy_(weight_quantizer(target.weight, bits))
            output = trial(images)
            result[name][bits] = float(F.kl_div(output, reference, log_target=True, reduction="batchmean"))
    return result


def choose_bits(sensitivity: dict[str, dict[int, float]], budget: float) -> dict[str, int]:
    """The per-layer bits with the least summed sensitivity whose average is within `budget`
    (all 7^4 allocations are tried; ties go to fewer bits)."""
    counts = parameter_counts()
    total = sum(counts.values())
    best: tuple[float, float, dict[str, int]] | None = None
    options = [sorted(sensitivity[name]) for name in LAYER_NAMES]
    for combo in itertools.product(*options):
        bits = dict(zip(LAYER_NAMES, combo, strict=True))
        average = sum(counts[n] * b for n, b in bits.items()) / total
        if average > budget + 1e-9:
            continue
        cost = sum(sensitivity[n][b] for n, b in bits.items())
        if best is None or (cost, average) < best[:2]:
            best = (cost, average, bits)
    if best is None:
        smallest = min(MIXED_BITS)
        raise ValueError(f"weight bits budget {budget} is below the smallest allocation ({smallest} bits everywhere)")
    return best[2]


# --- 3. AdaRound -----------------------------------------------------------------------------


def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _layer_apply(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, weight) if weight.ndim == 4 else F.linear(x, weight)


def reconstruction_error(weight: torch.Tensor, weight_hat: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """AdaRound's objective: mean over samples of || W x - W_hat x_hat ||^2."""
    with torch.no_grad():
        difference = _layer_apply(weight, x) - _layer_apply(weight_hat, x_hat)
        return float(difference.pow(2).flatten(1).sum(dim=1).mean())


def adaround(
    weight: torch.Tensor,
    qparams: QParams,
    x: torch.Tensor,
    x_hat: torch.Tensor,
    iterations: int = ADAROUND_ITERATIONS,
    seed: int = 0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Learned rounding of `weight` on the grid of `qparams`, reconstructing W x from W_hat x_hat.
    Returns integer weights and what it did; nearest rounding is returned if it reconstructs better."""
    generator = torch.Generator().manual_seed(seed)
    scale, zero = qparams.scale_for(weight), qparams.zero_point_for(weight)
    scaled = weight / scale
    floor = torch.floor(scaled)
    rest = torch.clamp(scaled - floor, 0.01, 0.99)  # start where nearest rounding is, inside (0, 1)
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=ADAROUND_LR)
    with torch.no_grad():
        target = _layer_apply(weight, x)
    lo, hi = qparams.qmin - zero, qparams.qmax - zero
    for step in range(iterations):
        cancel.checkpoint()  # per step: abandoned work stops here
        batch = torch.randint(0, len(x), (min(ADAROUND_BATCH, len(x)),), generator=generator)
        soft = scale * torch.clamp(floor + _rectified_sigmoid(v), lo, hi)
        loss = (_layer_apply(soft, x_hat[batch]) - target[batch]).pow(2).flatten(1).sum(dim=1).mean()
        progress = step / iterations
        if progress >= 0.2:  # warm-up without the regulariser, then anneal beta from 20 to 2
            beta = 20.0 + (2.0 - 20.0) * (progress - 0.2) / 0.8
            loss = loss + ADAROUND_REG * (1 - (2 * _rectified_sigmoid(v) - 1).abs().pow(beta)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        learned = torch.clamp(floor + (v >= 0).to(weight.dtype), lo, hi) + zero
        nearest = torch.clamp(torch.round(scaled), lo, hi) + zero
        error_learned = reconstruction_error(weight, scale * (learned - zero), x, x_hat)
        error_nearest = reconstruction_error(weight, scale * (nearest - zero), x, x_hat)
    kept = error_learned <= error_nearest
    chosen = learned if kept else nearest
    return chosen.to(torch.int32), {
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
