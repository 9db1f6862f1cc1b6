"""Lessons against the engine: `explain` recomputed in plain Python integers, and checked against
the integer engine's own intermediate tensors at 8 and at 4 bits."""

from __future__ import annotations

import json

import pytest

from qcore.analysis.tables import quantize_for
from qcore.config import QuantConfig
from qcore.inference.integer import IntegerNet
from qcore.lessons.walk import explain
from qcore.models.net import LAYER_NAMES
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


@pytest.mark.parametrize("bits", [8, 4])
def test_explain_equals_the_engines_intermediate_tensors(pretrained, mnist, bits):
    config = QuantConfig(weight_bits=bits, act_bits=bits)
    image = 11
    positions = {"conv1": [3, 10, 13], "conv2": [7, 4, 1], "fc1": [250], "fc2": [4]}
    walk = explain(pretrained, mnist, config, image, positions)
    engine = IntegerNet(quantize_for(pretrained, mnist, config))
    x = engine.quantize_input(mnist.test.images[image : image + 1])
    logits, outputs = engine.trace_int(x)
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
