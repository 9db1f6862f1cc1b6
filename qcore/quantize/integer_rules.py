"""The integer rules the fake-quant simulation and the integer engine share (TFLite reference
semantics): the fixed-point requantization multiplier, rounded average pooling, ReLU6's bound on a
grid and the 8-bit ADD's rescaling. They live below both, so qcore.quantize.qmodel (the simulation)
and qcore.inference.integer (the engine) import them from here and never each other."""

from __future__ import annotations

import math

import torch

from qcore.quantize.quant import QParams

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


def quantize_multiplier(real: float) -> tuple[int, int]:
    """(M0, shift) with real = M0 * 2^(shift - 31) and M0 in [2^30, 2^31) (M0 = 0 for real = 0).
    M0 is rounded half away from zero, as TFLite's QuantizeMultiplier does with std::round."""
    if real < 0:
        raise ValueError(f"multiplier must be >= 0 (got {real})")
    if real == 0.0:
        return 0, 0
    mantissa, exponent = math.frexp(real)  # real = mantissa * 2^exponent, mantissa in [0.5, 1)
    multiplier = math.floor(mantissa * 2**31 + 0.5)
    if multiplier == 2**31:  # the mantissa rounded up to 1.0
        multiplier //= 2
        exponent += 1
    return multiplier, exponent


def multiply_by_quantized_multiplier(
    x: torch.Tensor,
    multiplier: torch.Tensor,
    shift: torch.Tensor,
    saturate: bool = True,
    in_place: bool = False,
    offset: int = 0,
) -> torch.Tensor:
    """TFLite's single-rounding MultiplyByQuantizedMultiplier: x * M0 * 2^(shift - 31) rounded once,
    half up (toward +infinity), on int32 values held in int64, saturated to int32 (a caller that clamps
    to a narrower range next passes `saturate=False`), plus `offset` (a zero point; only unsaturated,
    as TFLite saturates before adding it). The product of an int32 and an M0 < 2^31 fits 63 bits, so
    nothing is lost before the one rounding. One new tensor, updated in place, or with `in_place` an
    int64 `x` itself (the caller's own, which nothing else reads): on a ResNet's activations these
    passes over memory are most of the integer engine's time, so the offset rides on the rounding's
    nudge where it fits: ((p + n) >> t) + o equals (p + n + o * 2^t) >> t exactly."""
    total_shift = 31 - shift.to(torch.int64)
    if bool((total_shift < 1).any()):
        raise ValueError("shift must be at most 30 (a multiplier below 2^30)")
    if bool((total_shift > 62).any()):  # 2^t and its half must be int64 values
        raise ValueError("shift must be at least -31 (a multiplier of at least 2^-32)")
    if offset and saturate:
        raise ValueError("saturation comes before the offset: add it to the saturated result")
    nudge = torch.tensor(1, dtype=torch.int64) << (total_shift - 1)
    # |p| < 2^62; the offset's multiple of 2^t must keep p + nudge inside int64 (2^63)
    folded = bool(offset) and int(total_shift.max()) + abs(offset).bit_length() <= 61
    if folded:
        nudge = nudge + (torch.tensor(offset, dtype=torch.int64) << total_shift)
    if in_place and x.dtype == torch.int64:
        product = x.mul_(multiplier.to(torch.int64))
    else:
        product = x.to(torch.int64) * multiplier.to(torch.int64)
    product.add_(nudge).bitwise_right_shift_(total_shift)
    if saturate:
        return product.clamp_(INT32_MIN, INT32_MAX)
    return product.add_(offset) if offset and not folded else product


def average_pool_int(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """TFLite's uint8 reference AveragePool: the window's sum of the quantized values, divided by the
    count rounded half up, (sum + n / 2) / n in integers; input and output share scale and zero point."""
    count = kernel[0] * kernel[1]
    sums = x.unfold(2, kernel[0], stride[0]).unfold(3, kernel[1], stride[1]).sum(dim=(4, 5))
    return torch.div(sums + count // 2, count, rounding_mode="floor")


def quantized_six(qparams: QParams) -> int:
    """ReLU6's upper clamp on a grid: round(6 / s) + z, rounded as the simulation's float32 divides."""
    return int(torch.round(torch.tensor(6.0) / qparams.scale)) + int(qparams.zero_point)


ADD_LEFT_SHIFT = 20  # TFLite's 8-bit ADD: inputs are shifted left by 20 bits before rescaling


def add_multipliers(input_scales: tuple[float, float]) -> tuple[list[float], float]:
    """TFLite's ADD (kernels/add.cc, PrepareGeneralSubOp): each input rescaled by s_i / (2 max(s1, s2))
    after a left shift of 20 bits, so the sum's scale is 2 max(s1, s2) / 2^20."""
    twice_max = 2.0 * max(input_scales)
    return [scale / twice_max for scale in input_scales], twice_max / 2.0**ADD_LEFT_SHIFT


def add_int(
    a: torch.Tensor,
    b: torch.Tensor,
    zeros: tuple[int, int],
    multipliers: tuple[torch.Tensor, torch.Tensor],
    shifts: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """The raw sum of TFLite's int8 ADD: ((q_i - z_i) << 20) times each input's multiplier, summed;
    requantized to the output's scale and zero point afterwards, like any accumulator.
    The left shift is taken into the rounding shift instead: ((d << 20) M + 2^(t - 1)) >> t equals
    (d M + 2^(t - 21)) >> (t - 20) exactly (both sides are the same number over a power of two; an ADD's
    multiplier is at most 1/2, so t = 31 - shift >= 31), and nothing here can reach int32's bounds
    (|d| < 2^16 times 2^20 times at most 1/2). One pass over memory fewer, the same integers."""
    scaled = [
        multiply_by_quantized_multiplier(
            q.to(torch.int64) - zero, multiplier, shift + ADD_LEFT_SHIFT, saturate=False, in_place=True
        )
        for q, zero, multiplier, shift in zip((a, b), zeros, multipliers, shifts, strict=True)
    ]
    return scaled[0].add_(scaled[1])
