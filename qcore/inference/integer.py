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
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from qcore.graph import BATCH_VALUES, Op, OpKind, batch_size_for
from qcore.graph.ops import max_pool
from qcore.quantize.integer_rules import (
    INT32_MAX,
    INT32_MIN,
    add_int,
    add_multipliers,
    average_pool_int,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    quantized_six,
)
from qcore.quantize.qmodel import LayerQuant, QuantizedNet, float_parts

BYTE_OFFSET = 128  # uint8 values minus 128 fit int8
# Each int32 term of the int8 path is at most K * 255 * 255 (K = fan-in); with K <= 8192 even their
# sum stays below 2^31 (the largest fan-in here is 800).
MAX_INT8_FAN_IN = 8192
# TFLite's single-rounding MultiplyByQuantizedMultiplier requires shift in [-31, 30]: the real
# multiplier M = M0 * 2^(shift - 31) must lie in [2^-32, 2^30), or the rounding shift leaves int64
MIN_SHIFT, MAX_SHIFT = -31, 30
# The logits' common scale is the finest accumulator scale divided by 2^k, k at most this: a multiplier
# of 2^k times a ratio must keep a shift TFLite allows (below 2^30)
MAX_LOGIT_EXTRA_BITS = 24


class IntegerEngineError(ValueError):
    """The config cannot run on integers alone (a layer or the input kept in float)."""


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
    # the integers its input can hold (its grid's range: every path clamps onto it), so the int8 path is
    # chosen without scanning each batch; None (a qtensors file read back) scans
    input_range: tuple[int, int] | None = None


def accumulator_bound(quant: LayerQuant) -> int:
    """The largest |accumulator| the layer can produce: fan-in x max|x - z_x| x max|w - z_w| + max|bias|."""
    wq, iq = quant.weight_qparams, quant.input_qparams
    assert wq is not None and iq is not None and quant.bias_int is not None
    fan_in = quant.weight[0].numel()
    x_span = max(int(iq.zero_point) - iq.qmin, iq.qmax - int(iq.zero_point))
    w_span = max(int((wq.zero_point - wq.qmin).abs().max()), int((wq.qmax - wq.zero_point).abs().max()))
    return fan_in * x_span * w_span + int(quant.bias_int.abs().max())


def accumulator_bounds(quant: LayerQuant) -> torch.Tensor:
    """Per output channel, the largest |accumulator| any input can give: max|x - z_x| times the sum of
    the channel's |w - z_w|, plus |bias| (float64, exact for these integer sizes)."""
    wq, iq = quant.weight_qparams, quant.input_qparams
    assert wq is not None and iq is not None and quant.bias_int is not None and quant.weight_int is not None
    channels = quant.weight_int.shape[0]
    x_span = max(int(iq.zero_point) - iq.qmin, iq.qmax - int(iq.zero_point))
    weights = quant.weight_int.reshape(channels, -1).double() - _per_channel(wq.zero_point.double(), channels)[:, None]
    return x_span * weights.abs().sum(1) + quant.bias_int.double().abs()


def logit_extra_bits(bounds: torch.Tensor, ratios: torch.Tensor) -> int:
    """How many bits finer than the finest accumulator scale the logits' common scale can be while
    every logit still fits int32 for any input: per output channel the accumulator bound times its
    scale's ratio to the finest, times 2^k, at most INT32_MAX (0 when even k = 0 could saturate)."""
    largest = float((bounds.double() * ratios.double()).max())
    if largest < 1:
        return MAX_LOGIT_EXTRA_BITS
    return max(0, min(MAX_LOGIT_EXTRA_BITS, math.floor(math.log2(INT32_MAX / largest))))


def _per_channel(values: torch.Tensor, channels: int) -> torch.Tensor:
    return values.reshape(-1).expand(channels) if values.numel() == 1 else values.reshape(channels)


def _multiplier_problem(what: str, real_multipliers: torch.Tensor, bias_scale: torch.Tensor | None = None) -> str:
    """Why a requantization cannot run on integers ('' when it can): the bias scale s_in * s_w must be
    a positive finite float32 (the simulation's), and every multiplier M must have a shift TFLite's
    requantization allows. Checked once, where the engine is built, so a model whose scales are finite
    but absurd (a weight scale of 1e30) is refused before it is run or exported."""
    if bias_scale is not None and not bool((torch.isfinite(bias_scale) & (bias_scale > 0)).all()):
        return f"{what}'s bias scale s_in * s_w is not a positive finite float32"
    if not bool((torch.isfinite(real_multipliers) & (real_multipliers > 0)).all()):
        return f"{what}'s requantization multiplier s_in * s_w / s_out is not a positive finite number"
    for real in real_multipliers.reshape(-1).tolist():
        if not MIN_SHIFT <= quantize_multiplier(real)[1] <= MAX_SHIFT:
            return (
                f"{what}'s requantization multiplier s_in * s_w / s_out = {real:.3g} needs a shift outside "
                f"TFLite's {MIN_SHIFT} to {MAX_SHIFT} (M must lie in [2^{MIN_SHIFT - 1}, 2^{MAX_SHIFT}))"
            )
    return ""


def _fixed_point(real_multipliers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [quantize_multiplier(float(ratio)) for ratio in real_multipliers.reshape(-1).tolist()]
    return torch.tensor([m for m, _ in pairs], dtype=torch.int64), torch.tensor(
        [s for _, s in pairs], dtype=torch.int64
    )


def _pad(x: torch.Tensor, padding: tuple[int, int], value: int) -> torch.Tensor:
    if padding == (0, 0):
        return x
    return torch.nn.functional.pad(x, (padding[1], padding[1], padding[0], padding[0]), value=value)


def _conv_int(
    x: torch.Tensor,
    layer: IntegerLayer,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    groups: int = 1,
    centred: torch.Tensor | None = None,
) -> torch.Tensor:
    """Accumulators of a convolution. Given `centred` (_centred_weights): torch's float convolution of
    x - z_x by it, exact, its zero padding being the reals' zero. Else integer kernels only:
    on the int8 path im2col on bytes and int8 x int8 -> int32 products; otherwise im2col and an int64
    matrix product, zero padding of the reals being padding with the input's zero point; a grouped
    (depthwise) convolution is one product per group."""
    if centred is not None:
        out = F.conv2d(x.to(centred.dtype, copy=True).sub_(layer.input_zero), centred, None, stride, padding, 1, groups)
        return out.to(torch.int64).add_(layer.bias.reshape(1, -1, 1, 1))
    out_channels, group_channels, kh, kw = layer.weight.shape
    x = _pad(x, padding, layer.input_zero)
    if groups == out_channels and group_channels == 1:
        return _depthwise_int(x, layer, stride)
    n = x.shape[0]
    int8 = _int8_operands(x, layer) if groups == 1 else None
    source = x if int8 is None else (x - BYTE_OFFSET).to(torch.int8)
    patches = source.unfold(2, kh, stride[0]).unfold(3, kw, stride[1])  # [N, C, OH, OW, kh, kw]
    oh, ow = patches.shape[2], patches.shape[3]
    if groups == 1:
        columns = patches.permute(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, group_channels * kh * kw)
        acc = _matmul_int(columns, layer) if int8 is None else _matmul_int8(columns, layer, int8)
        return acc.reshape(n, oh, ow, out_channels).permute(0, 3, 1, 2)
    columns = patches.reshape(n, groups, group_channels, oh, ow, kh * kw).permute(1, 0, 3, 4, 2, 5)
    columns = columns.reshape(groups, n * oh * ow, group_channels * kh * kw) - layer.input_zero
    weight = (layer.weight - layer.weight_zero.reshape(-1, 1, 1, 1)).reshape(groups, out_channels // groups, -1)
    acc = torch.bmm(columns, weight.transpose(1, 2))  # [G, N*OH*OW, O/G]
    acc = acc.permute(1, 0, 2).reshape(n, oh, ow, out_channels) + layer.bias
    return acc.permute(0, 3, 1, 2)


def _exact_float_dtype(bound: int) -> torch.dtype | None:
    """The float type in which a sum of integer products is exact when every product and every partial
    sum has magnitude at most `bound`: every integer up to 2^24 (float32) or 2^53 (float64) is exact,
    so no step of any summation order rounds. float32 only at torch's default ("highest") matmul
    precision, which never lowers a CPU GEMM to bfloat16; None past 2^53."""
    if bound <= 2**24 and torch.get_float32_matmul_precision() == "highest":
        return torch.float32
    return torch.float64 if bound <= 2**53 else None


def _centred_weights(x: torch.Tensor, layer: IntegerLayer) -> torch.Tensor | None:
    """w - z_w in the float type that holds the layer's products exactly (None when none does). Every
    partial sum of sum (x - z_x)(w - z_w) is at most max|x - z_x| (over _input_range) times the largest
    sum of one output's |w - z_w|. torch's CPU convolution is oneDNN's direct algorithm (float32) or
    im2col and a GEMM (float64), never Winograd's or FFT's transforms, whose intermediate values are
    not integers."""
    x_low, x_high = _input_range(x, layer)
    x_span = max(abs(x_low - layer.input_zero), abs(x_high - layer.input_zero))
    weight = layer.weight - layer.weight_zero.reshape(-1, *[1] * (layer.weight.ndim - 1))
    dtype = _exact_float_dtype(x_span * int(weight.reshape(weight.shape[0], -1).abs().sum(dim=1).max()))
    return None if dtype is None else weight.to(dtype)


def _depthwise_int(x: torch.Tensor, layer: IntegerLayer, stride: tuple[int, int]) -> torch.Tensor:
    """A depthwise convolution's accumulators (x already padded): one multiply-accumulate per kernel
    tap over the whole strided input, in int32 (the engine refuses layers whose accumulators could
    pass int32, and every partial sum is bounded by the whole). A product per group of one channel
    by im2col and bmm copied the patches nine times over and took 80% of a MobileNet's time."""
    _, _, kh, kw = layer.weight.shape
    height, width = x.shape[2], x.shape[3]
    out_h, out_w = (height - kh) // stride[0] + 1, (width - kw) // stride[1] + 1
    shifted = (x - layer.input_zero).to(torch.int32)
    weight = (layer.weight - layer.weight_zero.reshape(-1, 1, 1, 1)).to(torch.int32)
    acc = layer.bias.to(torch.int32).reshape(1, -1, 1, 1).expand(x.shape[0], -1, out_h, out_w).clone()
    for row in range(kh):
        for col in range(kw):
            rows = slice(row, row + stride[0] * (out_h - 1) + 1, stride[0])
            cols = slice(col, col + stride[1] * (out_w - 1) + 1, stride[1])
            window = shifted[:, :, rows, cols]
            acc += window * weight[:, 0, row, col].reshape(1, -1, 1, 1)
    return acc


def _matmul_int(x: torch.Tensor, layer: IntegerLayer) -> torch.Tensor:
    """sum_k (x - z_x)(w - z_w) + bias in int64, zero points subtracted before the product: the
    general path, for bit-widths whose integers do not fit a byte."""
    weight = layer.weight.reshape(layer.weight.shape[0], -1)
    return (x - layer.input_zero) @ (weight - layer.weight_zero.unsqueeze(1)).t() + layer.bias


def _input_range(x: torch.Tensor, layer: IntegerLayer) -> tuple[int, int]:
    """The integers the layer's input can hold: its grid's, or for a layer read back from a file, this batch's."""
    return layer.input_range if layer.input_range is not None else (int(x.min()), int(x.max()))


def _int8_operands(x: torch.Tensor, layer: IntegerLayer) -> tuple[torch.Tensor, int] | None:
    """(weights minus their offset as int8 [K, O], that offset) when the input is uint8-ranged and
    the weights fit int8 after subtracting 0 (signed) or 128 (unsigned); else None."""
    weight = layer.weight.reshape(layer.weight.shape[0], -1)
    low, high = int(weight.min()), int(weight.max())
    offset = 0 if -128 <= low and high <= 127 else BYTE_OFFSET if 0 <= low and high <= 255 else None
    x_low, x_high = _input_range(x, layer)
    if offset is None or x_low < 0 or x_high > 255 or weight.shape[1] > MAX_INT8_FAN_IN:
        return None
    return (weight - offset).to(torch.int8).t().contiguous(), offset


def _matmul_int8(x8: torch.Tensor, layer: IntegerLayer, operands: tuple[torch.Tensor, int]) -> torch.Tensor:
    """gemmlowp's zero-point corrections around torch's int8 x int8 -> int32 matrix product. With
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


def _linear_int(x: torch.Tensor, layer: IntegerLayer, centred: torch.Tensor | None = None) -> torch.Tensor:
    """A linear layer's accumulators: given `centred` (_centred_weights), a float GEMM of x - z_x by it,
    exact; with integer kernels only, the int8 path where it applies, else int64."""
    if centred is not None:
        out = x.to(centred.dtype, copy=True).sub_(layer.input_zero) @ centred.t()
        return out.to(torch.int64).add_(layer.bias)
    int8 = _int8_operands(x, layer)
    if int8 is None:
        return _matmul_int(x, layer)
    return _matmul_int8((x - BYTE_OFFSET).to(torch.int8), layer, int8)


def _max_pool_int(
    x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
) -> torch.Tensor:
    """Max-pool on integers (accumulators or quantized values); padding never wins a window."""
    if padding != (0, 0):  # int8-path accumulators are int32: widen so the pad value lies below them all
        x = x.to(torch.int64)
    return max_pool(x, kernel, stride, padding, INT32_MIN - 1)


# --- the engine -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Acc:
    """An op's value as integers at a known real scale, not yet on a grid: a layer's accumulators or
    an add's raw sum. `scale` is per channel (float64 [C]) or one value; `repeat` is how many flattened
    values each channel holds after a flatten; pending ReLU / ReLU6 become the requantization's clamp."""

    source: str
    scale: torch.Tensor
    repeat: int = 1
    relu: bool = False
    relu6: bool = False


@dataclass(frozen=True)
class _Grid:
    point: str  # the quantization point whose scale and zero point the integers use


@dataclass(frozen=True)
class Requantization:
    """Accumulators (or another grid's integers, minus its zero point) to one grid: x * M rounded once,
    plus the zero point, clamped (a pending ReLU clamps at the zero point, ReLU6 at the quantized 6)."""

    source: str
    real_multiplier: torch.Tensor  # float64, per channel or one value
    multiplier: torch.Tensor  # int64, M0
    shift: torch.Tensor  # int64
    repeat: int
    output_zero: int
    output_min: int
    output_max: int
    input_zero: int = 0  # subtracted first when the source is another grid

    def apply(self, x: torch.Tensor, channel_dim: int = 1, owned: bool = False) -> torch.Tensor:
        """`x` on this grid; `owned`: x is the caller's to overwrite (fresh accumulators nothing else reads)."""
        multiplier, shift = self.multiplier, self.shift
        if self.repeat > 1:
            multiplier, shift = multiplier.repeat_interleave(self.repeat), shift.repeat_interleave(self.repeat)
        shape = [1] * x.ndim
        if multiplier.numel() > 1:
            shape[channel_dim] = -1
        values = x.to(torch.int64) - self.input_zero if self.input_zero else x  # a new tensor when subtracted
        owned = owned or bool(self.input_zero)
        # TFLite saturates x * M to int32 before adding the zero point; the clamp after it does the same
        # wherever its range lies inside int32 shifted by the zero point (every grid's does)
        saturated_by_clamp = INT32_MIN + self.output_zero <= self.output_min and self.output_max <= (
            INT32_MAX + self.output_zero
        )
        multiplier, shift = multiplier.reshape(shape), shift.reshape(shape)
        if saturated_by_clamp:  # the zero point is added inside the rounding (one pass over memory fewer)
            scaled = multiply_by_quantized_multiplier(
                values, multiplier, shift, saturate=False, in_place=owned, offset=self.output_zero
            )
        else:
            scaled = multiply_by_quantized_multiplier(values, multiplier, shift, in_place=owned)
            scaled.add_(self.output_zero)
        return scaled.clamp_(self.output_min, self.output_max)


class IntegerNet:
    """The integer-only twin of a QuantizedNet whose every layer and input are quantized, walking the
    same model graph: integers between the quantized input and the integer logits.

    Every value is an integer. The products run, by default, on torch's float32 or float64 kernels,
    which are exact for them (_centred_weights says why) and several times faster than its int8 ones on
    CPUs without VNNI; `integer_kernels=True` runs torch's integer kernels only (the
    same integers: a test checks both, another that nothing but integer tensors is touched then)."""

    integer_kernels = False

    def __init__(self, qnet: QuantizedNet, integer_kernels: bool = False) -> None:
        self.integer_kernels = integer_kernels
        normalizations = [op.name for op in qnet.graph.ops if op.kind is OpKind.NORMALIZE]
        if normalizations:
            raise IntegerEngineError(
                f"the integer engine has no integer rule for a normalization by the sample's own statistics: "
                f"{', '.join(normalizations)} (the simulation runs it in float between a dequantize and a quantize)"
            )
        missing = float_parts(qnet)
        if missing:
            raise IntegerEngineError(
                f"the integer engine needs every layer and the input quantized; float: {', '.join(missing)}"
            )
        self.graph, self.plan, self.config = qnet.graph, qnet.plan, qnet.config
        self.points = {name: point.qparams for name, point in qnet.points.items()}
        if self.graph.ops[0].name not in self.points:
            raise IntegerEngineError("the integer engine needs the input quantized")
        for quant in qnet.layers.values():
            bound = accumulator_bound(quant)
            if bound > INT32_MAX:
                raise IntegerEngineError(
                    f"{quant.name}'s accumulators could reach {bound:.3g}, beyond int32, at "
                    f"{qnet.config.bits_label}; the integer engine runs up to 8 bits"
                )
        self.input_qparams = self.points[self.graph.ops[0].name]
        self._plan_values(qnet)
        # s_in * s_w / s_out per output channel in float64, before M0 approximates it (for diagnostics)
        self.real_multipliers = {name: r.real_multiplier for name, r in self._layer_requant.items()}
        self.layers = {name: self._integer_layer(qnet.layers[name]) for name in self.graph.layers}
        self._float_kernels: dict[str, torch.Tensor | None] = {}

    # --- building ---------------------------------------------------------------------------------
    def _requantization(self, value: _Acc | _Grid, point: str | None, logit_bits: int = 0) -> Requantization:
        """How `value` reaches `point`'s grid (None: the logits, at the finest accumulator scale divided
        by 2^logit_bits)."""
        if isinstance(value, _Grid):  # another grid's integers (a cat input)
            source, target = self.points[value.point], self.points[point]  # type: ignore[index]
            real = source.scale.double().reshape(1) / target.scale.double()
            problem = _multiplier_problem(f"the requantization into {point}", real)
            if problem:
                raise IntegerEngineError(problem)
            multiplier, shift = _fixed_point(real)
            zero = int(target.zero_point)
            return Requantization(
                value.point, real, multiplier, shift, 1, zero, target.qmin, target.qmax, int(source.zero_point)
            )
        if point is None:
            real = value.scale / value.scale.min() * 2.0**logit_bits
            zero, low, high = 0, (0 if value.relu or value.relu6 else INT32_MIN), INT32_MAX
        else:
            target = self.points[point]
            real = value.scale / target.scale.double()
            zero, low, high = int(target.zero_point), target.qmin, target.qmax
            if value.relu or value.relu6:
                low = max(low, zero)
            if value.relu6:
                high = min(high, quantized_six(target))
        problem = _multiplier_problem(value.source, real)
        if problem:
            raise IntegerEngineError(problem)
        multiplier, shift = _fixed_point(real)
        return Requantization(value.source, real, multiplier, shift, value.repeat, zero, low, high)

    def _plan_values(self, qnet: QuantizedNet) -> None:
        """One walk of the graph without data: what each op's value is (accumulators or a grid), and
        every requantization and add multiplier, so each is checked before anything runs."""
        values: dict[str, _Acc | _Grid] = {}
        self._requant: dict[str, Requantization] = {}  # op -> requantization of its value to its grid
        self._cat_inputs: dict[tuple[str, int], Requantization] = {}
        self._adds: dict[
            str, tuple[tuple[int, int], tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
        ] = {}
        self._layer_requant: dict[str, Requantization] = {}
        # ReLU / ReLU6 of a tensor on a grid: the clamp itself (on accumulators it waits for the requantization)
        self._grid_clamps: dict[str, tuple[int, int | None]] = {}
        self._tables: dict[str, tuple[int, torch.Tensor]] = {}  # activation -> (its input's qmin, table)
        for op in self.graph.ops:
            inputs = [values[name] for name in op.inputs]
            value: _Acc | _Grid
            if op.kind is OpKind.INPUT:
                value = _Grid(op.name)
            elif op.is_layer:
                quant = qnet.layers[op.name]
                wq, iq = quant.weight_qparams, quant.input_qparams
                assert wq is not None and iq is not None
                if not isinstance(inputs[0], _Grid) or self.points[inputs[0].point] is not iq:
                    raise IntegerEngineError(f"{op.name}'s input is not on the grid its bias was quantized for")
                bias_scale = iq.scale.float() * wq.scale.float()
                channels = quant.weight.shape[0]
                problem = _multiplier_problem(op.name, torch.ones(1), bias_scale)
                if problem:
                    raise IntegerEngineError(problem)
                value = _Acc(op.name, iq.scale.double() * _per_channel(wq.scale.double(), channels))
            elif op.kind in (OpKind.RELU, OpKind.RELU6, OpKind.MAXPOOL, OpKind.FLATTEN, OpKind.LOG_SOFTMAX):
                value = inputs[0]
                if isinstance(value, _Grid) and op.kind in (OpKind.RELU, OpKind.RELU6):
                    qparams = self.points[value.point]
                    high = quantized_six(qparams) if op.kind is OpKind.RELU6 else None
                    self._grid_clamps[op.name] = (int(qparams.zero_point), high)
                elif isinstance(value, _Acc) and op.kind is OpKind.RELU:
                    value = replace(value, relu=True)
                elif isinstance(value, _Acc) and op.kind is OpKind.RELU6:
                    value = replace(value, relu6=True)
                elif isinstance(value, _Acc) and op.kind is OpKind.FLATTEN and value.scale.numel() > 1:
                    shape = self.graph.op(op.inputs[0]).shape
                    value = replace(value, repeat=value.repeat * int(torch.tensor(shape[2:]).prod()))
            elif op.kind is OpKind.AVGPOOL:
                value = inputs[0]
            elif op.kind is OpKind.LOOKUP:  # a table from the input's levels to its own (the simulation's)
                if not isinstance(inputs[0], _Grid) or inputs[0].point != qnet.plan.grid.get(op.inputs[0]):
                    raise IntegerEngineError(f"{op.name}'s input is not on the grid its table was made for")
                self._tables[op.name] = qnet.lookup_tables[op.name]
                value = _Grid(op.name)
            elif op.kind is OpKind.ADD:
                grids = [v for v in inputs if isinstance(v, _Grid)]
                assert len(grids) == 2  # the plan puts both inputs of an add on grids
                scales = tuple(float(self.points[g.point].scale) for g in grids)
                multipliers, sum_scale = add_multipliers(scales)  # type: ignore[arg-type]
                real = torch.tensor(multipliers, dtype=torch.float64)
                problem = _multiplier_problem(f"{op.name}'s input rescaling", real)
                if problem:
                    raise IntegerEngineError(problem)
                fixed = [_fixed_point(real[i : i + 1]) for i in range(2)]
                zeros = (int(self.points[grids[0].point].zero_point), int(self.points[grids[1].point].zero_point))
                self._adds[op.name] = (zeros, (fixed[0][0], fixed[1][0]), (fixed[0][1], fixed[1][1]))
                value = _Acc(op.name, torch.tensor([sum_scale], dtype=torch.float64))
            elif op.kind is OpKind.CAT:
                for index, source in enumerate(inputs):
                    if not (isinstance(source, _Grid) and source.point == op.name):
                        self._cat_inputs[(op.name, index)] = self._requantization(source, op.name)
                        if isinstance(source, _Acc):  # a layer's accumulators requantized straight into the cat
                            self._layer_requant.setdefault(source.source, self._cat_inputs[(op.name, index)])
                value = _Grid(op.name)
            else:
                raise IntegerEngineError(f"the integer engine has no rule for {op.kind}")
            if op.name in self.points and isinstance(value, _Acc):
                self._requant[op.name] = self._requantization(value, op.name)
                self._layer_requant.setdefault(value.source, self._requant[op.name])
                value = _Grid(op.name)
            values[op.name] = value
        out = values[self.graph.output]
        self._output_point = out.point if isinstance(out, _Grid) else None
        self.logit_bits = 0
        if isinstance(out, _Acc):
            # Per-channel accumulators have scales s_in * s_w[c]: argmax needs one common scale. The finest
            # of them alone left a small classifier's logits a few hundred levels, and classes the float
            # logits tell apart tied; 2^k finer, as fine as int32 allows for any input, they do not.
            ratios = out.scale / out.scale.min()
            self.logit_bits = logit_extra_bits(accumulator_bounds(qnet.layers[out.source]), ratios)
            self._requant["<logits>"] = self._requantization(out, None, self.logit_bits)
            self._layer_requant.setdefault(out.source, self._requant["<logits>"])

    def _integer_layer(self, quant: LayerQuant) -> IntegerLayer:
        wq, iq = quant.weight_qparams, quant.input_qparams
        assert wq is not None and iq is not None and quant.weight_int is not None and quant.bias_int is not None
        channels = quant.weight.shape[0]
        requant = self._layer_requant.get(quant.name)
        empty = torch.zeros(channels, dtype=torch.int64)
        return IntegerLayer(
            name=quant.name,
            weight=quant.weight_int.to(torch.int64),
            weight_zero=_per_channel(wq.zero_point.to(torch.int64), channels).clone(),
            input_zero=int(iq.zero_point),
            bias=quant.bias_int.to(torch.int64),
            multiplier=empty if requant is None else requant.multiplier,
            shift=empty if requant is None else requant.shift,
            output_zero=0 if requant is None else requant.output_zero,
            output_min=0 if requant is None else requant.output_min,
            output_max=0 if requant is None else requant.output_max,
            input_range=(iq.qmin, iq.qmax),
        )

    # --- running ----------------------------------------------------------------------------------
    def quantize_input(self, images: torch.Tensor) -> torch.Tensor:
        """The only float step: real images to the input's integers (int64)."""
        from qcore.quantize.quant import quantize

        return quantize(images, self.input_qparams).to(torch.int64)

    def _layer(self, op: Op, x: torch.Tensor) -> torch.Tensor:
        layer = self.layers[op.name]
        centred = None if self.integer_kernels else self._centred_weights(x, layer)
        if op.kind is OpKind.CONV:
            attrs = op.attrs
            return _conv_int(x, layer, attrs["stride"], attrs["padding"], attrs["groups"], centred)  # type: ignore[arg-type]
        return _linear_int(x, layer, centred)

    def _centred_weights(self, x: torch.Tensor, layer: IntegerLayer) -> torch.Tensor | None:
        """The layer's float kernel, made once where its input range is static (see _centred_weights)."""
        if layer.input_range is None:
            return _centred_weights(x, layer)
        if layer.name not in self._float_kernels:
            self._float_kernels[layer.name] = _centred_weights(x, layer)
        return self._float_kernels[layer.name]

    def _compute(self, op: Op, args: list[torch.Tensor]) -> torch.Tensor:
        """One op on integers, before any requantization to its grid."""
        kind = op.kind
        if op.is_layer:
            return self._layer(op, args[0])
        if kind in (OpKind.RELU, OpKind.RELU6):
            clamp = self._grid_clamps.get(op.name)
            return args[0] if clamp is None else torch.clamp(args[0], min=clamp[0], max=clamp[1])
        if kind is OpKind.MAXPOOL:
            return _max_pool_int(args[0], op.attrs["kernel"], op.attrs["stride"], op.attrs["padding"])  # type: ignore[arg-type]
        if kind is OpKind.FLATTEN:
            return args[0].flatten(1)
        if kind is OpKind.AVGPOOL:
            return average_pool_int(args[0], op.attrs["kernel"], op.attrs["stride"])  # type: ignore[arg-type]
        if kind is OpKind.LOOKUP:
            low, table = self._tables[op.name]
            return table[args[0].to(torch.int64) - low]
        if kind is OpKind.ADD:
            zeros, multipliers, shifts = self._adds[op.name]
            return add_int(args[0], args[1], zeros, multipliers, shifts)
        if kind is OpKind.CAT:
            parts = [
                self._cat_inputs[(op.name, i)].apply(v) if (op.name, i) in self._cat_inputs else v
                for i, v in enumerate(args)
            ]
            return torch.cat(parts, dim=1)
        return args[0]  # log_softmax: argmax needs none

    def _walk(
        self,
        x: torch.Tensor,
        keep: dict[str, torch.Tensor] | None = None,
        feed: dict[str, torch.Tensor] | None = None,
        before: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The integer logits of input integers `x`. `keep` collects every op's integers (a point's after
        its requantization), `before` each requantized op's value before its requantization (the
        accumulators, pooled where a max-pool came first), and `feed` replaces a point's integers by
        given ones before anything reads them (the diagnosis feeds the simulation's own)."""
        values: dict[str, torch.Tensor] = {}
        for index, op in enumerate(self.graph.ops):
            value = x if op.kind is OpKind.INPUT else self._compute(op, [values[name] for name in op.inputs])
            requant = self._requant.get(op.name)
            if requant is not None:
                if before is not None:
                    before[op.name] = value
                # a layer's or an add's accumulators are new tensors that only this requantization reads
                # (unless `before` keeps them): it writes into them instead of into new memory
                fresh = before is None and (op.is_layer or op.kind is OpKind.ADD)
                value = requant.apply(value, owned=fresh)
            if keep is not None:
                keep[op.name] = value
            if feed is not None and op.name in feed:
                value = feed[op.name]
            values[op.name] = value
            for name in self.graph.freed_after(index):
                del values[name]
        out = values[self.graph.output]
        if self._output_point is not None:
            return out - int(self.points[self._output_point].zero_point)
        if before is not None:
            before["<logits>"] = out
        return self._requant["<logits>"].apply(out)

    def logits_int(self, x: torch.Tensor) -> torch.Tensor:
        """Integer logits for integer input [N, C, H, W] (every value an integer; with integer_kernels, no
        floating-point tensor is involved at all)."""
        if x.is_floating_point():
            raise TypeError("logits_int takes the quantized input integers; use quantize_input first")
        return self._walk(x)

    def values_int(
        self,
        x: torch.Tensor,
        feed: dict[str, torch.Tensor] | None = None,
        before: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every op's integers for integer input (a point's after its requantization), and "<logits>"."""
        kept: dict[str, torch.Tensor] = {}
        kept["<logits>"] = self._walk(x, kept, feed, before)
        return kept

    def layer_accumulators(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One layer's accumulators (bias included) for its input integers, nothing after it applied."""
        op = self.graph.op(name)
        return self._layer(op, x.flatten(1) if op.kind is OpKind.LINEAR else x)

    def layer_requantization(self, name: str) -> Requantization:
        """How layer `name`'s accumulators reach the grid its output lies on (or the logits), applied
        to the layer's own output: M0 and the shift per channel, the zero point, the clamp."""
        return replace(self._layer_requant[name], repeat=1)

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Class predictions (int64) for real images: argmax of the integer logits. Its values are int64,
        so its batches are half the simulation's (64 images of fashion-resnet ran fastest, 1.7x faster than 128)."""
        batch_size = batch_size or batch_size_for(self.graph, BATCH_VALUES // 2)
        return torch.cat(
            [
                self.logits_int(self.quantize_input(images[start : start + batch_size])).argmax(dim=1)
                for start in range(0, len(images), batch_size)
            ]
        )
