"""Integer-only inference for the quantized Net (Jacob et al. 2018; gemmlowp and TFLite).

Between the quantized input and the logits every tensor is an integer: activations as integers
with their zero points, weights as integers, int32 accumulation with zero-point corrections, int32
bias at s_in * s_w, requantization by an int32 fixed-point multiplier M0 in [2^30, 2^31) and a
shift, rounded once: (acc * M0 + 2^(30 - shift)) >> (31 - shift) in 64-bit integers (TFLite's
TFLITE_SINGLE_ROUNDING MultiplyByQuantizedMultiplier, the contract of TFLite Micro and CMSIS-NN),
ReLU as a clamp at the output zero point, max-pool on integers and argmax on the final integers.
The real-valued scales are used only once, ahead of time, to build the multipliers.

Why one rounding, not gemmlowp's two (a rounding doubling high multiply, then a rounding right
shift, TFLite's default build): the high multiply rounds acc * M0 / 2^31 to an integer before the
shift by r divides it by 2^r, so small accumulators lose up to half of 2^-r LSB first; with 2-bit
activations r is about 3, and on the bundled net at W2A2 the two roundings changed 4.7% of the
predictions of the simulation (one rounding: 0.4%), at W2A3 2.2% (0.2%).

Where it can still differ from the fake-quant simulation: the simulation divides by the output
scale in float32 and rounds half to even; the engine multiplies by a 31-bit approximation of
s_in * s_w / s_out and rounds half up, so a value within about 2^-31 (relative) of a rounding
boundary, or exactly on one, can land one integer apart.
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
BYTE_OFFSET = 128  # uint8 values minus 128 fit int8
# Each int32 term of the int8 path is at most K * 255 * 255 (K = fan-in); with K <= 8192 even their
# sum stays below 2^31 (the largest fan-in here is 800).
MAX_INT8_FAN_IN = 8192
# TFLite's single-rounding MultiplyByQuantizedMultiplier requires shift in [-31, 30]: the real
# multiplier M = M0 * 2^(shift - 31) must lie in [2^-32, 2^30), or the rounding shift leaves int64
MIN_SHIFT, MAX_SHIFT = -31, 30


class IntegerEngineError(ValueError):
    """The config cannot run on integers alone (a layer or the input kept in float)."""


# --- fixed-point helpers (TFLite reference semantics) --------------------------------------------


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


def multiply_by_quantized_multiplier(x: torch.Tensor, multiplier: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """TFLite's single-rounding MultiplyByQuantizedMultiplier: x * M0 * 2^(shift - 31) rounded once,
    half up (toward +infinity), on int32 values held in int64, saturated to int32. The product of an
    int32 and an M0 < 2^31 fits 63 bits, so nothing is lost before the one rounding."""
    total_shift = 31 - shift.to(torch.int64)
    if bool((total_shift < 1).any()):
        raise ValueError("shift must be at most 30 (a multiplier below 2^30)")
    nudge = torch.tensor(1, dtype=torch.int64) << (total_shift - 1)
    return torch.clamp((x.to(torch.int64) * multiplier.to(torch.int64) + nudge) >> total_shift, INT32_MIN, INT32_MAX)


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


def _real_multipliers(quant: LayerQuant, next_quant: LayerQuant | None) -> torch.Tensor:
    """s_acc / s_out per output channel, float64: what each layer's (M0, shift) approximates."""
    wq, iq = quant.weight_qparams, quant.input_qparams
    assert wq is not None and iq is not None
    s_acc = iq.scale.double() * _per_channel(wq.scale.double(), quant.weight.shape[0])
    if next_quant is not None:
        assert next_quant.input_qparams is not None
        return s_acc / next_quant.input_qparams.scale.double()
    return s_acc / s_acc.min()


def _multiplier_problem(quant: LayerQuant, real_multipliers: torch.Tensor) -> str:
    """Why a layer's scales cannot be run on integers ('' when they can): the bias scale s_in * s_w
    must be a positive finite float32 (the simulation's), and every M = s_in * s_w / s_out must have a
    shift TFLite's requantization allows. Checked once, where the engine is built, so a model whose
    scales are finite but absurd (a weight scale of 1e30) is refused before it is run or exported."""
    wq, iq = quant.weight_qparams, quant.input_qparams
    assert wq is not None and iq is not None
    bias_scale = iq.scale.float() * wq.scale.float()
    if not bool((torch.isfinite(bias_scale) & (bias_scale > 0)).all()):
        return f"{quant.name}'s bias scale s_in * s_w is not a positive finite float32"
    if not bool((torch.isfinite(real_multipliers) & (real_multipliers > 0)).all()):
        return f"{quant.name}'s requantization multiplier s_in * s_w / s_out is not a positive finite number"
    for real in real_multipliers.tolist():
        if not MIN_SHIFT <= quantize_multiplier(real)[1] <= MAX_SHIFT:
            return (
                f"{quant.name}'s requantization multiplier s_in * s_w / s_out = {real:.3g} needs a shift outside "
                f"TFLite's {MIN_SHIFT} to {MAX_SHIFT} (M must lie in [2^{MIN_SHIFT - 1}, 2^{MAX_SHIFT}))"
            )
    return ""


def _build_layer(quant: LayerQuant, next_quant: LayerQuant | None, real_multipliers: torch.Tensor) -> IntegerLayer:
    """The layer's integer form; `real_multipliers` are its _real_multipliers, which M0 and shift approximate."""
    wq, iq = quant.weight_qparams, quant.input_qparams
    assert wq is not None and iq is not None and quant.weight_int is not None and quant.bias_int is not None
    channels = quant.weight.shape[0]
    if next_quant is not None:
        nq = next_quant.input_qparams
        assert nq is not None
        out_zero, out_min, out_max = int(nq.zero_point), int(nq.zero_point), nq.qmax  # ReLU: clamp at z
    else:  # logits: one common int32 scale, the finest of the per-channel accumulator scales
        out_zero, out_min, out_max = 0, INT32_MIN, INT32_MAX
    multipliers = [quantize_multiplier(float(ratio)) for ratio in real_multipliers.tolist()]
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
    """Accumulators of a stride-1 valid convolution, by im2col and an integer matrix product
    (im2col on bytes when the int8 path applies: 8x less to copy than int64)."""
    out_channels, in_channels, kernel, _ = layer.weight.shape
    n = x.shape[0]
    int8 = _int8_operands(x, layer)
    source = x if int8 is None else (x - BYTE_OFFSET).to(torch.int8)
    patches = source.unfold(2, kernel, 1).unfold(3, kernel, 1)  # [N, C, OH, OW, k, k]
    oh, ow = patches.shape[2], patches.shape[3]
    columns = patches.permute(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, in_channels * kernel * kernel)
    acc = _matmul_int(columns, layer) if int8 is None else _matmul_int8(columns, layer, int8)
    return acc.reshape(n, oh, ow, out_channels).permute(0, 3, 1, 2)


def _matmul_int(x: torch.Tensor, layer: IntegerLayer) -> torch.Tensor:
    """sum_k (x - z_x)(w - z_w) + bias in int64, zero points subtracted before the product: the
    general path, for bit-widths whose integers do not fit a byte."""
    weight = layer.weight.reshape(layer.weight.shape[0], -1)
    return (x - layer.input_zero) @ (weight - layer.weight_zero.unsqueeze(1)).t() + layer.bias


def _int8_operands(x: torch.Tensor, layer: IntegerLayer) -> tuple[torch.Tensor, int] | None:
    """(weights minus their offset as int8 [K, O], that offset) when the input is uint8-ranged and
    the weights fit int8 after subtracting 0 (signed) or 128 (unsigned); else None."""
    weight = layer.weight.reshape(layer.weight.shape[0], -1)
    low, high = int(weight.min()), int(weight.max())
    offset = 0 if -128 <= low and high <= 127 else BYTE_OFFSET if 0 <= low and high <= 255 else None
    if offset is None or int(x.min()) < 0 or int(x.max()) > 255 or weight.shape[1] > MAX_INT8_FAN_IN:
        return None
    return (weight - offset).to(torch.int8).t().contiguous(), offset


def _matmul_int8(x8: torch.Tensor, layer: IntegerLayer, operands: tuple[torch.Tensor, int]) -> torch.Tensor:
    """gemmlowp's zero-point corrections around an int8 x int8 -> int32 matrix product. With
    x = x' + 128 and w = w' + ow (x', w' int8), all in int32:
    sum (x - zx)(w - zw) = sum x'w' + (ow - zw) sum x' + (128 - zx) sum w' + K (128 - zx)(ow - zw)."""
    w8, w_offset = operands
    fan_in = w8.shape[0]
    dx = BYTE_OFFSET - layer.input_zero
    dw = (w_offset - layer.weight_zero).to(torch.int32)  # [O]
    products = torch._int_mm(x8, w8)  # int32 accumulators [M, O]
    row_sums = x8.sum(dim=1, dtype=torch.int32).unsqueeze(1)
    column_sums = w8.sum(dim=0, dtype=torch.int32)
    return products + dw * row_sums + dx * column_sums + fan_in * dx * dw + layer.bias.to(torch.int32)


def _linear_int(x: torch.Tensor, layer: IntegerLayer) -> torch.Tensor:
    int8 = _int8_operands(x, layer)
    if int8 is None:
        return _matmul_int(x, layer)
    return _matmul_int8((x - BYTE_OFFSET).to(torch.int8), layer, int8)


def _max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).amax(dim=(3, 5))


def _requantize(acc: torch.Tensor, layer: IntegerLayer, channel_dim: int) -> torch.Tensor:
    shape = [1] * acc.ndim
    shape[channel_dim] = -1
    scaled = multiply_by_quantized_multiplier(
        acc.to(torch.int64), layer.multiplier.reshape(shape), layer.shift.reshape(shape)
    )
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
        # s_in * s_w / s_out per output channel in float64, before M0 approximates it (for diagnostics)
        self.real_multipliers = {
            q.name: _real_multipliers(q, quants[i + 1] if i + 1 < len(quants) else None) for i, q in enumerate(quants)
        }
        for quant in quants:
            problem = _multiplier_problem(quant, self.real_multipliers[quant.name])
            if problem:
                raise IntegerEngineError(problem)
        self.layers = {
            q.name: _build_layer(q, quants[i + 1] if i + 1 < len(quants) else None, self.real_multipliers[q.name])
            for i, q in enumerate(quants)
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
        for name in LAYER_NAMES:
            x = self.layer_int(name, x)
        return x

    def layer_int(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One layer on integers: its input integers in, its requantized output out (for conv1,
        conv2 and fc1 the next layer's input integers, after max-pool and the ReLU clamp)."""
        return self.requantize(name, self.accumulators(name, x))

    def accumulators(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One layer's accumulators (bias included) for its input integers; for conv1 and conv2 after
        the 2x2 max-pool, which commutes with the monotone requantization that follows."""
        layer = self.layers[name]
        if name in ("conv1", "conv2"):
            return _max_pool_2x2(_conv_int(x, layer))
        return _linear_int(x.flatten(1), layer)

    def requantize(self, name: str, accumulators: torch.Tensor) -> torch.Tensor:
        """Accumulators to the layer's output integers: M0 and the shift, the zero point, the clamp."""
        return _requantize(accumulators, self.layers[name], 1)

    def trace_int(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Integer logits for integer input, and every layer's output integers (conv1, conv2 and
        fc1: the next layer's input; fc2: the int32 logits)."""
        outputs = {}
        for name in LAYER_NAMES:
            x = outputs[name] = self.layer_int(name, x)
        return x, outputs

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, batch_size: int = EVAL_BATCH) -> torch.Tensor:
        """Class predictions (int64) for real images: argmax of the integer logits."""
        return torch.cat(
            [
                self.logits_int(self.quantize_input(images[start : start + batch_size])).argmax(dim=1)
                for start in range(0, len(images), batch_size)
            ]
        )
