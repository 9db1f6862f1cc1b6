"""Integer-only inference for the quantized Net (Jacob et al. 2018; gemmlowp and TFLite).

Between the quantized input and the logits every tensor is an integer: activations as integers
with their zero points, weights as integers, int32 accumulation with zero-point corrections, int32
bias at s_in * s_w, requantization by an int32 fixed-point multiplier M0 in [2^30, 2^31) and a
shift (a rounding doubling high multiply, then a rounding right shift), ReLU as a clamp at the
output zero point, max-pool on integers and argmax on the final integers. The real-valued scales
are used only once, ahead of time, to build the multipliers.

Where it can differ from the fake-quant simulation: the simulation divides by the output scale in
float32 and rounds half to even; the integer path multiplies by a 31-bit fixed-point approximation
of s_in * s_w / s_out and rounds half up (then half away from zero in the shift), so a value within
about one part in 2^31 of a rounding boundary can land one integer apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qcore.model import LAYER_NAMES
from qcore.qmodel import LayerQuant, QuantizedNet, float_parts

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
EVAL_BATCH = 500


class IntegerEngineError(ValueError):
    """The config cannot run on integers alone (a layer or the input kept in float)."""


# --- fixed-point helpers (gemmlowp / TFLite reference semantics) ---------------------------------


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


def saturating_rounding_doubling_high_mul(a: torch.Tensor, b: torch.Tensor | int) -> torch.Tensor:
    """gemmlowp's SaturatingRoundingDoublingHighMul on int32 values held in int64:
    (a * b + nudge) / 2^31 truncated toward zero, nudge = 2^30 (or 1 - 2^30 when a * b < 0)."""
    b_tensor = torch.as_tensor(b, dtype=torch.int64)
    product = a.to(torch.int64) * b_tensor
    nudge = torch.where(product >= 0, torch.tensor(1 << 30), torch.tensor(1 - (1 << 30)))
    result = torch.div(product + nudge, 1 << 31, rounding_mode="trunc")
    overflow = (a == INT32_MIN) & (b_tensor == INT32_MIN)
    return torch.where(overflow, torch.tensor(INT32_MAX), result)


def rounding_divide_by_pot(x: torch.Tensor, exponent: torch.Tensor | int) -> torch.Tensor:
    """gemmlowp's RoundingDivideByPOT: x / 2^exponent rounded half away from zero."""
    exponent_tensor = torch.as_tensor(exponent, dtype=torch.int64)
    mask = (torch.tensor(1, dtype=torch.int64) << exponent_tensor) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).to(torch.int64)
    return (x >> exponent_tensor) + (remainder > threshold).to(torch.int64)


def multiply_by_quantized_multiplier(x: torch.Tensor, multiplier: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """TFLite's MultiplyByQuantizedMultiplier: x * M0 * 2^(shift - 31) on int32 values (in int64)."""
    left = torch.clamp(shift, min=0)
    right = torch.clamp(-shift, min=0)
    shifted = torch.clamp(x * (torch.tensor(1, dtype=torch.int64) << left), INT32_MIN, INT32_MAX)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted, multiplier), right)


# --- the engine -------------------------------------------------------------------------------


@dataclass(frozen=True)
class IntegerLayer:
    """One layer ready for integer inference. Per-output-channel vectors have shape [O]."""

    name: str
    weight: torch.Tensor  # int64 [O, ...] (values of the weight's integer range)
    weight_zero: torch.Tensor  # int64 [O]
    input_zero: int
    bias: torch.Tensor  # int64 [O], int32 values at s_in * s_w
    multiplier: torch.Tensor  # int64 [O], M0 of s_in * s_w / s_out
    shift: torch.Tensor  # int64 [O]
    output_zero: int
    output_min: int  # the clamp; equal to output_zero where a ReLU follows
    output_max: int


def accumulator_bound(quant: LayerQuant) -> int:
    """The largest |accumulator| the layer can produce: fan-in x max|x - z_x| x max|w - z_w| + max|bias|."""
    wq, iq = quant.weight_qparams, quant.input_qparams
    assert wq is not None and iq is not None and quant.bias_int is not None
    fan_in = quant.weight[0].numel()
    x_span = max(int(iq.zero_point) - iq.qmin, iq.qmax - int(iq.zero_point))
    w_span = max(int((wq.zero_point - wq.qmin).abs().max()), int((wq.qmax - wq.zero_point).abs().max()))
    return fan_in * x_span * w_span + int(quant.bias_int.abs().max())


def _per_channel(values: torch.Tensor, channels: int) -> torch.Tensor:
    return values.reshape(-1).expand(channels) if values.numel() == 1 else values.reshape(channels)


def _build_layer(quant: LayerQuant, next_quant: LayerQuant | None) -> IntegerLayer:
    wq, iq = quant.weight_qparams, quant.input_qparams
    assert wq is not None and iq is not None and quant.weight_int is not None and quant.bias_int is not None
    channels = quant.weight.shape[0]
    s_acc = iq.scale.double() * _per_channel(wq.scale.double(), channels)
    if next_quant is not None:
        nq = next_quant.input_qparams
        assert nq is not None
        s_out = nq.scale.double()
        out_zero, out_min, out_max = int(nq.zero_point), int(nq.zero_point), nq.qmax  # ReLU: clamp at z
    else:  # logits: one common int32 scale, the finest of the per-channel accumulator scales
        s_out = s_acc.min()
        out_zero, out_min, out_max = 0, INT32_MIN, INT32_MAX
    multipliers = [quantize_multiplier(float(ratio)) for ratio in (s_acc / s_out).tolist()]
    return IntegerLayer(
        name=quant.name,
        weight=quant.weight_int.to(torch.int64),
        weight_zero=_per_channel(wq.zero_point.to(torch.int64), channels).clone(),
        input_zero=int(iq.zero_point),
        bias=quant.bias_int.to(torch.int64),
        multiplier=torch.tensor([m for m, _ in multipliers], dtype=torch.int64),
        shift=torch.tensor([s for _, s in multipliers], dtype=torch.int64),
        output_zero=out_zero,
        output_min=out_min,
        output_max=out_max,
    )


def _conv_int(x: torch.Tensor, layer: IntegerLayer) -> torch.Tensor:
    """int32 accumulators of a stride-1 valid convolution, by im2col and an integer matmul."""
    out_channels, in_channels, kernel, _ = layer.weight.shape
    n, _, height, width = x.shape
    patches = x.unfold(2, kernel, 1).unfold(3, kernel, 1)  # [N, C, OH, OW, k, k]
    oh, ow = patches.shape[2], patches.shape[3]
    columns = patches.permute(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, in_channels * kernel * kernel)
    acc = _matmul_int(columns, layer)
    return acc.reshape(n, oh, ow, out_channels).permute(0, 3, 1, 2)


def _matmul_int(x: torch.Tensor, layer: IntegerLayer) -> torch.Tensor:
    """sum_k (x - z_x)(w - z_w) + bias, with the zero points subtracted before the product."""
    weight = layer.weight.reshape(layer.weight.shape[0], -1) - layer.weight_zero.unsqueeze(1)
    return (x - layer.input_zero) @ weight.t() + layer.bias


def _max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).amax(dim=(3, 5))


def _requantize(acc: torch.Tensor, layer: IntegerLayer, channel_dim: int) -> torch.Tensor:
    shape = [1] * acc.ndim
    shape[channel_dim] = -1
    scaled = multiply_by_quantized_multiplier(acc, layer.multiplier.reshape(shape), layer.shift.reshape(shape))
    return torch.clamp(scaled + layer.output_zero, layer.output_min, layer.output_max)


class IntegerNet:
    """The integer-only twin of a QuantizedNet whose every layer and input are quantized."""

    def __init__(self, qnet: QuantizedNet) -> None:
        missing = float_parts(qnet)
        if missing:
            raise IntegerEngineError(
                f"the integer engine needs every layer and the input quantized; float: {', '.join(missing)}"
            )
        quants = [qnet.layers[n] for n in LAYER_NAMES]
        for quant in quants:
            bound = accumulator_bound(quant)
            if bound > INT32_MAX:
                raise IntegerEngineError(
                    f"{quant.name}'s accumulators could reach {bound:.3g}, beyond int32, at "
                    f"W{qnet.config.weight_bits}A{qnet.config.act_bits}; the integer engine runs up to 8 bits"
                )
        self.input_qparams = quants[0].input_qparams
        self.layers = {
            q.name: _build_layer(q, quants[i + 1] if i + 1 < len(quants) else None) for i, q in enumerate(quants)
        }
        self.config = qnet.config

    def quantize_input(self, images: torch.Tensor) -> torch.Tensor:
        """The only float step: real images to the input's integers (int64)."""
        from qcore.quant import quantize

        assert self.input_qparams is not None
        return quantize(images, self.input_qparams).to(torch.int64)

    def logits_int(self, x: torch.Tensor) -> torch.Tensor:
        """Integer logits for integer input [N, 1, 28, 28] (no floating-point tensor involved)."""
        if x.is_floating_point():
            raise TypeError("logits_int takes the quantized input integers; use quantize_input first")
        layers = self.layers
        x = x.to(torch.int64)
        x = _requantize(_max_pool_2x2(_conv_int(x, layers["conv1"])), layers["conv1"], 1)
        x = _requantize(_max_pool_2x2(_conv_int(x, layers["conv2"])), layers["conv2"], 1)
        x = _requantize(_matmul_int(x.flatten(1), layers["fc1"]), layers["fc1"], 1)
        return _requantize(_matmul_int(x, layers["fc2"]), layers["fc2"], 1)

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, batch_size: int = EVAL_BATCH) -> torch.Tensor:
        """Class predictions (int64) for real images: argmax of the integer logits."""
        return torch.cat(
            [
                self.logits_int(self.quantize_input(images[start : start + batch_size])).argmax(dim=1)
                for start in range(0, len(images), batch_size)
            ]
        )
