"""Acceptance numbers on the real MNIST test set with the bundled net (needs MNIST: fails if absent)."""

from __future__ import annotations

import pytest

from qcore.analysis.tables import bit_sweep, build_report, layer_sensitivity, quantize_for
from qcore.inference.evaluate import evaluate
from qcore.quantize.config import QuantConfig

CHANCE = 0.2  # ten balanced classes: anything this low has collapsed


def notebook_config(bits: int) -> QuantConfig:
    """The original notebook's method: batch-sum ranges, asymmetric per-tensor min-max weights, last layer float."""
    return QuantConfig(
        weight_bits=bits,
        act_bits=bits,
        observer="notebook",
        scheme="asymmetric",
        granularity="per-tensor",
        weight_range="minmax",
        float_layers=("fc2",),
    )


def test_bundled_net_scores_98_percent(float_eval):
    assert float_eval.accuracy >= 0.98
    assert float_eval.count == 10000


@pytest.mark.parametrize("bits,max_drop_points", [(8, 0.05), (4, 0.3), (3, 1.0)])
def test_default_ptq_stays_near_float(pretrained, mnist, float_eval, bits, max_drop_points):
    config = QuantConfig(weight_bits=bits, act_bits=bits)
    assert config.float_layers == () and config.quantize_input
    accuracy = evaluate(quantize_for(pretrained, mnist, config), mnist.test).accuracy
    assert 100 * (float_eval.accuracy - accuracy) <= max_drop_points


@pytest.mark.slow
def test_notebook_method_is_worse_than_default_at_8_bits(pretrained, mnist):
    default = evaluate(quantize_for(pretrained, mnist, QuantConfig()), mnist.test).accuracy
    notebook = evaluate(quantize_for(pretrained, mnist, notebook_config(8)), mnist.test).accuracy
    assert notebook < default


@pytest.mark.parametrize("bits", [5, 4])
def test_notebook_method_collapses_at_5_bits_and_below(pretrained, mnist, bits):
    accuracy = evaluate(quantize_for(pretrained, mnist, notebook_config(bits)), mnist.test).accuracy
    assert accuracy < CHANCE


@pytest.mark.slow
def test_report_agrees_with_direct_evaluation(pretrained, mnist, float_eval):
    config = QuantConfig(weight_bits=4, act_bits=6)
    report = build_report(pretrained, mnist, config, float_eval)
    direct = evaluate(quantize_for(pretrained, mnist, config), mnist.test)
    assert report.quant_result.accuracy == direct.accuracy
    flipped = sum(len(v) for v in report.flips.values())
    assert flipped == int((report.quant_result.predictions != float_eval.predictions).sum())
    # per-class accuracies weighted by class counts give back the overall accuracy
    counts = [int((mnist.test.labels == d).sum()) for d in range(10)]
    weighted = sum(a * c for a, c in zip(report.quant_result.per_class_accuracy, counts, strict=True)) / 10000
    assert weighted == pytest.approx(report.quant_result.accuracy, abs=1e-6)
    assert [row.layer for row in report.layers] == ["conv1", "conv2", "fc1", "fc2"]
    assert all(row.act_clip_max <= row.act_observed_max + 1e-6 for row in report.layers)


@pytest.mark.slow
def test_sweep_point_equals_evaluating_that_config(pretrained, mnist):
    points = bit_sweep(pretrained, mnist, QuantConfig(), [3], target="weights")
    direct = evaluate(quantize_for(pretrained, mnist, QuantConfig(weight_bits=3)), mnist.test)
    assert (points[0].weight_bits, points[0].act_bits) == (3, 8)
    assert points[0].accuracy == direct.accuracy


@pytest.mark.slow
def test_sensitivity_with_many_bits_loses_nothing(pretrained, mnist, float_eval):
    rows = layer_sensitivity(pretrained, mnist, QuantConfig(weight_bits=16, act_bits=16), float_eval.accuracy)
    assert [r.layer for r in rows] == ["conv1", "conv2", "fc1", "fc2"]
    assert all(abs(r.drop) <= 0.0005 for r in rows)
