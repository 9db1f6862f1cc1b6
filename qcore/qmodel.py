"""The quantized twin of a trained Net: fake-quant simulation on the same layers.

Each quantized layer sees its input fake-quantized with the calibrated activation qparams
(affine, `act_bits`), its weights fake-quantized (`scheme`, `granularity`, `weight_bits`) and its
bias as int32 at s_in * s_w with zero point 0, exactly what an integer pipeline would add to its
int32 accumulator. The last layer's output is left as that accumulator (logits at s_in * s_w), so
argmax needs no further requantization. A layer named in `float_layers` keeps float weights and
a float input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qcore.calibrate import ActivationStats, calibrate, mse_optimal_weight_range
from qcore.config import QuantConfig
from qcore.data import Split, calibration_batches
from qcore.model import LAYER_NAMES, Net, layer
from qcore.quant import (
    Granularity,
    QParams,
    Scheme,
    choose_qparams,
    dequantize,
    dequantize_bias,
    fake_quantize,
    quantize,
    quantize_bias,
    tensor_range,
)

BIAS_BITS = 32


@dataclass
class LayerQuant:
    """Everything the quantizer decided for one layer."""

    name: str
    weight: torch.Tensor  # float original
    bias: torch.Tensor  # float original
    weight_qparams: QParams | None  # None: layer kept float
    weight_int: torch.Tensor | None
    input_qparams: QParams | None  # None: input kept float
    bias_int: torch.Tensor | None  # int32-range values at s_in * s_w; None when the input is float
    activation: ActivationStats | None  # calibration statistics of this layer's input

    @property
    def is_float(self) -> bool:
        return self.weight_qparams is None

    @property
    def bias_scale(self) -> torch.Tensor | None:
        if self.input_qparams is None or self.weight_qparams is None:
            return None
        return self.input_qparams.scale * self.weight_qparams.scale

    def effective_weight(self) -> torch.Tensor:
        if self.weight_int is None or self.weight_qparams is None:
            return self.weight
        return dequantize(self.weight_int, self.weight_qparams)

    def effective_bias(self) -> torch.Tensor:
        if self.bias_int is None or self.bias_scale is None:
            return self.bias
        return dequantize_bias(self.bias_int, self.bias_scale)


class QuantizedNet(nn.Module):
    """Net's forward with fake-quantized inputs, weights and int32 biases."""

    def __init__(self, layers: dict[str, LayerQuant], config: QuantConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = layers
        self._weights = {name: q.effective_weight() for name, q in layers.items()}
        self._biases = {name: q.effective_bias() for name, q in layers.items()}

    def _input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        qparams = self.layers[name].input_qparams
        return x if qparams is None else fake_quantize(x, qparams)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self._weights, self._biases
        x = F.conv2d(self._input("conv1", x), w["conv1"], b["conv1"])
        x = F.relu(F.max_pool2d(x, 2, 2))  # the same order as Net.forward
        x = F.conv2d(self._input("conv2", x), w["conv2"], b["conv2"])
        x = F.relu(F.max_pool2d(x, 2, 2))
        x = F.relu(F.linear(self._input("fc1", x.flatten(1)), w["fc1"], b["fc1"]))
        x = F.linear(self._input("fc2", x), w["fc2"], b["fc2"])
        return F.log_softmax(x, dim=1)


def float_parts(qnet: QuantizedNet) -> list[str]:
    """Layers whose weights or input stay float: an integer-only pipeline cannot run them."""
    return [n for n in LAYER_NAMES if qnet.layers[n].weight_qparams is None or qnet.layers[n].input_qparams is None]


def weight_qparams(weight: torch.Tensor, config: QuantConfig) -> QParams:
    granularity = Granularity(config.granularity)
    per_channel = granularity is Granularity.PER_CHANNEL
    if config.weight_range == "mse":
        low, high = mse_optimal_weight_range(weight, config.weight_bits, Scheme(config.scheme), per_channel)
    else:
        low, high = tensor_range(weight, granularity, axis=0)
    axis = 0 if per_channel else None
    return choose_qparams(low, high, config.weight_bits, Scheme(config.scheme), axis)


def input_is_quantized(name: str, config: QuantConfig) -> bool:
    if name in config.float_layers:
        return False
    return config.quantize_input or name != LAYER_NAMES[0]


def quantize_layers(model: Net, config: QuantConfig, activations: dict[str, ActivationStats]) -> dict[str, LayerQuant]:
    """Choose every layer's qparams from the float weights and calibrated activation ranges."""
    result = {}
    for name in LAYER_NAMES:
        module = layer(model, name)
        weight, bias = module.weight.detach().clone(), module.bias.detach().clone()
        quant = LayerQuant(name, weight, bias, None, None, None, None, activations.get(name))
        if name not in config.float_layers:
            quant.weight_qparams = weight_qparams(weight, config)
            quant.weight_int = quantize(weight, quant.weight_qparams)
        if input_is_quantized(name, config) and quant.activation is not None:
            stats = quant.activation
            quant.input_qparams = choose_qparams(stats.clip_min, stats.clip_max, config.act_bits, Scheme.ASYMMETRIC)
            scale = quant.bias_scale
            assert scale is not None  # both input and weights are quantized here
            quant.bias_int = quantize_bias(bias, scale, BIAS_BITS)
        result[name] = quant
    return result


def calibration_data(train: Split, config: QuantConfig) -> list[torch.Tensor]:
    return calibration_batches(train, config.calib_batches, config.batch_size, config.seed)


def quantize_model(model: Net, config: QuantConfig, batches: Sequence[torch.Tensor]) -> QuantizedNet:
    """Calibrate on `batches` (training images) and build the quantized twin."""
    config.validate()
    calibrated = [name for name in LAYER_NAMES if input_is_quantized(name, config)]
    activations = calibrate(model, batches, config.observer, config.act_bits, calibrated) if calibrated else {}
    return QuantizedNet(quantize_layers(model, config, activations), config).eval()
