"""The uniform quantizer as pure, typed functions (no state), after torchao's quant_primitives.

Affine (asymmetric, unsigned): q = clamp(round(x / s) + z, 0, 2^b - 1), x' = s * (q - z), with
s = (max - min) / (2^b - 1) and z = round(-min / s) clamped, after widening [min, max] to hold 0.
Symmetric (signed, restricted range): z = 0, q in [-(2^(b-1) - 1), 2^(b-1) - 1], s = max|x| / qmax.
round() is round-half-to-even, as torch.round and Python's round are.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch

MIN_BITS = 2
MAX_BITS = 16


class Scheme(StrEnum):
    ASYMMETRIC = "asymmetric"
    SYMMETRIC = "symmetric"


class Granularity(StrEnum):
    PER_TENSOR = "per-tensor"
    PER_CHANNEL = "per-channel"


@dataclass(frozen=True)
class QParams:
    """Scale and zero point (0-d tensors, or 1-d along `axis` for per-channel) and the integer range."""

    scale: torch.Tensor  # float32
    zero_point: torch.Tensor  # int64, same shape as scale
    qmin: int
    qmax: int
    axis: int | None = None  # the channel axis when per-channel

    def _view(self, tensor: torch.Tensor, ndim: int) -> torch.Tensor:
        """Broadcast a per-channel vector against an `ndim`-dimensional tensor along `axis`."""
        if self.axis is None:
            return tensor
        shape = [1] * ndim
        shape[self.axis] = -1
        return tensor.reshape(shape)

    def scale_for(self, x: torch.Tensor) -> torch.Tensor:
        return self._view(self.scale, x.ndim)

    def zero_point_for(self, x: torch.Tensor) -> torch.Tensor:
        return self._view(self.zero_point, x.ndim)


def check_bits(bits: int) -> None:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bit-width must be between {MIN_BITS} and {MAX_BITS} (got {bits})")


def integer_range(bits: int, scheme: Scheme) -> tuple[int, int]:
    """(qmin, qmax): [0, 2^b - 1] for affine, [-(2^(b-1) - 1), 2^(b-1) - 1] for symmetric."""
    check_bits(bits)
    if Scheme(scheme) is Scheme.ASYMMETRIC:
        return 0, 2**bits - 1
    qmax = 2 ** (bits - 1) - 1
    return -qmax, qmax


def tensor_range(x: torch.Tensor, granularity: Granularity, axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of `x`: 0-d tensors per-tensor, or one value per slice along `axis` per-channel."""
    if Granularity(granularity) is Granularity.PER_TENSOR:
        return x.min(), x.max()
    flat = x.transpose(0, axis).reshape(x.shape[axis], -1)
    return flat.min(dim=1).values, flat.max(dim=1).values


def choose_qparams(
    min_val: torch.Tensor | float,
    max_val: torch.Tensor | float,
    bits: int,
    scheme: Scheme,
    axis: int | None = None,
) -> QParams:
    """Scale and zero point for the range [min_val, max_val] (widened to contain 0 so zero is exact).
    A range that is all zero gets scale 1, so every value, 0 included, still round-trips."""
    qmin, qmax = integer_range(bits, scheme)
    lo = torch.clamp(torch.as_tensor(min_val, dtype=torch.float32), max=0.0)
    hi = torch.clamp(torch.as_tensor(max_val, dtype=torch.float32), min=0.0)
    if Scheme(scheme) is Scheme.SYMMETRIC:
        scale = torch.maximum(-lo, hi) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = torch.zeros_like(scale, dtype=torch.int64)
    else:
        scale = (hi - lo) / (qmax - qmin)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax).to(torch.int64)
    return QParams(scale, zero_point, qmin, qmax, axis if scale.ndim else None)


def quantize(x: torch.Tensor, qparams: QParams) -> torch.Tensor:
    """Integers q = clamp(round(x / s) + z, qmin, qmax), as int32."""
    scale, zero_point = qparams.scale_for(x), qparams.zero_point_for(x)
    q = torch.clamp(torch.round(x / scale) + zero_point, qparams.qmin, qparams.qmax)
    return q.to(torch.int32)


def dequantize(q: torch.Tensor, qparams: QParams) -> torch.Tensor:
    """Reals x' = s * (q - z), as float32."""
    scale, zero_point = qparams.scale_for(q), qparams.zero_point_for(q)
    return (q.to(torch.int64) - zero_point).to(torch.float32) * scale


def fake_quantize(x: torch.Tensor, qparams: QParams) -> torch.Tensor:
    """dequantize(quantize(x)) computed in float without integer casts (faster, same values).

    clamp(round(v) + z, qmin, qmax) - z equals clamp(round(v), qmin - z, qmax - z) exactly (integers
    below 2^24 are exact in float32, and beyond the range both give the bound), so without autograd it
    runs as one division and three in-place passes: on activation maps the five separate passes were
    most of the simulation's time."""
    scale, zero_point = qparams.scale_for(x), qparams.zero_point_for(x).to(x.dtype)
    if x.requires_grad and torch.is_grad_enabled():
        return (torch.clamp(torch.round(x / scale) + zero_point, qparams.qmin, qparams.qmax) - zero_point) * scale
    if zero_point.numel() == 1:
        zero = float(zero_point)
        return (x / scale).round_().clamp_(qparams.qmin - zero, qparams.qmax - zero).mul_(scale)
    return (x / scale).round_().clamp_(qparams.qmin - zero_point, qparams.qmax - zero_point).mul_(scale)


def quantize_bias(bias: torch.Tensor, scale: torch.Tensor, bits: int = 32) -> torch.Tensor:
    """Bias as signed `bits`-bit integers at `scale` (s_in * s_w) with zero point 0, computed in
    float64 so that 32-bit integers are exact. Returned as int64 (values fit int32 at 32 bits)."""
    limit = 2 ** (bits - 1) - 1
    q = torch.round(bias.to(torch.float64) / scale.to(torch.float64))
    return torch.clamp(q, -limit - 1, limit).to(torch.int64)


def dequantize_bias(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (q.to(torch.float64) * scale.to(torch.float64)).to(torch.float32)


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(sum x^2 / sum (x - x')^2), in dB (inf if exact)."""
    signal = float(reference.to(torch.float64).pow(2).sum())
    noise = float((reference.to(torch.float64) - approximation.to(torch.float64)).pow(2).sum())
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    import math

    return 10.0 * math.log10(signal / noise)


def lookup_table(
    function: str, parameter: tuple[float, ...], source: QParams, target: QParams
) -> tuple[int, torch.Tensor]:
    """An activation other than ReLU on integers (TFLite's int8 LOGISTIC and TANH): for each level of its
    input's grid `source`, from qmin up, the level of `target` its float value maps to, int64. The
    simulation and the integer engine both read it, so they agree on every input by construction."""
    from qcore.graph.ops import activation

    if source.scale.numel() != 1 or target.scale.numel() != 1:
        raise ValueError("an activation's table needs one scale per tensor")
    levels = torch.arange(source.qmin, source.qmax + 1, dtype=torch.int64)
    return source.qmin, quantize(activation(function, parameter, dequantize(levels, source)), target).to(torch.int64)
