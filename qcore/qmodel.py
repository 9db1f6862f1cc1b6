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
from qcore.methods import (
    MethodsReport,
    adaround,
    channel_means,
    choose_bits,
    equalize,
    sensitivities,
    timed,
)
from qcore.model import LAYER_NAMES, Net, capture_layers, layer
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
    weight_bits: int | None = None  # None: float weights

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

    def __init__(
        self,
        layers: dict[str, LayerQuant],
        config: QuantConfig,
        float_model: Net | None = None,
        methods: MethodsReport | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.layers = layers
        # The float model the quantizer saw (equalized when that method ran): the reference for
        # activation statistics and SQNR. Kept out of the module tree so it is not a submodule.
        self.__dict__["float_model"] = float_model
        self.methods = methods or MethodsReport()
        self._weights = {name: q.effective_weight() for name, q in layers.items()}
        self._biases = {name: q.effective_bias() for name, q in layers.items()}

    def _input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        qparams = self.layers[name].input_qparams
        return x if qparams is None else fake_quantize(x, qparams)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_outputs(x)[0]

    def forward_with_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Log-probabilities and each layer's output before its activation."""
        log_probs, outputs, _ = self.trace(x)
        return log_probs, outputs

    def trace(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Log-probabilities, each layer's output before its activation, and each layer's input as
        the layer sees it (fake-quantized where its input is quantized)."""
        w, b = self._weights, self._biases
        outputs, inputs = {}, {}
        x = inputs["conv1"] = self._input("conv1", x)
        x = outputs["conv1"] = F.conv2d(x, w["conv1"], b["conv1"])
        x = inputs["conv2"] = self._input("conv2", F.relu(F.max_pool2d(x, 2, 2)))  # Net.forward's order
        x = outputs["conv2"] = F.conv2d(x, w["conv2"], b["conv2"])
        x = inputs["fc1"] = self._input("fc1", F.relu(F.max_pool2d(x, 2, 2)).flatten(1))
        x = outputs["fc1"] = F.linear(x, w["fc1"], b["fc1"])
        x = inputs["fc2"] = self._input("fc2", F.relu(x))
        x = outputs["fc2"] = F.linear(x, w["fc2"], b["fc2"])
        return F.log_softmax(x, dim=1), outputs, inputs


def float_parts(qnet: QuantizedNet) -> list[str]:
    """Layers whose weights or input stay float: an integer-only pipeline cannot run them."""
    return [n for n in LAYER_NAMES if qnet.layers[n].weight_qparams is None or qnet.layers[n].input_qparams is None]


def weight_qparams(weight: torch.Tensor, config: QuantConfig, bits: int | None = None) -> QParams:
    """Weight qparams at `bits` (default: config.weight_bits) under the config's range rule."""
    bits = config.weight_bits if bits is None else bits
    granularity = Granularity(config.granularity)
    per_channel = granularity is Granularity.PER_CHANNEL
    if config.weight_range == "mse":
        low, high = mse_optimal_weight_range(weight, bits, Scheme(config.scheme), per_channel)
    else:
        low, high = tensor_range(weight, granularity, axis=0)
    axis = 0 if per_channel else None
    return choose_qparams(low, high, bits, Scheme(config.scheme), axis)


def input_is_quantized(name: str, config: QuantConfig) -> bool:
    if name in config.float_layers:
        return False
    return config.quantize_input or name != LAYER_NAMES[0]


def quantize_layers(
    model: Net, config: QuantConfig, activations: dict[str, ActivationStats], bits: dict[str, int] | None = None
) -> dict[str, LayerQuant]:
    """Choose every layer's qparams from the float weights and calibrated activation ranges
    (weights at `bits[name]` when given, else config.weight_bits), rounding to nearest."""
    result = {}
    for name in LAYER_NAMES:
        module = layer(model, name)
        weight, bias = module.weight.detach().clone(), module.bias.detach().clone()
        quant = LayerQuant(name, weight, bias, None, None, None, None, activations.get(name))
        if name not in config.float_layers:
            quant.weight_bits = config.weight_bits if bits is None else bits[name]
            quant.weight_qparams = weight_qparams(weight, config, quant.weight_bits)
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
    """Calibrate on `batches` (training images) and build the quantized twin, applying the
    config's methods in METHODS' order (see qcore.methods)."""
    config.validate()
    report = MethodsReport()
    if "equalization" in config.methods:
        with timed(report, "equalization"):
            model, report.equalization = equalize(model)
    images = torch.cat(list(batches))
    bits = None
    if config.weight_bits_budget > 0:
        with timed(report, "mixed precision"):
            report.sensitivity = sensitivities(
                model, images, lambda w, b: fake_quantize(w, weight_qparams(w, config, b))
            )
            bits = choose_bits(report.sensitivity, config.weight_bits_budget)
    calibrated = [name for name in LAYER_NAMES if input_is_quantized(name, config)]
    activations = calibrate(model, batches, config.observer, config.act_bits, calibrated) if calibrated else {}
    layers = quantize_layers(model, config, activations, bits)
    report.weight_bits = {n: q.weight_bits for n, q in layers.items() if q.weight_bits is not None}
    if "adaround" in config.methods:
        with timed(report, "adaround"):
            apply_adaround(model, layers, config, images, report)
    if "bias-correction" in config.methods:
        with timed(report, "bias-correction"):
            apply_bias_correction(model, layers, config, images, report)
    return QuantizedNet(layers, config, model, report).eval()


def apply_adaround(
    model: Net, layers: dict[str, LayerQuant], config: QuantConfig, images: torch.Tensor, report: MethodsReport
) -> None:
    """Replace nearest rounding by AdaRound layer by layer: each layer learns to map the input it
    really gets (from the layers before it, already quantized) to the float model's output."""
    float_inputs = capture_layers(model, images, "input")
    for name, quant in layers.items():
        if quant.weight_qparams is None:
            continue
        with torch.inference_mode():
            _, _, quantized = QuantizedNet(layers, config).trace(images)
        weight_int, info = adaround(
            quant.weight, quant.weight_qparams, float_inputs[name], quantized[name], seed=config.seed
        )
        quant.weight_int = weight_int
        report.adaround[name] = info


def apply_bias_correction(
    model: Net, layers: dict[str, LayerQuant], config: QuantConfig, images: torch.Tensor, report: MethodsReport
) -> None:
    """Layer by layer, add the mean float-minus-quantized output per channel to the bias."""
    float_outputs = capture_layers(model, images, "output")
    for name in LAYER_NAMES:
        quant = layers[name]
        if quant.weight_qparams is None:
            continue
        with torch.inference_mode():
            _, outputs = QuantizedNet(layers, config).forward_with_outputs(images)
        shift = channel_means(float_outputs[name]) - channel_means(outputs[name])
        quant.bias = quant.bias + shift
        if quant.bias_scale is not None:
            quant.bias_int = quantize_bias(quant.bias, quant.bias_scale, BIAS_BITS)
        report.bias_shift[name] = shift.tolist()
