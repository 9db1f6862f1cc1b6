"""The quantizer QAT trains through: the simulation's fake quantization (qcore.quantize.quant) with the
straight-through estimator's gradient to its input and LSQ's to its scale."""

from __future__ import annotations

import math

import torch


class _FakeQuantizeSTE(torch.autograd.Function):
    """One fused node (instead of eight elementwise ones) for the quantizer and its STE/LSQ gradients."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, scale_factor):  # type: ignore[override]
        z = zero_point.to(x.dtype)
        v = x / scale
        rounded = torch.round(v)
        q = torch.clamp(rounded + z, qmin, qmax)
        low, high = qmin - z, qmax - z  # Qn and Qp
        below, above = v < low, v > high
        ctx.save_for_backward(v, rounded, below, above, low, high, scale)
        ctx.scale_factor = scale_factor
        return (q - z) * scale

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        v, rounded, below, above, low, high, scale = ctx.saved_tensors
        outside = below | above
        grad_x = grad.masked_fill(outside, 0.0) if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            slope = torch.where(below, low, torch.where(above, high, rounded - v))
            per_value = grad * slope * ctx.scale_factor
            # sum over every dimension the scale was broadcast along
            dims = [d for d in range(per_value.ndim) if scale.ndim == 0 or scale.shape[d] == 1]
            grad_scale = per_value.sum(dim=dims).reshape(scale.shape) if dims else per_value
        return grad_x, grad_scale, None, None, None, None


def fake_quantize_ste(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    scale_factor: float = 1.0,
) -> torch.Tensor:
    """(clamp(round(x / s) + z, qmin, qmax) - z) * s, as qcore.quantize.quant.fake_quantize computes it. With
    v = x / s, Qn = qmin - z and Qp = qmax - z, the gradient to x is 1 where Qn <= v <= Qp and 0
    outside (the STE), and the gradient to s is LSQ's: round(v) - v inside, Qn below, Qp above, times
    `scale_factor` (LSQ's g). `scale` is 0-d, or broadcastable to x with the channel dimension kept."""
    return _FakeQuantizeSTE.apply(x, scale, zero_point, qmin, qmax, scale_factor)


def straight_through(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`target`'s values with `value`'s gradient (the straight-through estimator, Bengio et al. 2013):
    for the roundings that need no scale gradient, the int32 bias and the rounded average pool."""
    return value + (target - value).detach()


def lsq_gradient_factor(values_per_scale: int, qmax_level: int) -> float:
    """LSQ's g = 1 / sqrt(N * Qp)."""
    return 1.0 / math.sqrt(values_per_scale * max(qmax_level, 1))
