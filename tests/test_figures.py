"""Figure builders turn plain data into plotly figures that carry exactly that data."""

from __future__ import annotations

import math

import pytest
import torch

from qcore.analysis.tables import LayerRow, Sensitivity, SweepPoint, WeightHistogram, block_rows, weight_histogram
from qcore.figures import (
    activation_histogram_figure,
    activation_ranges_figure,
    block_reconstruction_figure,
    digits_figure,
    error_histogram_figure,
    per_class_figure,
    range_history_figure,
    sensitivity_figure,
    sqnr_figure,
    sweep_figure,
    training_curve_figure,
    weight_histogram_figure,
)
from qcore.quantize.calibrate import ActivationStats, RangeSnapshot
from qcore.quantize.qmodel import LayerQuant
from qcore.quantize.quant import Scheme, choose_qparams, quantize


def stats(layer: str, observed: tuple[float, float], clip: tuple[float, float], batches: int = 3) -> ActivationStats:
    history = [
        RangeSnapshot(
            b,
            observed[0],
            observed[1] * b / batches,
            clip[0] if b in (1, 2, batches) else None,
            clip[1] if b in (1, 2, batches) else None,
        )
        for b in range(1, batches + 1)
    ]
    return ActivationStats(layer, "minmax", *observed, *clip, [1, 5, 2], [0.0, 1.0, 2.0, 3.0], history)


def test_activation_ranges_bars_span_observed_and_clip():
    fig = activation_ranges_figure([stats("conv1", (-0.5, 3.0), (-0.4, 2.5)), stats("fc1", (0.0, 9.0), (0.0, 7.0))])
    observed, clip = fig.data
    assert list(observed.base) == [-0.5, 0.0] and list(observed.x) == [3.5, 9.0]
    assert list(clip.base) == [-0.4, 0.0] and list(clip.x) == [2.9, 7.0]
    assert list(clip.y) == ["conv1", "fc1"]


def test_range_history_has_every_batch_and_only_snapshot_clips():
    fig = range_history_figure([stats("conv2", (0.0, 6.0), (0.0, 5.0), batches=4)])
    observed, clip = fig.data
    assert list(observed.x) == [1, 2, 3, 4] and list(observed.y) == [1.5, 3.0, 4.5, 6.0]
    assert list(clip.x) == [1, 2, 4]


def test_weight_histogram_figure_counts_and_levels():
    weight = torch.tensor([[-1.0, -0.2, 0.1, 0.9]])
    qparams = choose_qparams(weight.min(), weight.max(), 2, Scheme.SYMMETRIC)  # levels -1, 0, 1
    quant = LayerQuant("fc2", weight, torch.zeros(1), qparams, quantize(weight, qparams), None, None, None)
    hist = weight_histogram(quant, bins=4)
    assert hist.levels == [-1.0, 0.0, 1.0]
    assert sum(hist.float_counts) == 4 and sum(hist.quant_counts) == 4
    assert hist.errors == pytest.approx([0.0, 0.2, -0.1, 0.1])
    fig = weight_histogram_figure(hist)
    float_bars, quant_bars, levels = fig.data
    assert list(float_bars.y) == hist.float_counts and list(quant_bars.y) == hist.quant_counts
    assert [x for x in levels.x if x is not None] == [-1.0, -1.0, 0.0, 0.0, 1.0, 1.0]


def test_weight_histogram_without_levels_has_two_traces():
    hist = WeightHistogram("fc1", None, [0.0, 1.0, 2.0], [1, 2], [2, 1], [], [0.1])
    assert len(weight_histogram_figure(hist).data) == 2


def test_sqnr_figure_hides_infinite_values():
    row = LayerRow("conv1", True, [0.1], [0], True, 0.0, 1.0, 0.0, 1.0, 0.1, 0, float("inf"), 30.0)
    weights, activations = sqnr_figure([row]).data
    assert list(weights.y) == [None] and list(activations.y) == [30.0]


def test_per_class_figure_in_percent():
    fig = per_class_figure([0.5, 1.0], [0.25, 0.75])
    assert list(fig.data[0].y) == [50.0, 100.0] and list(fig.data[1].y) == [25.0, 75.0]


def test_sweep_figure_uses_the_swept_bits_and_float_line():
    points = [SweepPoint(8, 2, 0.5, 1.0), SweepPoint(8, 4, 0.9, 0.3)]
    fig = sweep_figure(points, 0.98, "activations")
    assert list(fig.data[0].x) == [2, 4] and list(fig.data[0].y) == [50.0, 90.0]
    assert fig.layout.shapes[0].y0 == pytest.approx(98.0)


def test_sensitivity_training_error_and_digit_figures():
    assert list(sensitivity_figure([Sensitivity("fc1", 0.97, 0.01)]).data[0].y) == [1.0]
    curve = training_curve_figure([{"loss": 2.0, "accuracy": 0.1}, {"loss": 1.0, "accuracy": 0.5}])
    assert list(curve.data[0].y) == [2.0, 1.0] and list(curve.data[1].y) == [10.0, 50.0]
    assert list(error_histogram_figure([0.1, -0.1], "fc1").data[0].x) == [0.1, -0.1]
    digit = [[float(r * 28 + c) for c in range(28)] for r in range(28)]
    grid = digits_figure([digit] * 7, [f"#{i}" for i in range(7)], columns=6)
    assert [a.text for a in grid.layout.annotations] == [f"#{i}" for i in range(7)]
    canvas = grid.data[0].z
    assert len(canvas) == 2 * 36 and len(canvas[0]) == 6 * 36  # two rows of six 28-pixel tiles + gaps
    assert list(canvas[8][0:28]) == digit[0]  # first tile's top row, below the title gap
    assert list(canvas[36 + 8 + 27][0:28]) == digit[27]  # seventh image: second row, first column
    assert math.isnan(canvas[8][28])  # the gap between tiles stays empty (no colour)
    hist = activation_histogram_figure(stats("conv1", (-0.5, 3.0), (-0.4, 2.5)))
    assert list(hist.data[0].y) == [1, 5, 2] and list(hist.data[0].x) == [0.5, 1.5, 2.5]
    assert sorted(shape.x0 for shape in hist.layout.shapes) == [-0.4, 2.5]  # both clip ends marked


def test_sensitivity_chart_keeps_a_one_image_difference_small():
    from qcore.analysis.tables import Sensitivity
    from qcore.figures import SENSITIVITY_MIN_SPAN, sensitivity_figure

    rows = [Sensitivity(n, 0.9831, 0.0001) for n in ("conv1", "conv2")] + [Sensitivity("fc1", 0.9832, 0.0)]
    figure = sensitivity_figure(rows)
    low, high = figure.layout.yaxis.range
    assert high - low >= SENSITIVITY_MIN_SPAN  # a 0.01-point bar fills 1% of the height, not all of it
    assert list(figure.data[0].text) == ["+0.01", "+0.01", "+0.00"]


def test_equalization_chart_is_a_distribution_not_500_bars():
    from qcore.figures import equalization_figure

    figure = equalization_figure("fc1->fc2", [float(i) for i in range(1, 501)], [2.0] * 500)
    assert [trace.type for trace in figure.data] == ["box", "box"]
    assert "500 channels" in figure.layout.title.text


def test_flipped_digit_titles_are_readable():
    from qcore.figures import digits_figure

    figure = digits_figure([[[0.0] * 28] * 28] * 2, ["#1 label 7: 7→1", "#2 label 2: 2→3"])
    assert all(a.font.size >= 14 for a in figure.layout.annotations)


def test_bias_shift_chart_shows_a_distribution_for_many_channels():
    from qcore.figures import MAX_CHANNEL_BARS, bias_shift_figure

    few = bias_shift_figure("conv1", [0.1 * i for i in range(20)])
    many = bias_shift_figure("fc1", [0.001 * i for i in range(500)])
    assert few.data[0].type == "bar" and len(few.data[0].x) == 20
    assert many.data[0].type == "histogram" and len(many.data[0].x) == 500 > MAX_CHANNEL_BARS
    assert "500 channels" in many.layout.title.text


# --- read at a glance (issue 29) -------------------------------------------------------------------


def test_accuracy_per_class_starts_at_zero_so_a_drop_is_seen_at_its_size():
    fig = per_class_figure([0.99, 0.98], [0.77, 0.97])
    assert tuple(fig.layout.yaxis.range) == (0, 100)


def test_weight_level_lines_only_where_levels_can_be_told_apart():
    from qcore.figures import MAX_DRAWN_LEVELS

    weight = torch.linspace(-1, 1, 25).reshape(1, 25)
    for bits, drawn in ((4, True), (8, False)):  # 15 levels are drawn; 255 over 25 weights were a grey wash
        qparams = choose_qparams(weight.min(), weight.max(), bits, Scheme.SYMMETRIC)
        quant = LayerQuant("fc2", weight, torch.zeros(1), qparams, quantize(weight, qparams), None, None, None)
        hist = weight_histogram(quant, bins=8)
        assert (len(hist.levels) <= MAX_DRAWN_LEVELS) == drawn
        assert (len(weight_histogram_figure(hist).data) == 3) == drawn


def test_the_engine_gap_chart_counts_what_differs_and_keeps_the_zero_bin():
    from qcore.figures import lsb_difference_figure

    fig = lsb_difference_figure({"conv1": {0: 4_199_999, 1: 1}, "fc1": {0: 500}})
    assert fig.layout.title.text.endswith("1 of 4,200,500 output values differ")
    assert list(fig.data[0].x) == ["0", "+1"] and list(fig.data[0].y) == [4_199_999, 1]
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.dtick == 1  # labelled at decades only


def test_block_reconstruction_rows_and_figure_carry_the_report():
    report = {
        "layer1": {
            "kind": "residual",
            "layers": ["layer1.conv1", "layer1.conv2"],
            "objective_nearest": 40.0,
            "objective_reconstructed": 10.0,
            "kept": True,
            "flipped_fraction": 0.125,
        },
        "fc": {
            "kind": "layer",
            "layers": ["fc"],
            "objective_nearest": 2.0,
            "objective_reconstructed": 2.0,
            "kept": False,
            "flipped_fraction": 0.0,
        },
    }
    rows = block_rows(report)
    assert rows[0]["error removed (%)"] == 75.0  # 1 - 10 / 40
    assert rows[0]["weights rounded the other way (%)"] == 12.5
    assert rows[0]["layers"] == "layer1.conv1, layer1.conv2"
    assert rows[1]["kept"].startswith("no") and rows[1]["error removed (%)"] == 0.0
    figure = block_reconstruction_figure(["layer1", "fc"], [40.0, 2.0], [10.0, 2.0])
    assert [list(bar.y) for bar in figure.data] == [[40.0, 2.0], [10.0, 2.0]]
    assert figure.layout.yaxis.type == "log"
