"""The auto search: every point it reports is what an independent evaluation of its config gives, the
frontier and the choice follow from the points, the search repeats itself, the test set never enters it,
and bad settings get one line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qcore.analysis.auto import (
    SearchPoint,
    SearchSettings,
    auto_search,
    choose,
    pareto_frontier,
    validation_split,
)
from qcore.data import calibration_indices
from qcore.inference.evaluate import evaluate
from qcore.quantize.config import QuantConfig
from qcore.quantize.qmodel import calibration_data, quantize_model
from tests.conftest import run_cli

# Enough configs to pass through uniform bits (W8 down to the first miss) and into the next stage
SMALL_SEARCH = SearchSettings(max_drop=0.5, budget_s=600, max_points=9)


@pytest.fixture(scope="module")
def small_search(pretrained, mnist):
    seen = []
    result = auto_search(pretrained, mnist, QuantConfig(), SMALL_SEARCH, on_point=lambda p, r: seen.append(p))
    return result, seen


def hand_validation(mnist, config: QuantConfig):
    """The last 5,000 training images outside the calibration sample, found without the module's helper."""
    calibration = set(calibration_indices(60000, config.calib_batches, config.batch_size, config.seed).tolist())
    free = [i for i in range(60000) if i not in calibration][-5000:]
    return mnist.train.images[free], mnist.train.labels[free]


def test_validation_images_are_training_images_calibration_never_sees(mnist):
    config = QuantConfig(calib_batches=4, batch_size=32, seed=7)
    split = validation_split(mnist.train, config)
    images, labels = hand_validation(mnist, config)
    assert torch.equal(split.images, images) and torch.equal(split.labels, labels)
    calibration = torch.cat(calibration_data(mnist.train, config))
    # not one calibration image among them (compared by pixels, not by index)
    assert not any(bool((split.images == image).all(dim=(1, 2, 3)).any()) for image in calibration)


@pytest.mark.slow
def test_every_point_is_what_an_independent_evaluation_of_its_config_gives(small_search, pretrained, mnist):
    result, seen = small_search
    assert seen == result.points and len(result.points) == SMALL_SEARCH.max_points
    assert result.stopped_by == "config limit"
    images, labels = hand_validation(mnist, QuantConfig())
    float_correct = (pretrained(images).argmax(1) == labels).float().mean().item()
    assert result.float_validation_accuracy == pytest.approx(float_correct, abs=1e-6)
    counts = {name: module.weight.numel() for name, module in pretrained.named_modules() if hasattr(module, "weight")}
    for point in result.points:
        qnet = quantize_model(pretrained, point.config, calibration_data(mnist.train, point.config))
        with torch.inference_mode():
            correct = (qnet(images).argmax(1) == labels).float().mean().item()
        assert point.validation_accuracy == pytest.approx(correct, abs=1e-6), point.label
        bits = {name: 32 if name in point.config.float_layers else point.config.weight_bits for name in counts}
        if point.config.edge_bits:
            bits.update(conv1=point.config.edge_bits, fc2=point.config.edge_bits)
        if not point.config.weight_bits_budget:  # mixed precision's layer bits are its own choice
            assert point.weight_bytes == math.ceil(sum(counts[n] * bits[n] for n in counts) / 8), point.label
    # uniform bits first, from 8 down, each one bit fewer until the first miss
    uniform = [p for p in result.points if p.stage == "uniform bits"]
    assert [p.config.weight_bits for p in uniform] == list(range(8, 8 - len(uniform), -1))
    assert all(result.within_budget(p) for p in uniform[:-1])


@pytest.mark.slow
def test_the_frontier_and_the_choice_follow_from_the_points(small_search):
    result, _ = small_search
    points = result.points
    frontier = result.frontier
    for point in points:  # a point off the frontier is beaten by one on it, on both counts
        if point not in frontier:
            assert any(
                f.weight_bytes <= point.weight_bytes and f.validation_accuracy >= point.validation_accuracy
                for f in frontier
            )
    within = [p for p in points if p.validation_accuracy >= result.float_validation_accuracy - 0.005 - 1e-12]
    assert result.chosen is not None and result.chosen.weight_bytes == min(p.weight_bytes for p in within)


def test_a_pareto_frontier_and_a_choice_by_hand():
    def point(size: int, accuracy: float) -> SearchPoint:
        return SearchPoint(QuantConfig(weight_bits=2 + size % 7), f"{size}", "hand", accuracy, size, 4.0, 8.0, 0.0)

    points = [point(10, 0.90), point(5, 0.80), point(7, 0.95), point(7, 0.70), point(3, 0.50), point(12, 0.97)]
    assert [p.label for p in pareto_frontier(points, "bytes")] == ["3", "5", "7", "12"]
    assert [p.weight_bytes for p in pareto_frontier(points, "bytes")] == [3, 5, 7, 12]
    assert choose(points, 0.90, "bytes").validation_accuracy == 0.95  # 7 bytes at 95% beats 10 at 90%
    assert choose(points, 0.99, "bytes") is None


@pytest.mark.slow
def test_the_same_search_gives_the_same_points(small_search, pretrained, mnist):
    result, _ = small_search
    again = auto_search(pretrained, mnist, QuantConfig(), SMALL_SEARCH)
    assert [(p.config, p.validation_accuracy, p.weight_bytes) for p in again.points] == [
        (p.config, p.validation_accuracy, p.weight_bytes) for p in result.points
    ]


def test_a_spent_time_budget_stops_the_search_and_says_so(pretrained, mnist):
    result = auto_search(pretrained, mnist, QuantConfig(), SearchSettings(budget_s=0.001))
    assert result.points == [] and result.stopped_by == "time budget" and result.chosen is None


def test_the_search_never_reads_the_test_set(pretrained, mnist, monkeypatch):
    """Evaluation is only ever given training images (the validation split) during the search."""
    import qcore.analysis.auto as auto

    seen = []

    def spy(model, split, batch_size=None):
        seen.append(split.content_hash)
        return evaluate(model, split, batch_size)

    monkeypatch.setattr(auto, "evaluate", spy)
    auto.auto_search(pretrained, mnist, QuantConfig(), SearchSettings(max_points=2))
    assert seen and all(mnist.train.content_hash in h and "validation" in h for h in seen)


@pytest.mark.slow
def test_auto_prints_flags_that_evaluate_reproduces():
    found = run_cli("auto", "--max-configs", "6", "--json")
    assert found.returncode == 0, found.stderr
    summary = json.loads(found.stdout)
    chosen = summary["chosen"]
    assert chosen is not None and chosen in summary["frontier"]
    assert set(chosen) >= {"config", "cli_flags", "validation_accuracy", "test_accuracy", "weight_bytes"}
    again = run_cli("evaluate", *chosen["cli_flags"], "--json")
    assert again.returncode == 0, again.stderr
    evaluated = json.loads(again.stdout)
    assert evaluated["config"] == chosen["config"]
    assert evaluated["quant_accuracy"] == pytest.approx(chosen["test_accuracy"], abs=1e-9)
    assert evaluated["float_accuracy"] == pytest.approx(summary["float_accuracy"], abs=1e-9)


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--max-drop", "-1"], "accuracy budget"),
        (["--max-drop", "nan"], "accuracy budget"),
        (["--max-drop", "half"], "invalid float value"),
        (["--objective", ""], "invalid choice"),
        (["--budget-s", "0"], "time budget"),
        (["--budget-s", "100000"], "time budget"),
        (["--budget-s", "-5"], "time budget"),
        (["--max-configs", "0"], "number of configs"),
    ],
)
def test_bad_search_settings_get_one_line(flags, says):
    found = run_cli("auto", *flags)
    assert found.returncode == 2
    assert found.stdout == "" and len(found.stderr.strip().splitlines()) == 1 and says in found.stderr


@pytest.mark.slow
def test_the_bits_objective_lowers_activations_too_and_integer_only_keeps_every_point_on_integers(pretrained, mnist):
    from qcore.quantize.config import integer_path_problems

    settings = SearchSettings(objective="bits", integer_only=True, max_points=10)
    result = auto_search(pretrained, mnist, QuantConfig(), settings)
    assert any(p.config.act_bits < 8 for p in result.points)  # activations are searched for this objective
    for point in result.points:
        assert integer_path_problems(point.config) == [], point.label
        if not point.config.edge_bits and not point.config.add_bits:
            assert point.average_activation_bits == point.config.act_bits  # every point at act_bits
            if not point.config.weight_bits_budget:
                assert point.average_bits == (point.config.weight_bits + point.config.act_bits) / 2
    within = [p for p in result.points if result.within_budget(p)]
    assert result.chosen.average_bits == min(p.average_bits for p in within)


def test_integer_only_is_refused_in_one_line_for_a_model_that_normalizes_in_float(mnist):
    """A per-sample normalization (an instance norm, float between a dequantize and a quantize) has no
    integer-only config: the search says so, naming it, before any calibration."""
    from torch import nn

    from qcore.graph.ops import Normalization

    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), Normalization("InstanceNormalization", (2, 3), 1e-5), nn.Flatten(), nn.Linear(2704, 10),
        nn.LogSoftmax(dim=1),
    ).eval()  # fmt: skip
    with pytest.raises(ValueError, match="no config of this model runs integer-only") as refused:
        auto_search(model, mnist, QuantConfig(), SearchSettings(integer_only=True))
    assert "\n" not in str(refused.value) and str(refused.value).endswith("(1)")  # one line, naming the op
