"""The quantizer against hand-computed values and an independent scalar reference."""

from __future__ import annotations

import math

import pytest
import torch

from qcore.quantize.quant import (
    Granularity,
    Scheme,
    choose_qparams,
    dequantize,
    fake_quantize,
    integer_range,
    quantize,
    quantize_bias,
    sqnr_db,
    tensor_range,
)


def reference_qparams(lo: float, hi: float, bits: int, scheme: str) -> tuple[float, int, int, int]:
    """docs/DESIGN.md's formulas in plain Python floats: (scale, zero_point, qmin, qmax)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if scheme == "symmetric":
        qmax = 2 ** (bits - 1) - 1
        scale = max(-lo, hi) / qmax or 1.0
        return scale, 0, -qmax, qmax
    qmin, qmax = 0, 2**bits - 1
    scale = (hi - lo) / (qmax - qmin) or 1.0
    zero = min(max(round(qmin - lo / scale), qmin), qmax)
    return scale, zero, qmin, qmax


def reference_quantize(x: float, scale: float, zero: int, qmin: int, qmax: int) -> int:
    return min(max(round(x / scale) + zero, qmin), qmax)  # Python's round: half to even


def test_affine_qparams_by_hand():
    # [-1, 3] at 2 bits: s = 4/3, z = round(0.75) = 1
    qparams = choose_qparams(-1.0, 3.0, 2, Scheme.ASYMMETRIC)
    assert float(qparams.scale) == pytest.approx(4 / 3)
    assert int(qparams.zero_point) == 1
    assert (qparams.qmin, qparams.qmax) == (0, 3)
    x = torch.tensor([-1.0, 0.0, 0.5, 3.0, 10.0, -5.0])
    # x/s = -0.75, 0, 0.375, 2.25, 7.5, -3.75 -> round -1, 0, 0, 2, 8, -4 -> +1 -> clamp [0, 3]
    assert quantize(x, qparams).tolist() == [0, 1, 1, 3, 3, 0]


def test_symmetric_qparams_by_hand():
    # [-2, 1] at 3 bits: qmax = 3, s = 2/3, z = 0, restricted range [-3, 3]
    qparams = choose_qparams(-2.0, 1.0, 3, Scheme.SYMMETRIC)
    assert float(qparams.scale) == pytest.approx(2 / 3)
    assert int(qparams.zero_point) == 0
    assert (qparams.qmin, qparams.qmax) == (-3, 3)
    assert quantize(torch.tensor([-2.0, -5.0, 0.34, 1.0]), qparams).tolist() == [-3, -3, 1, 2]


def test_round_half_to_even_on_ties():
    qparams = choose_qparams(0.0, 255.0, 8, Scheme.ASYMMETRIC)  # scale exactly 1, zero 0
    assert quantize(torch.tensor([0.5, 1.5, 2.5, 3.5]), qparams).tolist() == [0, 2, 2, 4]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8, 12, 16])
@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric"])
def test_matches_scalar_reference(bits, scheme):
    generator = torch.Generator().manual_seed(bits)
    x = torch.randn(500, generator=generator, dtype=torch.float32) * 3 + 0.5
    lo, hi = float(x.min()) * 0.8, float(x.max()) * 0.8  # some values clip
    scale, zero, qmin, qmax = reference_qparams(lo, hi, bits, scheme)
    qparams = choose_qparams(lo, hi, bits, Scheme(scheme))
    assert float(qparams.scale) == pytest.approx(scale, rel=1e-6)
    assert int(qparams.zero_point) == zero
    # Compare on values away from rounding ties, where float32 vs float64 division may differ.
    s = float(qparams.scale)
    ratios = x.double() / s
    safe = (ratios - ratios.floor() - 0.5).abs() > 1e-3
    expected = [reference_quantize(float(v), s, zero, qmin, qmax) for v in x[safe].tolist()]
    assert quantize(x[safe], qparams).tolist() == expected


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric"])
def test_round_trip_error_at_most_half_a_step_inside_range(bits, scheme):
    x = torch.linspace(-1.7, 4.3, 10001)
    qparams = choose_qparams(x.min(), x.max(), bits, Scheme(scheme))
    error = (dequantize(quantize(x, qparams), qparams) - x).abs()
    lo = float(qparams.scale * (qparams.qmin - qparams.zero_point))
    hi = float(qparams.scale * (qparams.qmax - qparams.zero_point))
    inside = (x >= lo) & (x <= hi)
    assert inside.sum() > 9000
    # s/2, plus float32 rounding of s * (q - z) (a few ulps of the largest |x|; matters at 16 bits)
    float_slack = 4 * torch.finfo(torch.float32).eps * float(x.abs().max())
    assert float(error[inside].max()) <= float(qparams.scale) / 2 + float_slack


@pytest.mark.parametrize("lo,hi", [(-3.0, 7.0), (1.0, 5.0), (-9.0, -2.0), (-0.3, 123.4), (0.0, 0.0)])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric"])
def test_zero_is_exactly_representable(lo, hi, bits, scheme):
    qparams = choose_qparams(lo, hi, bits, Scheme(scheme))
    assert float(fake_quantize(torch.zeros(3), qparams).abs().max()) == 0.0
    assert float(dequantize(quantize(torch.zeros(1), qparams), qparams)) == 0.0


def test_fake_quantize_equals_dequantize_of_quantize():
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    low, high = tensor_range(x, Granularity.PER_CHANNEL, axis=0)
    for scheme in Scheme:
        qparams = choose_qparams(low, high, 5, scheme, axis=0)
        assert torch.equal(fake_quantize(x, qparams), dequantize(quantize(x, qparams), qparams))


@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric"])
@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_equals_per_tensor_channel_by_channel(scheme, axis):
    x = torch.randn(6, 7, 3, generator=torch.Generator().manual_seed(1)) * torch.arange(1, 8).reshape(1, 7, 1)
    low, high = tensor_range(x, Granularity.PER_CHANNEL, axis=axis)
    per_channel = quantize(x, choose_qparams(low, high, 4, Scheme(scheme), axis=axis))
    for channel in range(x.shape[axis]):
        piece = x.select(axis, channel)
        alone = choose_qparams(piece.min(), piece.max(), 4, Scheme(scheme))
        assert torch.equal(per_channel.select(axis, channel), quantize(piece, alone))


@pytest.mark.parametrize("bits", [2, 3, 8, 16])
def test_symmetric_zero_point_is_zero_and_range_restricted(bits):
    x = torch.randn(10, 20, generator=torch.Generator().manual_seed(bits)) + 0.7
    low, high = tensor_range(x, Granularity.PER_CHANNEL)
    qparams = choose_qparams(low, high, bits, Scheme.SYMMETRIC, axis=0)
    assert torch.count_nonzero(qparams.zero_point) == 0
    q = quantize(x, qparams)
    assert int(q.min()) >= -(2 ** (bits - 1) - 1) and int(q.max()) <= 2 ** (bits - 1) - 1
    assert integer_range(bits, Scheme.SYMMETRIC) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)


@pytest.mark.parametrize("bits", [1, 17, 0])
def test_bit_width_outside_2_to_16_is_refused(bits):
    with pytest.raises(ValueError, match="between 2 and 16"):
        choose_qparams(-1.0, 1.0, bits, Scheme.ASYMMETRIC)


def test_bias_is_int32_at_given_scale():
    bias = torch.tensor([0.1, -0.25, 3.0, 1e6])
    scale = torch.tensor(1e-4)
    q = quantize_bias(bias, scale)
    assert q.tolist() == [round(0.1 / 1e-4), round(-0.25 / 1e-4), round(3.0 / 1e-4), 2**31 - 1]


def test_sqnr_known_values():
    signal = torch.ones(1000)
    assert sqnr_db(signal, signal * 1.1) == pytest.approx(20.0)  # noise amplitude 1/10 -> 20 dB
    assert sqnr_db(signal, signal) == math.inf
