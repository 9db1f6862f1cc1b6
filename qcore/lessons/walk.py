"""One image on integers: the integer engine's computation for one output of each layer, written out.

`explain` returns, for each layer, every (input integer, weight integer) pair of one output's dot
product, the int32 accumulator, the fixed-point multiplier and shift, and the requantized output,
taken from the integer engine's own tensors for that image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from qcore.analysis.tables import quantize_for
from qcore.config import QuantConfig
from qcore.data import Dataset
from qcore.inference.integer import INT32_MAX, IntegerNet, multiply_by_quantized_multiplier
from qcore.models.net import Net, capture_layers
from qcore.quantize.qmodel import QuantizedNet


@dataclass(frozen=True)
class LayerWalk:
    name: str
    position: list[int]  # the output index, channel first: [c, row, col] before the pool for convs, [j] for fc
    input_zero_point: int
    weight_zero_point: int
    terms: list[list[int]]  # every [input_int, weight_int] pair of the dot product, in order
    bias: int
    accumulator: int  # sum((x - zx) * (w - zw)) + bias
    multiplier: int  # M0 in [2^30, 2^31)
    shift: int  # TFLite's convention: M = M0 * 2^(shift - 31)
    real_multiplier: float  # M0 * 2^(shift - 31): what they stand for
    exact_multiplier: float  # s_in * s_w / s_out in float64
    scaled: int  # the accumulator after the high multiply and the shift, before the zero point and clamp
    output_zero_point: int
    output_min: int  # the clamp's lower end: the zero point where a ReLU follows
    output_max: int
    output: int  # the requantized, clamped value at `position` (fc2: the logit at the common scale)
    pooled_window: list[int]  # convs: the 2x2 window of requantized outputs that max-pool reduces
    pooled: int | None  # convs: the max-pool's output (the next layer's input integer)
    input_ints: list[list[int]]  # convs: the input channel-0 patch behind this output, for display
    feature_map_int: list[list[int]]  # convs: this output channel's requantized map after the pool
    feature_map_float: list[list[float]]  # convs: the float model's map for the same channel


@dataclass(frozen=True)
class Walk:
    image: int
    label: int
    prediction: int
    float_prediction: int
    logits_int32: list[int]
    float_probabilities: list[float]
    layers: list[LayerWalk]

    def to_dict(self) -> dict[str, object]:
        """The CLI's JSON: the fields the issue names (the display-only maps left out)."""
        display_only = ("input_ints", "feature_map_int", "feature_map_float")
        return {
            "image": self.image,
            "label": self.label,
            "prediction": self.prediction,
            "float_prediction": self.float_prediction,
            "logits_int32": self.logits_int32,
            "float_probabilities": self.float_probabilities,
            "layers": [{k: v for k, v in asdict(layer).items() if k not in display_only} for layer in self.layers],
        }


def _check_position(name: str, position: Sequence[int], shape: Sequence[int]) -> list[int]:
    if len(position) != len(shape) or any(not 0 <= p < s for p, s in zip(position, shape, strict=True)):
        raise ValueError(f"{name}: position {list(position)} outside the output's shape {list(shape)}")
    return [int(p) for p in position]


@torch.inference_mode()
def explain(
    model: Net,
    data: Dataset,
    config: QuantConfig,
    image: int,
    positions: dict[str, Sequence[int]] | None = None,
    qnet: QuantizedNet | None = None,
) -> Walk:
    """The integer walk of test image `image`. `positions` picks each layer's output (channel
    first); by default the largest requantized output of each layer (fc2: the predicted digit).
    Pass `qnet` to walk a quantized model built elsewhere (a QAT checkpoint's) instead of calibrating."""
    if not 0 <= image < len(data.test):
        raise ValueError(f"image must be between 0 and {len(data.test) - 1} (got {image})")
    positions = positions or {}
    qnet = quantize_for(model, data, config) if qnet is None else qnet
    engine = IntegerNet(qnet)  # raises IntegerEngineError for configs that cannot run on integers
    x_real = data.test.images[image : image + 1]
    x = engine.quantize_input(x_real)
    reference = qnet.float_model if qnet.float_model is not None else model
    # each layer's float output as the next layer reads it: the feature map beside the integer one
    float_inputs = capture_layers(reference, x_real, "input")
    layer_names = engine.graph.layers
    float_log_probs = model(x_real)[0]
    walks = []
    for index, name in enumerate(layer_names):
        layer = engine.layers[name]
        is_conv = name.startswith("conv")
        next_x = engine.layer_int(name, x)  # the engine's own output: the next layer's input integers
        acc = engine.layer_accumulators(name, x)  # [1, O, H, W] or [1, O]
        requantized = engine.requantize(name, acc)[0]  # every output before the pool, as the engine requantizes
        default = list(divmod_index(int(requantized.argmax()), requantized.shape))
        where = _check_position(name, positions.get(name, default), requantized.shape)
        channel = where[0]
        zx, zw = layer.input_zero, int(layer.weight_zero[channel])
        if is_conv:
            _, row, col = where
            kernel = layer.weight.shape[-1]
            patch = x[0, :, row : row + kernel, col : col + kernel]
            terms = [[int(a), int(b)] for a, b in zip(patch.flatten(), layer.weight[channel].flatten(), strict=True)]
            top, left = row - row % 2, col - col % 2
            window = requantized[channel, top : top + 2, left : left + 2].flatten().tolist()
            pooled = max(window)
            input_patch = patch[0].tolist()
            feature_int = next_x[0, channel].tolist()
            following = float_inputs[layer_names[index + 1]][0].reshape(next_x[0].shape)
            feature_float = following[channel].tolist()
        else:
            terms = [[int(a), int(b)] for a, b in zip(x.flatten(1)[0], layer.weight[channel], strict=True)]
            window, pooled, input_patch, feature_int, feature_float = [], None, [], [], []
        shift = int(layer.shift[channel])
        multiplier = int(layer.multiplier[channel])
        reals = engine.real_multipliers[name].reshape(-1)
        exact = float(reals[channel if reals.numel() > 1 else 0])
        walks.append(
            LayerWalk(
                name=name,
                position=where,
                input_zero_point=zx,
                weight_zero_point=zw,
                terms=terms,
                bias=int(layer.bias[channel]),
                accumulator=int(acc[0][tuple(where)]),
                multiplier=multiplier,
                shift=shift,
                real_multiplier=multiplier * 2.0 ** (shift - 31),
                exact_multiplier=exact,
                scaled=int(
                    multiply_by_quantized_multiplier(
                        acc[0][tuple(where)].reshape(1),
                        layer.multiplier[channel : channel + 1],
                        layer.shift[channel : channel + 1],
                    )[0]
                ),
                output_zero_point=layer.output_zero,
                output_min=layer.output_min,
                output_max=min(layer.output_max, INT32_MAX),
                output=int(requantized[tuple(where)]),
                pooled_window=[int(v) for v in window],
                pooled=None if pooled is None else int(pooled),
                input_ints=input_patch,
                feature_map_int=feature_int,
                feature_map_float=feature_float,
            )
        )
        x = next_x
    logits = x[0]
    return Walk(
        image=image,
        label=int(data.test.labels[image]),
        prediction=int(logits.argmax()),
        float_prediction=int(float_log_probs.argmax()),
        logits_int32=[int(v) for v in logits],
        float_probabilities=[float(p) for p in float_log_probs.exp()],
        layers=walks,
    )


def divmod_index(flat: int, shape: Sequence[int]) -> tuple[int, ...]:
    """The multi-index of a flat (row-major) index."""
    index = []
    for size in reversed(list(shape)):
        flat, rest = divmod(flat, size)
        index.append(rest)
    return tuple(reversed(index))
