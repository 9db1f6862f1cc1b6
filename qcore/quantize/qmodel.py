"""The quantized twin of a float model: fake-quant simulation over its model graph (qcore.graph).

Each quantized layer sees its input fake-quantized with the calibrated activation qparams
(affine, `act_bits`), its weights fake-quantized (`scheme`, `granularity`, `weight_bits`) and its
bias as int32 at s_in * s_w with zero point 0, exactly what an integer pipeline would add to its
int32 accumulator. The last layer's output is left as that accumulator (logits at s_in * s_w), so
argmax needs no further requantization. A layer named in `float_layers` keeps float weights and
a float input. Adds, cats and average pools are quantized at the points qcore.graph.points
chooses, and rounded where the integer engine rounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from qcore import progress
from qcore.data import Split, calibration_batches
from qcore.graph import GraphRun, ModelGraph, ModelGraphModule, Op, OpKind, QuantPlan, capture, model_graph, quant_plan
from qcore.quantize.calibrate import ActivationStats, Memo, calibrate_points, mse_optimal_weight_range, tensors_digest
from qcore.quantize.config import QuantConfig
from qcore.quantize.integer_rules import average_pool_int
from qcore.quantize.methods import (
    MethodsReport,
    adaround,
    channel_means,
    choose_bits,
    equalize,
    parameter_counts,
    sensitivities,
    timed,
)
from qcore.quantize.quant import (
    Granularity,
    QParams,
    Scheme,
    choose_qparams,
    dequantize,
    dequantize_bias,
    fake_quantize,
    lookup_table,
    quantize,
    quantize_bias,
    tensor_range,
)
from qcore.quantize.reconstruction import reconstruct_blocks

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


@dataclass(frozen=True)
class QuantPoint:
    """A tensor of the graph with its own observer and qparams (see qcore.graph.points)."""

    name: str
    qparams: QParams
    activation: ActivationStats | None  # None: qparams not calibrated here (a QAT checkpoint's)


def _kernel_layout(weight: torch.Tensor) -> torch.Tensor:
    return weight.contiguous(memory_format=torch.channels_last) if weight.ndim == 4 else weight


class _Simulation(GraphRun):
    """The model graph with fake-quantized layer inputs and weights, int32 biases, and every other
    quantized tensor (add inputs, cat, average pooling, ReLU6 on a grid) on its grid."""

    def __init__(
        self,
        qnet: QuantizedNet,
        outputs: dict[str, torch.Tensor],
        inputs: dict[str, torch.Tensor],
        points: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(qnet.graph)
        self.qnet, self.outputs, self.inputs, self.points = qnet, outputs, inputs, points

    def weight(self, op: Op) -> torch.Tensor:
        return self.qnet._weights[op.name]

    def bias(self, op: Op) -> torch.Tensor:
        return self.qnet._biases[op.name]

    def layer_input(self, op: Op, x: torch.Tensor) -> torch.Tensor:
        qparams = self.qnet.layers[op.name].input_qparams
        x = self.inputs[op.name] = x if qparams is None else fake_quantize(x, qparams)
        return x

    def layer_output(self, op: Op, y: torch.Tensor) -> None:
        self.outputs[op.name] = y

    def after(self, op: Op, value: torch.Tensor) -> torch.Tensor:
        if self.points is not None and op.name in self.qnet.points:
            self.points[op.name] = value
        qparams = self.qnet._quantize_after.get(op.name)
        return value if qparams is None else fake_quantize(value, qparams)

    def cat_input(self, op: Op, value: torch.Tensor) -> torch.Tensor:
        return fake_quantize(value, self.qnet.points[op.name].qparams)

    def avg_pool(self, op: Op, x: torch.Tensor) -> torch.Tensor:
        """On the integers, with the engine's own rounded division; the grid is the input's."""
        qparams = self.qnet.points[self.qnet.plan.grid[op.inputs[0]]].qparams
        return dequantize(rounded_average_levels(x, qparams, op), qparams)

    def lookup(self, op: Op, x: torch.Tensor) -> torch.Tensor:
        """The activation's table read at the input's integers (the engine's very table), dequantized."""
        source = self.qnet.points[self.qnet.plan.grid[op.inputs[0]]].qparams
        low, table = self.qnet.lookup_tables[op.name]
        levels = quantize(x.detach(), source).to(torch.int64) - low
        return dequantize(table[levels], self.qnet.points[op.name].qparams)


def rounded_average_levels(x: torch.Tensor, qparams: QParams, op: Op) -> torch.Tensor:
    """The integers of an average pool of `x` (on `qparams`' grid) as the integer engine computes them
    (qcore.quantize.integer_rules.average_pool_int: the window's sum divided rounding half up)."""

    q = quantize(x.detach(), qparams).to(torch.int64)
    return average_pool_int(q, op.attrs["kernel"], op.attrs["stride"])  # type: ignore[arg-type]


class QuantizedNet(nn.Module):
    """The model graph with fake-quantized inputs, weights and int32 biases (the simulation)."""

    def __init__(
        self,
        layers: dict[str, LayerQuant],
        config: QuantConfig,
        float_model: nn.Module | None = None,
        methods: MethodsReport | None = None,
        *,
        graph: ModelGraph,
        plan: QuantPlan,
        points: dict[str, QuantPoint],
    ) -> None:
        super().__init__()
        self.config = config
        self.layers = layers
        self.graph, self.plan, self.points = graph, plan, points
        # The float model the quantizer saw (equalized when that method ran): the reference for
        # activation statistics and SQNR. Kept out of the module tree so it is not a submodule.
        self.__dict__["float_model"] = float_model
        self.methods = methods or MethodsReport()
        # quantized conv weights in channels-last memory: oneDNN then keeps the activations after them
        # channels-last, which made the quantized evaluation 1.3-1.6x faster (max-pool 4x); the values are
        # the same. A layer kept in float keeps the float model's layout, so an all-float config
        # computes the float model's very bits
        self._weights = {
            name: q.effective_weight() if q.weight_int is None else _kernel_layout(q.effective_weight())
            for name, q in layers.items()
        }
        self._biases = {name: q.effective_bias() for name, q in layers.items()}
        # Tensors fake-quantized where they are made rather than where a layer reads them: points that
        # something other than a layer reads (an add, a pool), and ReLU6 on a grid (6 may lie off it)
        self._quantize_after: dict[str, QParams] = {}
        for op in graph.ops:
            source = plan.grid.get(op.name)
            if source is None:
                continue
            read_by_layers_only = all(user.is_layer for user in graph.consumers(op.name))
            if (op.name in points and not read_by_layers_only) or op.kind is OpKind.RELU6:
                self._quantize_after[op.name] = points[source].qparams
        # each activation other than ReLU as a table from its input's levels to its own (quant.lookup_table)
        self.lookup_tables = {
            op.name: lookup_table(
                str(op.attrs["function"]),
                op.attrs["parameter"],  # type: ignore[arg-type]
                points[plan.grid[op.inputs[0]]].qparams,
                points[op.name].qparams,
            )
            for op in graph.ops
            if op.kind is OpKind.LOOKUP
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_outputs(x)[0]

    def forward_with_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Log-probabilities and each layer's output before its activation."""
        log_probs, outputs, _ = self.trace(x)
        return log_probs, outputs

    def trace(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Log-probabilities, each layer's output before its activation, and each layer's input as
        the layer sees it (fake-quantized where its input is quantized)."""
        outputs: dict[str, torch.Tensor] = {}
        inputs: dict[str, torch.Tensor] = {}
        log_probs = _Simulation(self, outputs, inputs).run(x)
        return log_probs, outputs, inputs

    def point_values(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The simulation's real value at each quantization point, just before it is rounded onto the
        point's grid (quantize() of it gives the integers the simulation computes with there)."""
        points: dict[str, torch.Tensor] = {}
        _Simulation(self, {}, {}, points).run(x)
        return points

    def simulation(self) -> GraphRun:
        """The simulation as a walk of the graph, to run part of it (run_between: block reconstruction)."""
        return _Simulation(self, {}, {})

    def point_quantized_after(self, op_name: str) -> str | None:
        """The point whose grid op `op_name`'s value is put on where it is made (None: where a layer
        reads it, or nowhere)."""
        return self.plan.grid[op_name] if op_name in self._quantize_after else None

    def with_point_scales(self, scales: dict[str, torch.Tensor]) -> QuantizedNet:
        """The same decisions with other scales at some points (block reconstruction learns them, each
        zero point kept): the layers that read them get the new input qparams and their int32 biases again."""
        points = dict(self.points)
        for name, scale in scales.items():
            point = points[name]
            points[name] = replace(point, qparams=replace(point.qparams, scale=scale.detach().clone().reshape(())))
        layers = {}
        for name, quant in self.layers.items():
            point_name = self.plan.layer_input.get(name)
            if point_name in scales and quant.weight_qparams is not None:
                quant = replace(quant, input_qparams=points[point_name].qparams)
                quant.bias_int = quantize_bias(quant.bias, quant.bias_scale, BIAS_BITS)  # type: ignore[arg-type]
            layers[name] = quant
        return QuantizedNet(
            layers, self.config, self.float_model, self.methods, graph=self.graph, plan=self.plan, points=points
        ).eval()

    def with_layers(self, layers: dict[str, LayerQuant]) -> QuantizedNet:
        """The same graph and points with other layer decisions (methods, diagnosis variants)."""
        return QuantizedNet(
            layers, self.config, self.float_model, self.methods, graph=self.graph, plan=self.plan, points=self.points
        ).eval()


def float_parts(qnet: QuantizedNet) -> list[str]:
    """Layers whose weights or input stay float, and normalizations by the sample's own statistics (float
    between a dequantize and a quantize): an integer-only pipeline cannot run them."""
    layers = [n for n, q in qnet.layers.items() if q.weight_qparams is None or q.input_qparams is None]
    return [*layers, *(op.name for op in qnet.graph.ops if op.kind is OpKind.NORMALIZE)]


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


def config_plan(graph: ModelGraph, config: QuantConfig) -> QuantPlan:
    """Where `config` quantizes `graph`: every layer not kept float, the input when the config says so."""
    config.validate(graph.layers)
    quantized = [name for name in graph.layers if name not in config.float_layers]
    return quant_plan(graph, quantized, config.quantize_input)


def edge_layers(graph: ModelGraph) -> tuple[str, ...]:
    """The first and last layers in the graph's order: the ones config.edge_bits sets apart."""
    return tuple(dict.fromkeys((graph.layers[0], graph.layers[-1]))) if graph.layers else ()


def point_bits(graph: ModelGraph, plan: QuantPlan, config: QuantConfig) -> dict[str, int]:
    """Each point's activation bits: config.act_bits for a layer's input, except config.edge_bits (when
    set) for the first and last layers' inputs; config.add_bits (when set) for a point that is no
    layer's input (a residual add's input, a concatenation)."""
    edges = {plan.layer_input[name] for name in edge_layers(graph) if name in plan.layer_input}
    layer_inputs = set(plan.layer_input.values())

    def bits(point: str) -> int:
        if config.edge_bits and point in edges:
            return config.edge_bits
        if config.add_bits and point not in layer_inputs:
            return config.add_bits
        return config.act_bits

    return {point: bits(point) for point in plan.points}


def layer_weight_bits(graph: ModelGraph, config: QuantConfig, bits: dict[str, int] | None = None) -> dict[str, int]:
    """Each quantized layer's weight bits: `bits[name]` when given (mixed precision), else
    config.weight_bits, and config.edge_bits for the first and last layers when it is set."""
    edges = set(edge_layers(graph)) if config.edge_bits else set()
    return {
        name: config.edge_bits if name in edges else (config.weight_bits if bits is None else bits[name])
        for name in graph.layers
        if name not in config.float_layers
    }


def quantize_points(
    graph: ModelGraph, plan: QuantPlan, config: QuantConfig, batches: Sequence[torch.Tensor]
) -> dict[str, QuantPoint]:
    """Calibrate every point on `batches` and choose its affine qparams at its bits (point_bits)."""
    if not plan.points:
        return {}
    bits = point_bits(graph, plan, config)
    stats = calibrate_points(graph, batches, config.observer, bits, plan.points)
    return {
        name: QuantPoint(name, choose_qparams(s.clip_min, s.clip_max, bits[name], Scheme.ASYMMETRIC), s)
        for name, s in stats.items()
    }


def quantize_layers(
    graph: ModelGraph,
    config: QuantConfig,
    plan: QuantPlan,
    points: dict[str, QuantPoint],
    bits: dict[str, int] | None = None,
) -> dict[str, LayerQuant]:
    """Choose every layer's qparams from the float weights and calibrated activation ranges
    (weights at layer_weight_bits), rounding to nearest."""
    result = {}
    weight_bits = layer_weight_bits(graph, config, bits)
    for name in graph.layers:
        weight, bias = graph.weight(name).detach().clone(), graph.bias(name).detach().clone()
        point = points.get(plan.layer_input.get(name, ""))
        activation = None if point is None or point.activation is None else replace(point.activation, layer=name)
        quant = LayerQuant(name, weight, bias, None, None, None, None, activation)
        if name not in config.float_layers:
            quant.weight_bits = weight_bits[name]
            quant.weight_qparams = weight_qparams(weight, config, quant.weight_bits)
            quant.weight_int = quantize(weight, quant.weight_qparams)
        if point is not None:
            quant.input_qparams = point.qparams
            scale = quant.bias_scale
            assert scale is not None  # both input and weights are quantized here
            quant.bias_int = quantize_bias(bias, scale, BIAS_BITS)
        result[name] = quant
    return result


def calibration_data(train: Split, config: QuantConfig) -> list[torch.Tensor]:
    return calibration_batches(train, config.calib_batches, config.batch_size, config.seed)


# Mixed precision's per-layer sensitivities of 16 (graph, images, weight rule): one float pass per layer
# and bit-width, the same for every weight bits budget (the auto search tries several in a row)
SENSITIVITIES = Memo(entries=16)


def layer_sensitivities(graph: ModelGraph, images: torch.Tensor, config: QuantConfig) -> dict[str, dict[int, float]]:
    """methods.sensitivities under the config's weight rule (granularity, scheme, range), remembered."""
    key = (
        "sensitivity",
        graph.digest(),
        tensors_digest([images]),
        config.granularity,
        config.scheme,
        config.weight_range,
    )
    return SENSITIVITIES.get_or_compute(
        key, lambda: sensitivities(graph, images, lambda w, b: fake_quantize(w, weight_qparams(w, config, b)))
    )


def quantize_model(model: nn.Module, config: QuantConfig, batches: Sequence[torch.Tensor]) -> QuantizedNet:
    """Calibrate on `batches` (training images) and build the quantized twin of `model`'s graph,
    applying the config's methods in METHODS' order (see qcore.quantize.methods)."""
    graph = model_graph(model)  # refuses an unsupported model before any work
    plan = config_plan(graph, config)  # validates the config against the graph's layers
    report = MethodsReport(parameters=parameter_counts(graph))
    if "equalization" in config.methods:
        with timed(report, "equalization"):
            graph, report.equalization = equalize(graph)
    images = torch.cat(list(batches))
    bits = None
    if config.weight_bits_budget > 0:
        with timed(report, "mixed precision"):
            report.sensitivity = layer_sensitivities(graph, images, config)
            bits = choose_bits(report.sensitivity, config.weight_bits_budget, parameter_counts(graph))
    points = quantize_points(graph, plan, config, batches)
    layers = quantize_layers(graph, config, plan, points, bits)
    report.weight_bits = {n: q.weight_bits for n, q in layers.items() if q.weight_bits is not None}
    qnet = QuantizedNet(layers, config, ModelGraphModule(graph), report, graph=graph, plan=plan, points=points)
    if "adaround" in config.methods:
        with timed(report, "adaround"):
            apply_adaround(qnet, images)
    if "block-reconstruction" in config.methods:
        with timed(report, "block-reconstruction"):
            qnet = apply_block_reconstruction(qnet, images)
    if "bias-correction" in config.methods:
        with timed(report, "bias-correction"):
            apply_bias_correction(qnet, images)
    return qnet.with_layers(qnet.layers)


# AdaRound's learned integer weights of 8 (graph, calibration images, config): the longest step of a
# quantization (69 s for mnist-net here), asked for again when a search's choice is reported on the test set
ADAROUNDS = Memo(entries=8)


def apply_adaround(qnet: QuantizedNet, images: torch.Tensor) -> None:
    """Replace nearest rounding by AdaRound layer by layer: each layer learns to map the input it
    really gets (from the layers before it, already quantized) to the float model's output. The result
    is remembered by what decides it: the graph (equalized when that ran), the images and the config."""
    key = ("adaround", qnet.graph.digest(), tensors_digest([images]), qnet.config.to_json())
    learned = ADAROUNDS.get_or_compute(key, lambda: _learn_adaround(qnet, images))
    for name, (weight_int, info) in learned.items():
        qnet.layers[name].weight_int = weight_int
        qnet.methods.adaround[name] = info


def _learn_adaround(qnet: QuantizedNet, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, dict[str, float]]]:
    float_inputs = capture(qnet.graph, images, "input")
    learned: dict[str, tuple[torch.Tensor, dict[str, float]]] = {}
    quantized_layers = [name for name, quant in qnet.layers.items() if quant.weight_qparams is not None]
    for index, name in enumerate(quantized_layers):
        quant = qnet.layers[name]
        with torch.inference_mode():
            _, _, quantized = qnet.with_layers(qnet.layers).trace(images)
        what = f"AdaRound, layer {index + 1} of {len(quantized_layers)}"  # no name from a file: shown as text
        with progress.part(index, len(quantized_layers), what):
            learned[name] = adaround(
                quant.weight,
                quant.weight_qparams,
                float_inputs[name],
                quantized[name],
                seed=qnet.config.seed,
                layer=qnet.graph.op(name),
            )
        quant.weight_int = learned[name][0]  # the next layer learns on this layer's learned rounding
    return learned


# Block reconstruction's learned integer weights and report, remembered like AdaRound's
RECONSTRUCTIONS = Memo(entries=8)


def apply_block_reconstruction(qnet: QuantizedNet, images: torch.Tensor) -> QuantizedNet:
    """`qnet` with block reconstruction's learned rounding and activation scales
    (qcore.quantize.reconstruction), remembered by the graph, the images and the config, like AdaRound."""
    key = ("block-reconstruction", qnet.graph.digest(), tensors_digest([images]), qnet.config.to_json())
    learned = RECONSTRUCTIONS.get_or_compute(key, lambda: reconstruct_blocks(qnet, images, seed=qnet.config.seed))
    for name, weight_int in learned.weights.items():
        qnet.layers[name].weight_int = weight_int
    qnet.methods.blocks = learned.report
    return qnet.with_point_scales(learned.scales)


def apply_bias_correction(qnet: QuantizedNet, images: torch.Tensor) -> None:
    """Layer by layer, add the mean float-minus-quantized output per channel to the bias."""
    float_outputs = capture(qnet.graph, images, "output")
    for name in qnet.graph.layers:
        quant = qnet.layers[name]
        if quant.weight_qparams is None:
            continue
        with torch.inference_mode():
            _, outputs = qnet.with_layers(qnet.layers).forward_with_outputs(images)
        shift = channel_means(float_outputs[name]) - channel_means(outputs[name])
        quant.bias = quant.bias + shift
        if quant.bias_scale is not None:
            quant.bias_int = quantize_bias(quant.bias, quant.bias_scale, BIAS_BITS)
        qnet.methods.bias_shift[name] = shift.tolist()
