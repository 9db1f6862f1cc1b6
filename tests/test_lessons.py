"""Lessons against the engine: `explain` recomputed in plain Python integers, and checked against
the integer engine's own intermediate tensors at 8 and at 4 bits."""

from __future__ import annotations

import json

import pytest
import torch

from qcore.analysis.tables import quantize_for
from qcore.inference.integer import IntegerNet
from qcore.lessons.walk import explain
from qcore.models.net import LAYER_NAMES
from qcore.quantize.config import QuantConfig
from tests.conftest import run_cli

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


# TFLite's single-rounding requantization, written out in plain Python integers (common.cc with
# TFLITE_SINGLE_ROUNDING): one product, one rounding, then saturation to int32.
def requantize(acc: int, multiplier: int, shift: int) -> int:
    """acc * M0 * 2^(shift - 31), rounded half up: (acc * M0 + 2^(total - 1)) >> total, total = 31 - shift."""
    total = 31 - shift
    return min(max((acc * multiplier + (1 << (total - 1))) >> total, INT32_MIN), INT32_MAX)


def test_plain_python_requantize_by_hand():
    half, shift_half = 1 << 30, 0  # M = 2^30 * 2^(0 - 31) = 0.5
    assert requantize(5, half, shift_half) == 3 and requantize(-5, half, shift_half) == -2  # 2.5 -> 3, -2.5 -> -2
    assert requantize(6, 1 << 30, -1) == 2 and requantize(7, 1 << 30, -1) == 2  # 1.5 -> 2, 1.75 -> 2
    assert requantize(2**31 - 1, 1 << 30, 2) == INT32_MAX  # x2 saturates


@pytest.mark.parametrize("bits", [8, 4])
def test_explain_recomputed_in_plain_integers(pretrained, mnist, bits):
    config = QuantConfig(weight_bits=bits, act_bits=bits)
    walk = explain(pretrained, mnist, config, 3)
    for layer in walk.layers:
        zx, zw = layer.input_zero_point, layer.weight_zero_point
        accumulator = sum((x - zx) * (w - zw) for x, w in layer.terms) + layer.bias
        assert layer.accumulator == accumulator
        assert INT32_MIN <= accumulator <= INT32_MAX
        assert 2**30 <= layer.multiplier < 2**31
        assert layer.real_multiplier == pytest.approx(layer.exact_multiplier, rel=2**-30)
        assert layer.scaled == requantize(accumulator, layer.multiplier, layer.shift)
        expected = layer.scaled + layer.output_zero_point
        assert layer.output == min(max(expected, layer.output_min), layer.output_max)
        if layer.name.startswith("conv"):
            assert layer.output_min == layer.output_zero_point  # ReLU is the clamp at the zero point
            assert layer.pooled == max(layer.pooled_window) and layer.output in layer.pooled_window
    assert walk.logits_int32[walk.layers[-1].position[0]] == walk.layers[-1].output
    assert walk.prediction == max(range(10), key=lambda d: walk.logits_int32[d])


def bundled_outputs_int(engine: IntegerNet, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The integer logits and each layer's output as the next layer reads it, unflattened: the values
    of the ops where Net.forward's layers end (conv1 after its pool and ReLU, conv2 at the flatten
    fc1 reads, unflattened to its 50 maps of 4 x 4, fc1 after its ReLU)."""
    values = engine.values_int(x)
    outputs = {"conv1": values["relu"], "conv2": values["flatten"].reshape(-1, 50, 4, 4), "fc1": values["relu_2"]}
    return values["<logits>"], outputs


@pytest.mark.parametrize("bits", [8, 4])
def test_explain_equals_the_engines_intermediate_tensors(pretrained, mnist, bits):
    config = QuantConfig(weight_bits=bits, act_bits=bits)
    image = 11
    positions = {"conv1": [3, 10, 13], "conv2": [7, 4, 1], "fc1": [250], "fc2": [4]}
    walk = explain(pretrained, mnist, config, image, positions)
    engine = IntegerNet(quantize_for(pretrained, mnist, config))
    x = engine.quantize_input(mnist.test.images[image : image + 1])
    logits, outputs = bundled_outputs_int(engine, x)
    assert walk.logits_int32 == logits[0].tolist()
    assert walk.prediction == int(engine.predict(mnist.test.images[image : image + 1])[0])
    layers = {layer.name: layer for layer in walk.layers}
    for name in ("conv1", "conv2"):
        channel, row, col = layers[name].position
        assert layers[name].pooled == int(outputs[name][0, channel, row // 2, col // 2])
        assert layers[name].feature_map_int == outputs[name][0, channel].tolist()
    assert layers["fc1"].output == int(outputs["fc1"][0, 250])
    inputs = {"conv1": x, "conv2": outputs["conv1"], "fc1": outputs["conv2"].flatten(1), "fc2": outputs["fc1"]}
    assert [t[0] for t in layers["fc2"].terms] == inputs["fc2"][0].tolist()
    assert [t[0] for t in layers["fc1"].terms] == inputs["fc1"][0].tolist()
    conv2_patch = inputs["conv2"][0, :, 4:9, 1:6].flatten().tolist()
    assert [t[0] for t in layers["conv2"].terms] == conv2_patch
    assert [t[1] for t in layers["conv2"].terms] == engine.layers["conv2"].weight[7].flatten().tolist()


@pytest.mark.slow
def test_explain_cli_json(pretrained, mnist):
    done = run_cli("explain", "--image", "5", "--layer", "conv1", "--position", "2,8,9", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result) >= {"image", "label", "prediction", "float_prediction", "logits_int32", "layers"}
    assert result["label"] == int(mnist.test.labels[5]) and len(result["logits_int32"]) == 10
    assert [layer["name"] for layer in result["layers"]] == list(LAYER_NAMES)
    conv1 = result["layers"][0]
    assert conv1["position"] == [2, 8, 9] and len(conv1["terms"]) == 25
    keys = {"name", "position", "input_zero_point", "weight_zero_point", "terms", "bias", "accumulator"}
    keys |= {"multiplier", "shift", "output_zero_point", "output_min", "output"}
    for layer in result["layers"]:
        assert keys <= set(layer)
        accumulator = sum((x - layer["input_zero_point"]) * (w - layer["weight_zero_point"]) for x, w in layer["terms"])
        assert layer["accumulator"] == accumulator + layer["bias"]
    float_prediction = int(pretrained(mnist.test.images[5:6]).argmax())
    assert result["float_prediction"] == float_prediction


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--image", "10000"], "--image must be between 0 and 9999"),
        (["--image", "1", "--layer", "conv1", "--position", "25,0,0"], "outside the output's shape"),
        (["--image", "1", "--layer", "fc1", "--position", "1,2"], "1 number(s)"),
        (["--image", "1", "--float-layers", "fc2"], "every layer must be quantized"),
    ],
)
@pytest.mark.slow
def test_explain_refuses_bad_arguments_in_one_line(args, needle):
    done = run_cli("explain", *args)
    assert done.returncode == 2 and needle in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_explain_walks_every_operation_term_by_term(mnist):
    """The walk on a graph with every operation (untrained weights: the arithmetic is what is checked),
    recomputed in plain Python from the engine's own integers: a padded strided conv's patch, a
    depthwise conv's one channel, the TFLite ADD's steps, and each output against the engine's."""
    from qcore.graph import OpKind, model_graph
    from tests.test_graph import EveryOp

    torch.manual_seed(0)
    model = EveryOp().eval()
    config = QuantConfig()
    image = 3
    positions = {"down": [5, 0, 0], "depthwise": [6, 0, 13]}  # corners: the zero padding takes part
    walk = explain(model, mnist, config, image, positions)
    graph = model_graph(model)
    engine = IntegerNet(quantize_for(model, mnist, config))
    values = engine.values_int(engine.quantize_input(mnist.test.images[image : image + 1]))
    assert walk.order == [op.name for op in graph.ops if op.is_layer or op.kind is OpKind.ADD]
    assert walk.logits_int32 == values["<logits>"][0].tolist()
    layers = {layer.name: layer for layer in walk.layers}
    for layer in walk.layers:
        zx, zw = layer.input_zero_point, layer.weight_zero_point
        assert layer.accumulator == sum((x - zx) * (w - zw) for x, w in layer.terms) + layer.bias
        assert layer.scaled == requantize(layer.accumulator, layer.multiplier, layer.shift)
        assert layer.output == min(max(layer.scaled + layer.output_zero_point, layer.output_min), layer.output_max)
    # 'down' reads the add's output (8 channels) with a 3x3 kernel, stride 2 and padding 1: output (0, 0)
    # reads rows and columns -1..1, the -1s being the padding at the input's zero point
    down = layers["down"]
    x = values[graph.op("down").inputs[0]][0].tolist()
    zx = down.input_zero_point
    patch = [x[c][r][k] if r >= 0 and k >= 0 else zx for c in range(8) for r in (-1, 0, 1) for k in (-1, 0, 1)]
    assert [t[0] for t in down.terms] == patch
    assert [t[1] for t in down.terms] == engine.layers["down"].weight[5].flatten().tolist()
    # the depthwise conv's channel 6 reads input channel 6 alone: 9 terms, the right column padded
    depthwise = layers["depthwise"]
    x = values[graph.op("depthwise").inputs[0]][0, 6].tolist()
    zx = depthwise.input_zero_point
    patch = [x[r][k] if 0 <= r < 14 and 0 <= k < 14 else zx for r in (-1, 0, 1) for k in (12, 13, 14)]
    assert [t[0] for t in depthwise.terms] == patch
    # the add: each input's integer and zero point, shifted left by 20, rescaled by its own multiplier,
    # summed and requantized; the output is the engine's integer at the add's grid (after its ReLU)
    (add,) = walk.adds
    op = graph.op(add.name)
    point = graph.consumers(add.name)[0].name  # F.relu(x + y): the point is the ReLU after the add
    where = tuple(add.position)
    assert add.input_values == [int(values[name][0][where]) for name in op.inputs]
    for q, z, m, s, r in zip(
        add.input_values, add.input_zero_points, add.input_multipliers, add.input_shifts, add.rescaled, strict=True
    ):
        assert r == requantize((q - z) << 20, m, s)
    assert add.total == sum(add.rescaled) == int(values[add.name][0][where])
    assert add.scaled == requantize(add.total, add.multiplier, add.shift)
    assert add.output == min(max(add.scaled + add.output_zero_point, add.output_min), add.output_max)
    assert add.output == int(values[point][0][where]) and add.output_min == add.output_zero_point  # the ReLU


@pytest.mark.slow
def test_explain_cli_walks_a_residual_zoo_model():
    done = run_cli("explain", "--model", "fashion-resnet", "--image", "3", "--layer", "add_1", "--position", "4,2,2")
    assert done.returncode == 0, done.stderr
    assert "add_1 at [4, 2, 2]: inputs" in done.stdout
    done = run_cli("explain", "--model", "fashion-resnet", "--image", "3", "--json")
    result = json.loads(done.stdout)
    assert [add["name"] for add in result["adds"]] == ["add", "add_1", "add_2"]
    assert len(result["layers"]) == 10  # stem, two convs in each of three blocks, two strided shortcuts, fc
    refused = run_cli("explain", "--model", "fashion-resnet", "--image", "3", "--layer", "conv1", "--position", "1")
    assert refused.returncode == 2 and "--layer must be one of stem, layer1.conv1" in refused.stderr


def _outlier_rows(clean_float: float, spoiled_float: float, quantized: list[tuple[float, float]]):
    """Rows for the four settings: (accuracy without, accuracy with) the outlier for each."""
    from qcore.lessons.steps import SETTINGS, OutlierRow

    rows = [
        OutlierRow(setting, False, 0.1, 10, 30.0, without, clean_float)
        for (setting, _), (without, _) in zip(SETTINGS, quantized, strict=True)
    ]
    rows += [
        OutlierRow(setting, True, 0.1, levels, 30.0, outlier, spoiled_float)
        for (setting, _), (_, outlier), levels in zip(SETTINGS, quantized, (1, 219, 3, 200), strict=True)
    ]
    return rows


def test_the_outlier_conclusion_blames_the_outlier_when_the_float_model_falls_with_it():
    """fashion-resnet's case in issue 29: the float model with the outlier already scores 33.85%, and every
    quantized row sits within half a point of it: the loss is the outlier's, and the settings are not told
    apart."""
    from qcore.lessons.steps import outlier_conclusion

    rows = _outlier_rows(0.9222, 0.3385, [(0.92, 0.3360), (0.921, 0.3390), (0.92, 0.3380), (0.921, 0.3400)])
    text = outlier_conclusion(rows)
    assert "The outlier alone costs the float model 58.37 points (92.22% without it, 33.85% with it)" in text
    assert "does not tell the settings apart" in text and "between -0.15 and +0.25 points" in text


def test_the_outlier_conclusion_blames_quantization_when_the_float_model_keeps_its_accuracy():
    from qcore.lessons.steps import outlier_conclusion

    rows = _outlier_rows(0.9832, 0.9830, [(0.98, 0.40), (0.98, 0.97), (0.98, 0.95), (0.98, 0.976)])
    text = outlier_conclusion(rows)
    assert text.startswith("The float model hardly notices the outlier (98.32% without it, 98.30% with it)")
    # the worst costs 98.30 - 40.00 points with 1 level left; the best 98.30 - 97.60
    assert "per-tensor, min/max ranges costs 58.30 points (1 level(s) left" in text
    assert "per-channel, MSE-clipped ranges 0.70 (200 levels)" in text


@pytest.mark.slow
def test_the_outlier_lesson_measures_the_float_model_with_the_same_outlier(pretrained, mnist):
    import copy

    from qcore.inference.evaluate import evaluate
    from qcore.lessons.steps import outlier_conclusion, outlier_lesson

    rows = outlier_lesson(pretrained, mnist, QuantConfig(weight_bits=4, act_bits=4), "weights", 50.0)
    spoiled = copy.deepcopy(pretrained)
    flat = spoiled.fc1.weight.data.view(-1)
    flat[int(flat.abs().argmax())] *= 50.0
    test = mnist.test.subset(2000)
    assert all(r.float_accuracy == evaluate(pretrained, test).accuracy for r in rows if not r.with_outlier)
    assert all(r.float_accuracy == evaluate(spoiled, test).accuracy for r in rows if r.with_outlier)
    printed = run_cli("walkthrough", "outliers", "--weight-bits", "4", "--act-bits", "4", "--json")
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout)["conclusion"] == outlier_conclusion(rows)


def test_the_tour_keeps_float_the_layer_that_costs_most_and_every_step_changes_the_config():
    from qcore.graph import model_graph
    from qcore.lessons.tour import step_config, tour_for
    from qcore.models.zoo import ZOO, zoo_model

    for name in ZOO:
        layers = model_graph(zoo_model(name).build().eval()).layers
        drops = {layer: 0.001 * index for index, layer in enumerate(layers)}  # the last layer costs most
        steps = tour_for(drops)
        configs = [step_config(step) for step in steps]
        assert configs[5].float_layers == (layers[-1],) and layers[-1] in steps[5].title
        assert all(a != b for a, b in zip(configs, configs[1:], strict=False)), name  # no step repeats the last
        assert all(set(c.float_layers) <= set(layers) for c in configs)  # only this model's layers


@pytest.mark.slow
def test_the_tour_on_two_architectures_names_each_ones_measured_worst_layer(pretrained, mnist, zoo_tour_sensitivities):
    from qcore.analysis.tables import layer_sensitivity
    from qcore.data import Dataset
    from qcore.lessons.tour import sensitivity_config, step_config, tour_for

    # on the first 2,000 test images (fashion-resnet's rows: 1,000): the choice, not its precision, is tested
    first = Dataset(mnist.train, mnist.test.subset(2000), mnist.spec)
    notebook = layer_sensitivity(pretrained, first, sensitivity_config())
    for rows in (notebook, zoo_tour_sensitivities["fashion-resnet"]):
        worst = min(rows, key=lambda row: row.accuracy).layer  # only it quantized: the lowest accuracy
        step = tour_for({row.layer: row.drop for row in rows})[5]
        assert step_config(step).float_layers == (worst,) and step.title.endswith(f"but {worst} kept in float")


def _walk(per_channel: float, per_tensor: float, equalized: float, failure: bool):
    from qcore.lessons.failures import FoldingWalk, GranularityRow

    rows = [
        GranularityRow(8, 8, 0.9230, 0.9228, 0.9229, 0.9229),
        GranularityRow(4, 8, per_channel, per_tensor, equalized, 0.90),
    ]
    return FoldingWalk(0.9240, [], rows, (4, 8) if failure else None)


def test_the_folding_conclusion_says_when_equalization_makes_per_tensor_worse():
    """Issue 29's reading on fashion-mobilenet: equalization took per-tensor from 89.55% to 88.69%, and the
    lesson presented it as the fix without a word."""
    from qcore.lessons.failures import folding_conclusion, granularity_table

    walk = _walk(0.9180, 0.8955, 0.8869, failure=True)
    text = folding_conclusion(walk)
    assert "Per-tensor alone first loses 2 points at W4A8: 89.55% against 91.80% per-channel." in text
    assert "Equalization makes per-tensor worse here: 88.69% (-0.86 points)" in text and "raises" not in text
    table = granularity_table(walk)
    assert (
        table[1]["per-tensor + equalization (%)"] == 88.69
        and table[1]["equalization's effect on per-tensor (points)"] == -0.86
    )
    assert table[0]["share of per-channel's lead won back"].startswith("no gap")  # was the word None
    assert not any("_" in key for key in table[0])  # no snake_case headers


def test_the_folding_conclusion_credits_equalization_only_when_it_helps_beyond_noise():
    from qcore.lessons.failures import folding_conclusion

    helped = folding_conclusion(_walk(0.9180, 0.8800, 0.9090, failure=True))
    assert "Equalization raises per-tensor to 90.90% (+2.90 points, 76% of per-channel's lead)" in helped
    flat = folding_conclusion(_walk(0.9180, 0.9170, 0.9180, failure=False))
    assert "never lost 2 points" in flat and "leaves per-tensor where it was (91.80%, +0.10 points" in flat


def test_the_advice_names_the_layer_the_measurement_blames_or_none():
    """Issue 29: the advice said "keep fc2 in float" where the page's own measurement gave fc2 no drop."""
    from qcore.analysis.tables import Sensitivity, sensitivity_advice

    rows = [Sensitivity("conv1", 0.9800, 0.0032), Sensitivity("fc1", 0.9500, 0.0332), Sensitivity("fc2", 0.9832, 0.0)]
    assert sensitivity_advice(rows).startswith("Try next: keep fc1 in float") and "3.32 points" in sensitivity_advice(
        rows
    )
    quiet = [Sensitivity("conv1", 0.9831, 0.0001), Sensitivity("fc2", 0.9830, 0.0002)]
    assert "fc2" not in sensitivity_advice(quiet).split("(the most:")[0]  # no layer is blamed
    assert sensitivity_advice(quiet).startswith("No layer quantized alone costs 0.2 points or more")
