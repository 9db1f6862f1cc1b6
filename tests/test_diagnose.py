"""The diagnosis against independent computations: known identities, hand-built layers, applying
each suggestion for real, and the integer engine's own arithmetic."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from qcore.analysis.diagnose import apply_suggestion, diagnose, variant, worst_channels
from qcore.analysis.report import diagnosis_html
from qcore.analysis.tables import build_report, quantize_for
from qcore.data import Dataset
from qcore.inference.evaluate import evaluate
from qcore.models.net import LAYER_NAMES
from qcore.quantize.config import QuantConfig
from qcore.quantize.quant import dequantize, fake_quantize, sqnr_db
from tests.conftest import run_cli

W3A3 = QuantConfig(weight_bits=3, act_bits=3)
ONE_IMAGE = 1 / 10000


@pytest.fixture
def w3a3(w3a3_diagnosis):
    return w3a3_diagnosis


def test_sqnr_by_hand():
    assert sqnr_db(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])) == pytest.approx(10 * math.log10(2))
    assert sqnr_db(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0])) == math.inf


@pytest.mark.slow
def test_every_layer_float_reports_float_accuracy_everywhere(pretrained, mnist):
    small = Dataset(mnist.train, mnist.test.subset(2000))
    float_accuracy = evaluate(pretrained, small.test).accuracy
    result = diagnose(pretrained, small, QuantConfig(float_layers=LAYER_NAMES), float_accuracy)
    assert result.quant_accuracy == float_accuracy
    for row in result.layers:
        assert row.only_this_accuracy == row.all_but_this_accuracy == float_accuracy
        assert row.weights_only_accuracy == row.activations_only_accuracy == float_accuracy
        assert row.sqnr_isolated_db == row.sqnr_accumulated_db == math.inf
    assert result.suggestions == []
    assert not result.engine_gap.available and "every layer must be quantized" in result.engine_gap.reason
    assert result.to_dict()["layers"][0]["sqnr_isolated_db"] is None  # JSON has no infinity


@pytest.mark.slow
def test_quantized_accuracy_is_the_configs_own(w3a3, pretrained, mnist):
    assert w3a3.quant_accuracy == evaluate(quantize_for(pretrained, mnist, W3A3), mnist.test).accuracy


@pytest.mark.slow
def test_all_but_one_lies_between_quantized_and_float(w3a3):
    low, high = sorted((w3a3.quant_accuracy, w3a3.float_accuracy))
    for row in w3a3.layers:
        assert low - 5 * ONE_IMAGE <= row.all_but_this_accuracy <= high + 5 * ONE_IMAGE, row


@pytest.mark.slow
def test_first_layer_isolated_sqnr_equals_accumulated_and_a_hand_built_conv1(w3a3, pretrained, mnist):
    conv1 = next(r for r in w3a3.layers if r.layer == "conv1")
    assert conv1.sqnr_isolated_db == conv1.sqnr_accumulated_db
    # conv1 by hand from its qparams: fake-quantized input and weights, int32 bias, plain F.conv2d
    quant = quantize_for(pretrained, mnist, W3A3).layers["conv1"]
    x = mnist.test.images[:1000]
    weight = dequantize(quant.weight_int, quant.weight_qparams)
    bias = quant.bias_int.double() * (quant.input_qparams.scale.double() * quant.weight_qparams.scale.double())
    by_hand = F.conv2d(fake_quantize(x, quant.input_qparams), weight, bias.float())
    reference = F.conv2d(x, pretrained.conv1.weight.detach(), pretrained.conv1.bias.detach())
    assert conv1.sqnr_isolated_db == pytest.approx(sqnr_db(reference, by_hand), abs=1e-3)


@pytest.mark.slow
def test_later_layers_accumulate_more_error_than_they_add(w3a3):
    for row in w3a3.layers[1:]:
        assert row.sqnr_accumulated_db < row.sqnr_isolated_db


@pytest.mark.slow
def test_each_suggestion_gains_what_it_predicts_when_applied(w3a3, pretrained, mnist, float_eval):
    assert w3a3.suggestions, "at W3A3 some change must help"
    gains = [s.gain_points for s in w3a3.suggestions]
    assert gains == sorted(gains, reverse=True) and all(g > 0 for g in gains)
    for suggestion in w3a3.suggestions:
        applied = apply_suggestion(W3A3, suggestion)
        measured = build_report(pretrained, mnist, applied, float_eval).quant_result.accuracy
        assert measured == suggestion.accuracy
        assert suggestion.gain_points == pytest.approx(100 * (measured - w3a3.quant_accuracy))


@pytest.mark.slow
def test_keeping_a_layer_float_costs_its_share_of_weight_bits(w3a3):
    fc2 = next((s for s in w3a3.suggestions if s.changes.get("float_layers") == ["fc2"]), None)
    if fc2 is not None:  # fc2 holds 5,000 of the 431,000 weights: (32 - 3) x 5000 / 431080
        assert fc2.extra_weight_bits == pytest.approx(29 * 5000 / (500 + 25000 + 400000 + 5000))


@pytest.mark.slow
def test_engine_gap_is_one_lsb_at_rounding_ties(w3a3, pretrained, mnist):
    gap = w3a3.engine_gap
    assert gap.available
    simulated = evaluate(quantize_for(pretrained, mnist, W3A3), mnist.test).predictions
    from qcore.inference.integer import IntegerNet

    integer = IntegerNet(quantize_for(pretrained, mnist, W3A3)).predict(mnist.test.images)
    assert gap.disagreeing_images == (integer != simulated).nonzero().flatten().tolist()
    for layer_gap in gap.layers:
        assert set(layer_gap.differences) <= {-1, 0, 1}
        assert sum(layer_gap.differences.values()) == layer_gap.values
        differing = layer_gap.values - layer_gap.differences.get(0, 0)
        assert layer_gap.differing_near_tie == differing  # every one within the tie window
        assert layer_gap.largest_tie_distance <= layer_gap.tie_window


def test_variant_with_everything_on_is_the_net_itself(pretrained, mnist):
    qnet = quantize_for(pretrained, mnist, W3A3)
    x = mnist.test.images[:200]
    assert torch.equal(variant(qnet, set(LAYER_NAMES), set(LAYER_NAMES))(x), qnet(x))
    assert torch.allclose(variant(qnet, set(), set())(x), pretrained(x), atol=1e-5)


def test_worst_channels_by_hand(pretrained, mnist):
    quant = quantize_for(pretrained, mnist, W3A3).layers["conv1"]
    worst = worst_channels(quant, 3)
    by_hand = sorted(
        (sqnr_db(quant.weight[c].flatten(), dequantize(quant.weight_int, quant.weight_qparams)[c].flatten()), c)
        for c in range(20)
    )[:3]
    assert [(w.weight_sqnr_db, w.channel) for w in worst] == pytest.approx(by_hand)


@pytest.mark.slow
def test_html_report_is_self_contained_and_escapes_names(w3a3):
    page = diagnosis_html(w3a3, "<script>alert(1)</script>", "abc")
    lowered = page.lower()
    for remote in ("http:", "https:", "src=", "href=", "<script", "<link", "url(", "@import", "//"):
        assert remote not in lowered, remote
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert f"{100 * w3a3.quant_accuracy:.2f}%" in page and "<svg" in page
    linked = diagnosis_html(w3a3, '[x](http://evil.example) <a href="http://evil.example">', "abc")
    assert "<a " not in linked and "&lt;a href=&quot;http://evil.example&quot;&gt;" in linked  # text, not a link


@pytest.mark.slow
def test_cli_diagnose_json_and_html(tmp_path, w3a3, pretrained, monkeypatch):
    """The command's wiring and output: it diagnoses the bundled net at the flags' config with a
    progress callback, and prints and writes what the diagnosis holds (qcore's diagnosis itself is the
    shared W3A3 fixture, checked by the tests above; an ONNX model's diagnosis runs the whole command in
    test_onnx_import)."""
    import qcore.analysis.diagnose
    from qcore.models.checkpoint import fingerprint

    asked = []

    def shared_w3a3(model, data, config, float_accuracy=None, on_progress=None, **_):
        asked.append((fingerprint(model), data.test.labels.numel(), config))
        on_progress(1, 20, "conv1 only")
        return w3a3

    monkeypatch.setattr(qcore.analysis.diagnose, "diagnose", shared_w3a3)
    out = tmp_path / "report.html"
    done = run_cli("diagnose", "--weight-bits", "3", "--act-bits", "3", "--json", "--html", str(out), timeout=600)
    assert done.returncode == 0, done.stderr
    assert asked == [(fingerprint(pretrained), 10000, W3A3)]
    result = json.loads(done.stdout)
    assert result["float_accuracy"] == w3a3.float_accuracy and result["quant_accuracy"] == w3a3.quant_accuracy
    assert [row["layer"] for row in result["layers"]] == list(LAYER_NAMES)
    expected_keys = {
        "layer",
        "only_this_accuracy",
        "all_but_this_accuracy",
        "weights_only_accuracy",
        "activations_only_accuracy",
        "sqnr_isolated_db",
        "sqnr_accumulated_db",
    }
    for row, mine in zip(result["layers"], w3a3.layers, strict=True):
        assert set(row) == expected_keys
        assert row["all_but_this_accuracy"] == mine.all_but_this_accuracy
    assert "[1/" in done.stderr  # progress
    assert "http" not in out.read_text() and "Why did accuracy drop?" in out.read_text()
