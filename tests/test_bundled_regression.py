"""The bundled net's numbers from before the model graph (issue 17), kept as a regression test.

Every value in EXPECTED was printed at commit ea8d967 (the last commit with the hand-written forward
passes) by `python -m tests.test_bundled_regression`, and the graph-driven engine must reproduce them
to the image: each prediction hash is the SHA-256 of the 10,000 test predictions as bytes, so one
image predicted differently fails the test.

One change since, on purpose (the commit after 74fda0e): the integer engine's logits moved from the
finest per-channel accumulator scale to one 2^k finer (k as large as int32 allows), because at the
coarser scale two classes could tie where the simulation's float logits did not. The engine now
predicts exactly what the simulation predicts at every integer config, so each "integer" row expects
the "ptq" row's hash printed at ea8d967 and no disagreement (before: 1, 17 and 36 at W3A3, W2A3 and
W2A2, every one a tie), and the W3A3 diagnosis's engine gap lists no disagreeing image (ea8d967:
image 5960), the rest of it as printed at 74fda0e (which printed ea8d967's whole diagnosis). The
explain walk is unchanged up to fc2 (that part's fingerprint printed at 586af23, whose whole walk
was ea8d967's); its logits are the ones printed there times 2^k, within the one rounding (see
test_the_finer_logits_are_the_old_ones_times_two_to_the_k).

Two kinds of number depend on the CPU's float kernels rather than on our code, and CI has run on two
kinds of CPU: ea8d967 printed, on the second, a different explain-walk and diagnosis hash (the 7th
digit of a probability or an SQNR), 2 more images right after AdaRound and 21 / 8 fewer after the two
W2A2 QAT runs, and head printed exactly what ea8d967 printed on the same machine, to every hash.
So a report is compared by a fingerprint (its integers, strings and layout exactly, its floats by
four sums within a relative 1e-4), and the runs that follow a gradient (AdaRound, QAT) by their
correct count within TOLERANCE images, a few times the spread seen between the two CPUs.
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

# (name, QuantConfig changes): the PTQ, integer-engine and methods rows of docs/quantizer.md, engine.md and methods.md
PTQ_CONFIGS: dict[str, dict[str, object]] = {
    "W8A8": {},
    "W6A6": {"weight_bits": 6, "act_bits": 6},
    "W4A4": {"weight_bits": 4, "act_bits": 4},
    "W3A3": {"weight_bits": 3, "act_bits": 3},
    "W2A8": {"weight_bits": 2},
    "W2A3": {"weight_bits": 2, "act_bits": 3},
    "W2A2": {"weight_bits": 2, "act_bits": 2},
    "notebook W6A6": {
        "weight_bits": 6,
        "act_bits": 6,
        "observer": "notebook",
        "scheme": "asymmetric",
        "granularity": "per-tensor",
        "weight_range": "minmax",
        "float_layers": ("fc2",),
    },
    "mse W4A4 per-tensor": {"weight_bits": 4, "act_bits": 4, "observer": "mse", "granularity": "per-tensor"},
    "percentile W3A3 mse weights": {"weight_bits": 3, "act_bits": 3, "observer": "percentile", "weight_range": "mse"},
}
INTEGER_CONFIGS = ("W8A8", "W4A4", "W3A3", "W2A3", "W2A2")
METHOD_CONFIGS: dict[str, dict[str, object]] = {
    "W2A8 equalization": {"weight_bits": 2, "methods": ("equalization",)},
    "W2A8 bias-correction": {"weight_bits": 2, "methods": ("bias-correction",)},
    "W2A8 all three": {"weight_bits": 2, "methods": ("equalization", "adaround", "bias-correction")},
    "mixed 2.5 A8": {"weight_bits_budget": 2.5},
}

# printed at ea8d967 (the two reports' fingerprints on the second CPU), the integer rows as above; the
# docs/' tables give the same accuracies (98.31% W8A8, 97.85% for all three methods at W2A8, 98.29%
# torch int8)
EXPECTED: dict[str, object] = {
    "ptq W8A8": {"correct": 9831, "hash": "39cc0725da9697b4"},
    "integer W8A8": {"correct": 9831, "disagreements": 0, "hash": "39cc0725da9697b4"},
    "onnxruntime W8A8": {"disagreements": 0, "hash": "39cc0725da9697b4"},
    "ptq W6A6": {"correct": 9834, "hash": "48c35feab4b8d49e"},
    "ptq W4A4": {"correct": 9827, "hash": "5084c292e8bf587d"},
    "integer W4A4": {"correct": 9827, "disagreements": 0, "hash": "5084c292e8bf587d"},
    "onnxruntime W4A4": {"disagreements": 0, "hash": "5084c292e8bf587d"},
    "ptq W3A3": {"correct": 9764, "hash": "64c86ee1697f2293"},
    "integer W3A3": {"correct": 9764, "disagreements": 0, "hash": "64c86ee1697f2293"},
    "ptq W2A8": {"correct": 9518, "hash": "99e2cadefc79cb5d"},
    "ptq W2A3": {"correct": 9480, "hash": "2cf4e65c67e54712"},
    "integer W2A3": {"correct": 9480, "disagreements": 0, "hash": "2cf4e65c67e54712"},
    "ptq W2A2": {"correct": 9333, "hash": "d8ced209b9dd4454"},
    "integer W2A2": {"correct": 9333, "disagreements": 0, "hash": "d8ced209b9dd4454"},
    "ptq notebook W6A6": {"correct": 8482, "hash": "22e53f5a5cb6ee31"},
    "ptq mse W4A4 per-tensor": {"correct": 9822, "hash": "54e823040fe6f936"},
    "ptq percentile W3A3 mse weights": {"correct": 9742, "hash": "a4a4600757277e8a"},
    "explain W4A4 image 0 before fc2": {"exact": "400cb24b2da2889c", "floats": [16, 1.0894, 0.571489, 0.999935]},
    "methods W2A8 equalization": {"correct": 9416, "hash": "452b0a6dd4c3e0fb"},
    "methods W2A8 bias-correction": {"correct": 8570, "hash": "df4ca6169689621a"},
    "methods W2A8 all three": {"correct": 9785},
    "methods mixed 2.5 A8": {"correct": 9743, "hash": "250ef93a062dcfe3"},
    "torch-int8": {"correct": 9829, "hash": "8ba712a00e850445"},
    "qat lsq W2A2 3000 images": {"correct": 9707},
    "qat ste W2A2 3000 images": {"correct": 9651},
    # without its engine gap's disagreeing images (ea8d967: [5960], a tie at the old logit scale; now none)
    # and its suggestions (1ed58f8 added a candidate, "the first and last layers at 8 bits"; these are the
    # numbers of e1ee65f, the commit before it, whose whole report gave d6bfaa4f81847046)
    "diagnosis W3A3 but the disagreeing images and suggestions": {
        "exact": "4f18d0894ba79f23",
        "floats": [33, 137.618086, 86.74353, 19.639512],
    },
    # e1ee65f's three best suggestions: the new candidate may push the last one out, nothing else changes
    "diagnosis W3A3 suggestions but the first and last layers at 8 bits": [
        ["weights at 4 bits instead of 3", 0.982699990272522],
        ["keep fc1 in float", 0.9805999994277954],
        ["keep fc2 in float", 0.9801999926567078],
    ],
    "diagnosis W3A3 disagreeing images": [],
}


def _report_fingerprint(report: dict[str, object]) -> dict[str, object]:
    """A report's integers, strings and layout as one exact hash (each float replaced by a marker),
    and its floats as their count, the sum of their magnitudes, that sum weighted by position (so a
    swap shows) and the largest magnitude: sums that survive a different last digit on another CPU."""
    floats: list[float] = []

    def skeleton(value: object) -> object:
        if isinstance(value, float):
            floats.append(value)
            return "<float>"
        if isinstance(value, dict):
            return {str(k): skeleton(value[k]) for k in sorted(value, key=str)}
        if isinstance(value, list | tuple):
            return [skeleton(v) for v in value]
        return value

    layout = json.dumps(skeleton(report), default=str).encode()
    magnitudes = [abs(v) for v in floats]
    return {
        "exact": hashlib.sha256(layout).hexdigest()[:16],
        "floats": [
            len(floats),
            round(sum(magnitudes), 6),
            round(sum(i * m for i, m in enumerate(magnitudes, 1)) / max(len(floats), 1), 6),
            round(max(magnitudes, default=0.0), 6),
        ],
    }


def _hash(predictions: torch.Tensor) -> str:
    return hashlib.sha256(predictions.to(torch.int8).numpy().tobytes()).hexdigest()[:16]


def _predictions(module, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([module(images[i : i + 1000]).argmax(1) for i in range(0, len(images), 1000)])


def _ptq_numbers(model, data, changes: dict[str, object]) -> dict[str, object]:
    from qcore.analysis.tables import quantize_for
    from qcore.quantize.config import QuantConfig

    qnet = quantize_for(model, data, QuantConfig().with_changes(**changes))
    predictions = _predictions(qnet, data.test.images)
    return {"correct": int((predictions == data.test.labels).sum()), "hash": _hash(predictions)}, qnet, predictions


def _integer_numbers(qnet, data, simulated: torch.Tensor) -> dict[str, object]:
    from qcore.inference.integer import IntegerNet

    predictions = IntegerNet(qnet).predict(data.test.images)
    return {
        "correct": int((predictions == data.test.labels).sum()),
        "disagreements": int((predictions != simulated).sum()),
        "hash": _hash(predictions),
    }


def capture_fast(model, data) -> dict[str, object]:
    """PTQ and integer-engine numbers, ONNX Runtime and the explain walk: the fast tier's share."""
    from qcore.export.formats import OnnxRunner, export_onnx
    from qcore.lessons.walk import explain

    numbers: dict[str, object] = {}
    for name, changes in PTQ_CONFIGS.items():
        numbers[f"ptq {name}"], qnet, simulated = _ptq_numbers(model, data, changes)
        if name in INTEGER_CONFIGS:
            numbers[f"integer {name}"] = _integer_numbers(qnet, data, simulated)
        if name in ("W8A8", "W4A4"):
            onnx_predictions = OnnxRunner(export_onnx(qnet)).predict(data.test.images)
            numbers[f"onnxruntime {name}"] = {
                "disagreements": int((onnx_predictions != simulated).sum()),
                "hash": _hash(onnx_predictions),
            }
    from qcore.quantize.config import QuantConfig

    walk = explain(model, data, QuantConfig(weight_bits=4, act_bits=4), 0, {}).to_dict()
    numbers["explain W4A4 image 0 before fc2"] = _report_fingerprint(_walk_before_the_logits(walk))
    return numbers


# What the explain walk held at ea8d967 (it has since learnt residual adds, in a list of their own)
OLD_WALK_KEYS = ("image", "label", "prediction", "float_prediction", "float_probabilities", "layers")


def _walk_before_the_logits(walk: dict[str, object]) -> dict[str, object]:
    """The explain walk as ea8d967 had it, without its last layer and logits: the part the finer logit
    scale left alone."""
    layers = walk["layers"]
    return {**{k: walk[k] for k in OLD_WALK_KEYS}, "layers": layers[:-1]}  # type: ignore[index]


# The W4A4 walk of test image 0 at 586af23, before the finer logit scale: its int32 logits, and fc2's M0
# and shift for the predicted digit (7)
OLD_LOGITS = [-90, -139, 421, 539, -837, -291, -2116, 2116, -327, 443]
OLD_FC2_MULTIPLIER, OLD_FC2_SHIFT = 1295209541, 1


def test_the_finer_logits_are_the_old_ones_times_two_to_the_k(pretrained, mnist):
    """Scaling a multiplier by 2^k keeps its M0 and adds k to its shift (frexp's mantissa does not
    move), so with v = acc * M0 * 2^(shift - 31) the old logit was round(v) and the new one is
    round(v * 2^k): they differ from old * 2^k by at most 2^(k-1) + 1/2."""
    from qcore.analysis.tables import quantize_for
    from qcore.inference.integer import IntegerNet
    from qcore.lessons.walk import explain
    from qcore.quantize.config import QuantConfig

    config = QuantConfig(weight_bits=4, act_bits=4)
    k = IntegerNet(quantize_for(pretrained, mnist, config)).logit_bits
    assert k > 0
    walk = explain(pretrained, mnist, config, 0, {})
    fc2 = walk.layers[-1]
    assert (fc2.name, fc2.position, walk.prediction) == ("fc2", [7], 7)
    assert (fc2.multiplier, fc2.shift) == (OLD_FC2_MULTIPLIER, OLD_FC2_SHIFT + k)
    for new, old in zip(walk.logits_int32, OLD_LOGITS, strict=True):
        assert abs(new - old * 2**k) <= 2 ** (k - 1) + 0.5


def capture_slow(model, data, diagnosis=None, all_methods=None) -> dict[str, object]:
    """Methods, PyTorch's int8 kernels, a short QAT run and the W3A3 diagnosis (`diagnosis`: the suite's
    own W3A3 diagnosis of this model, computed once for every test that reads it; `all_methods`: likewise
    its W2A8 quantization with all three methods)."""
    from qcore.inference.torch_int8 import torch_int8_model
    from qcore.quantize.config import QuantConfig
    from qcore.quantize.qmodel import calibration_data
    from qcore.training.qat import QatConfig, qat

    numbers: dict[str, object] = {}
    for name, changes in METHOD_CONFIGS.items():
        if name == "W2A8 all three" and all_methods is not None:
            predictions = _predictions(all_methods, data.test.images)
            numbers[f"methods {name}"] = {"correct": int((predictions == data.test.labels).sum())}
            continue
        numbers[f"methods {name}"] = _ptq_numbers(model, data, changes)[0]
    int8 = torch_int8_model(model, calibration_data(data.train, QuantConfig()))
    predictions = _predictions(int8, data.test.images)
    numbers["torch-int8"] = {"correct": int((predictions == data.test.labels).sum()), "hash": _hash(predictions)}
    for method in ("lsq", "ste"):
        result = qat(model, data, QatConfig(weight_bits=2, act_bits=2, epochs=1, method=method, train_samples=3000))
        predictions = _predictions(result.qnet, data.test.images)
        numbers[f"qat {method} W2A2 3000 images"] = {
            "correct": int((predictions == data.test.labels).sum()),
            "hash": _hash(predictions),
        }
    from qcore.analysis.diagnose import diagnose

    if diagnosis is None:
        diagnosis = diagnose(model, data, QuantConfig(weight_bits=3, act_bits=3), 0.9832)
    report = diagnosis.to_dict()
    gap = report["engine_gap"]
    numbers["diagnosis W3A3 disagreeing images"] = gap["disagreeing_images"]  # type: ignore[index]
    report["engine_gap"] = {k: v for k, v in gap.items() if k != "disagreeing_images"}  # type: ignore[union-attr]
    suggestions = report.pop("suggestions")
    config = report["config"]  # d799adc's two new settings, off here, were not in e1ee65f's config
    assert config.pop("edge_bits") == 0 and config.pop("add_bits") == 0  # type: ignore[union-attr]
    numbers["diagnosis W3A3 suggestions but the first and last layers at 8 bits"] = [
        [s["text"], s["accuracy"]]
        for s in suggestions  # type: ignore[attr-defined]
        if "edge_bits" not in s["changes"]
    ]
    numbers["diagnosis W3A3 but the disagreeing images and suggestions"] = _report_fingerprint(report)
    return numbers


# images either way for the runs that follow a gradient; the spread seen between two CPUs was 2 for
# AdaRound and 21 / 8 for the QAT runs (see the module's docstring)
TOLERANCE: dict[str, int] = {
    "methods W2A8 all three": 10,
    "qat lsq W2A2 3000 images": 60,
    "qat ste W2A2 3000 images": 60,
}


def _matches(key: str, got: object, expected: object) -> bool:
    if key == "diagnosis W3A3 suggestions but the first and last layers at 8 bits":
        return len(got) >= len(expected) - 1 and got == expected[: len(got)]
    if key in TOLERANCE:
        return abs(got["correct"] - expected["correct"]) <= TOLERANCE[key]
    if isinstance(expected, dict) and "floats" in expected:
        pairs = zip(got["floats"], expected["floats"], strict=True)
        close = all(math.isclose(g, e, rel_tol=1e-4, abs_tol=1e-6) for g, e in pairs)
        return got["exact"] == expected["exact"] and close
    return got == expected


# A third kind of CPU (AMD EPYC with AVX2 and no AVX-512, 2026-12): the MSE range search picks another
# candidate for one per-tensor range and one integer of the walk rounds the other way, both from float
# kernels that sum in another order. These are what aa46c6c (the last commit before the export and this
# table changed) printed there; every other number it printed was EXPECTED's, ONNX Runtime's W8A8 row aside
# (1 disagreement: its U8S8 kernels saturated there, which the export's U8U8 weights since avoid).
# A fourth (AMD EPYC with AVX-512, VNNI and BF16, 2026-12-07): the same walk's integers once more, at
# 3cfa350 (which passed CI), every other number EXPECTED's.
OTHER_CPU: dict[str, list[object]] = {
    "ptq mse W4A4 per-tensor": [{"correct": 9823, "hash": "291aefe7e8fe73cc"}],
    "explain W4A4 image 0 before fc2": [
        {"exact": "dc84b83075886c15", "floats": [16, 1.0894, 0.571489, 0.999935]},
        {"exact": "0653b8a0d3bfe79e", "floats": [16, 1.0894, 0.571489, 0.999935]},
    ],
}


def _check(numbers: dict[str, object], keys) -> None:
    mismatches = {
        key: (numbers[key], EXPECTED[key])
        for key in keys
        if not _matches(key, numbers[key], EXPECTED[key])
        and not any(_matches(key, numbers[key], other) for other in OTHER_CPU.get(key, []))
    }
    assert not mismatches, f"changed from the numbers before the model graph: {mismatches}"


@pytest.mark.slow
def test_ptq_integer_onnx_and_explain_are_unchanged(pretrained, mnist):
    numbers = capture_fast(pretrained, mnist)
    _check(numbers, numbers)


@pytest.mark.slow
def test_methods_torch_int8_and_qat_are_unchanged(pretrained, mnist, w3a3_diagnosis, w2a8_all_methods):
    numbers = capture_slow(pretrained, mnist, w3a3_diagnosis, w2a8_all_methods)
    _check(numbers, numbers)


if __name__ == "__main__":
    from qcore.data import load_mnist
    from qcore.models.checkpoint import load_model

    model, data = load_model(), load_mnist(download=False)
    print(json.dumps({**capture_fast(model, data), **capture_slow(model, data)}, indent=1))
