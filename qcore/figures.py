"""Plotly figures built from plain data (lists, dicts, qcore results); the pages only place them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from qcore.analysis.tables import LayerRow, Sensitivity, SweepPoint, WeightHistogram
from qcore.graph.diagram import Diagram, DiagramBox
from qcore.quantize.calibrate import ActivationStats

FLOAT_COLOR = "#1f77b4"
QUANT_COLOR = "#d62728"
CLIP_COLOR = "#ff7f0e"


def _layout(fig: go.Figure, title: str, x: str, y: str) -> go.Figure:
    fig.update_layout(
        title=title,
        xaxis_title=x,
        yaxis_title=y,
        margin={"l": 40, "r": 20, "t": 50, "b": 40},
        legend={"orientation": "h", "y": -0.2},
        template="plotly_white",
    )
    return fig


def activation_ranges_figure(stats: Sequence[ActivationStats]) -> go.Figure:
    """Per layer: the observed [min, max] as a wide pale bar, the chosen clipping range inside it."""
    layers = [s.layer for s in stats]
    fig = go.Figure()
    fig.add_bar(
        name="observed range",
        y=layers,
        x=[s.observed_max - s.observed_min for s in stats],
        base=[s.observed_min for s in stats],
        orientation="h",
        marker_color="rgba(31,119,180,0.35)",
        width=0.6,
    )
    fig.add_bar(
        name="clipping range",
        y=layers,
        x=[s.clip_max - s.clip_min for s in stats],
        base=[s.clip_min for s in stats],
        orientation="h",
        marker_color=CLIP_COLOR,
        width=0.25,
    )
    fig.update_layout(barmode="overlay")
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, "Activation range at each layer's input", "value", "layer")


def range_history_figure(stats: Sequence[ActivationStats]) -> go.Figure:
    """Observed max (every batch) and clipping max (at snapshot points) against batches seen."""
    fig = make_subplots(rows=1, cols=len(stats), subplot_titles=[s.layer for s in stats], shared_yaxes=False)
    for column, layer_stats in enumerate(stats, start=1):
        batches = [h.batches for h in layer_stats.history]
        fig.add_scatter(
            x=batches,
            y=[h.observed_max for h in layer_stats.history],
            mode="lines",
            name="observed max",
            line_color=FLOAT_COLOR,
            showlegend=column == 1,
            row=1,
            col=column,
        )
        points = [h for h in layer_stats.history if h.clip_max is not None]
        fig.add_scatter(
            x=[h.batches for h in points],
            y=[h.clip_max for h in points],
            mode="lines+markers",
            name="clipping max",
            line_color=CLIP_COLOR,
            showlegend=column == 1,
            row=1,
            col=column,
        )
        if len(batches) > 16:
            fig.update_xaxes(type="log", dtick=1, row=1, col=column)  # labels at decades only
    return _layout(fig, "How the range grows as calibration batches are added", "batches", "max")


MAX_DRAWN_LEVELS = 16  # beyond, level lines cannot be told apart: 255 of them over 25 weights were a grey wash


def weight_histogram_figure(hist: WeightHistogram) -> go.Figure:
    """Float and quantized weights on shared bins, the quantization levels as dotted lines where they can be
    told apart (MAX_DRAWN_LEVELS or fewer)."""
    centers = [(a + b) / 2 for a, b in zip(hist.edges[:-1], hist.edges[1:], strict=True)]
    width = hist.edges[1] - hist.edges[0]
    fig = go.Figure()
    fig.add_bar(x=centers, y=hist.float_counts, width=width, name="float", marker_color=FLOAT_COLOR, opacity=0.6)
    fig.add_bar(x=centers, y=hist.quant_counts, width=width, name="quantized", marker_color=QUANT_COLOR, opacity=0.6)
    if hist.levels and len(hist.levels) <= MAX_DRAWN_LEVELS:
        # One trace of vertical segments (not one shape per level: plotly re-validates each shape).
        top = max(max(hist.float_counts), max(hist.quant_counts))
        xs = [x for level in hist.levels for x in (level, level, None)]
        ys = [y for _ in hist.levels for y in (0, top, None)]
        fig.add_scatter(
            x=xs, y=ys, mode="lines", name="quantization levels", line={"color": "gray", "width": 1, "dash": "dot"}
        )
    fig.update_layout(barmode="overlay")
    where = hist.layer if hist.channel is None else f"{hist.layer}, channel {hist.channel}"
    return _layout(fig, f"Weights of {where}: before and after quantization", "weight value", "count")


def error_histogram_figure(errors: Sequence[float], layer: str) -> go.Figure:
    fig = go.Figure(go.Histogram(x=list(errors), nbinsx=60, marker_color=QUANT_COLOR))
    return _layout(fig, f"Quantization error of {layer}'s weights (quantized - float)", "error", "count")


def sqnr_figure(rows: Sequence[LayerRow]) -> go.Figure:
    layers = [r.layer for r in rows]

    def finite(value: float | None) -> float | None:
        return value if value is not None and value != float("inf") else None

    fig = go.Figure()
    fig.add_bar(x=layers, y=[finite(r.weight_sqnr_db) for r in rows], name="weights", marker_color=FLOAT_COLOR)
    fig.add_bar(x=layers, y=[finite(r.act_sqnr_db) for r in rows], name="activations", marker_color=CLIP_COLOR)
    fig.update_layout(barmode="group")
    return _layout(fig, "Signal-to-quantization-noise ratio per layer (higher is better)", "layer", "SQNR (dB)")


def per_class_figure(
    float_accuracy: Sequence[float], quant_accuracy: Sequence[float], class_names: Sequence[str] | None = None
) -> go.Figure:
    """Float and quantized accuracy per class; named by `class_names` (MNIST's digits by default)."""
    names = list(class_names) if class_names is not None else [str(d) for d in range(len(float_accuracy))]
    digits = names == [str(d) for d in range(len(names))]
    fig = go.Figure()
    fig.add_bar(x=names, y=[100 * a for a in float_accuracy], name="float", marker_color=FLOAT_COLOR)
    fig.add_bar(x=names, y=[100 * a for a in quant_accuracy], name="quantized", marker_color=QUANT_COLOR)
    # from 0: an axis cut at 75 made 76.69% at W2A8 look like nothing lost
    fig.update_layout(barmode="group", yaxis_range=[0, 100])
    what = "digit" if digits else "class"
    return _layout(fig, f"Accuracy per {what}", what, "accuracy (%)")


def sweep_figure(points: Sequence[SweepPoint], float_accuracy: float, target: str) -> go.Figure:
    bits = [p.weight_bits if target == "weights" else p.act_bits for p in points]
    fig = go.Figure()
    fig.add_scatter(x=bits, y=[100 * p.accuracy for p in points], mode="lines+markers", name="quantized")
    fig.add_hline(y=100 * float_accuracy, line_dash="dash", line_color="gray", annotation_text="float")
    fig.update_xaxes(dtick=1)
    return _layout(fig, f"Accuracy by bit-width ({target})", "bits", "accuracy (%)")


SENSITIVITY_MIN_SPAN = 1.0  # points: tiny drops (a test image is 0.01) stay small bars, not full-height ones


def sensitivity_figure(rows: Sequence[Sensitivity]) -> go.Figure:
    drops = [100 * r.drop for r in rows]
    fig = go.Figure(
        go.Bar(x=[r.layer for r in rows], y=drops, marker_color=QUANT_COLOR, text=[f"{d:+.2f}" for d in drops])
    )
    low, high = min([0.0, *drops]), max([0.0, *drops])
    if high - low < SENSITIVITY_MIN_SPAN:
        fig.update_yaxes(range=[min(low, -0.1), low + SENSITIVITY_MIN_SPAN])
    return _layout(fig, "Accuracy lost when only this layer is quantized", "layer", "drop (points)")


def training_curve_figure(history: Sequence[dict[str, float]]) -> go.Figure:
    steps = list(range(1, len(history) + 1))
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_scatter(x=steps, y=[h["loss"] for h in history], name="loss", line_color=QUANT_COLOR)
    fig.add_scatter(
        x=steps,
        y=[100 * h["accuracy"] for h in history],
        name="running accuracy (%)",
        line_color=FLOAT_COLOR,
        secondary_y=True,
    )
    return _layout(fig, "Training", "step", "loss")


def qat_curve_figure(held_out: Sequence[dict[str, float]], losses: Sequence[float]) -> go.Figure:
    """QAT's live curve: the quantized training loss per step and the quantized accuracy on the
    held-out slice where it was measured."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_scatter(x=list(range(1, len(losses) + 1)), y=list(losses), name="quantized loss", line_color=QUANT_COLOR)
    fig.add_scatter(
        x=[point["step"] for point in held_out],
        y=[100 * point["accuracy"] for point in held_out],
        name="held-out quantized accuracy (%)",
        mode="lines+markers",
        line_color=FLOAT_COLOR,
        secondary_y=True,
    )
    return _layout(fig, "Quantization-aware training", "step", "loss")


def weight_snapshots_figure(snapshots: Sequence[dict[str, object]], layer: str) -> go.Figure:
    """One layer's weights in units of their channel's step (w / s), one histogram line per epoch:
    during QAT they gather on the integer levels."""
    fig = go.Figure()
    for snapshot in snapshots:
        entry = snapshot["layers"][layer]  # type: ignore[index]
        counts, low, high = entry["counts"], entry["low"], entry["high"]
        width = (high - low) / len(counts)
        centers = [low + width * (i + 0.5) for i in range(len(counts))]
        label = "start (PTQ grid)" if snapshot["epoch"] == 0 else f"after epoch {snapshot['epoch']}"
        fig.add_scatter(x=centers, y=counts, name=label, mode="lines", line_shape="hvh")
    return _layout(fig, f"{layer} weights during QAT, in steps of their channel's scale", "w / s", "weights")


def digits_figure(images: Sequence[Sequence[Sequence[float]]], titles: Sequence[str], columns: int = 6) -> go.Figure:
    """A grid of 28x28 images (pixel values as given), each titled: one tiled heatmap, since one
    trace per image makes a slow figure."""
    count = len(images)
    rows = max(1, -(-count // columns))
    size, gap = 28, 8
    height, width = rows * (size + gap), columns * (size + gap)
    # a numpy canvas (NaN between tiles: no colour): plotly validates a list of lists value by value,
    # a quarter of a new what-if's page time
    canvas = np.full((height, width), np.nan)
    annotations = []
    for index, image in enumerate(images):
        top, left = (index // columns) * (size + gap) + gap, (index % columns) * (size + gap)
        tile = np.asarray(image, dtype=float)
        canvas[top : top + tile.shape[0], left : left + tile.shape[1]] = tile
        annotations.append(
            {
                "x": left + size / 2,
                "y": top - 1,
                "text": titles[index],
                "showarrow": False,
                "yanchor": "bottom",
                "font": {"size": 14},
            }
        )
    fig = go.Figure(go.Heatmap(z=canvas, colorscale="gray", showscale=False, hoverinfo="skip"))
    fig.update_xaxes(visible=False, range=[-0.5, width - 0.5])
    fig.update_yaxes(visible=False, autorange="reversed", scaleanchor="x")
    fig.update_layout(
        annotations=annotations,
        height=170 * rows + 40,
        margin={"l": 10, "r": 10, "t": 20, "b": 10},
        template="plotly_white",
    )
    return fig


def activation_histogram_figure(stats: ActivationStats) -> go.Figure:
    """The calibration sample of one layer's input (log counts) with the clipping range marked."""
    edges = stats.histogram_edges
    centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)]
    fig = go.Figure(go.Bar(x=centers, y=stats.histogram_counts, name="values", marker_color=FLOAT_COLOR))
    fig.add_vline(x=stats.clip_max, line_dash="dash", line_color=CLIP_COLOR, annotation_text="clip max")
    if stats.clip_min < 0:
        fig.add_vline(x=stats.clip_min, line_dash="dash", line_color=CLIP_COLOR, annotation_text="clip min")
    fig.update_yaxes(type="log", dtick=1)  # labels at decades only (it labelled "1, 9, 8 ... 0.1")
    return _layout(fig, f"Values entering {stats.layer} (calibration sample)", "value", "count (log)")


def throughput_figure(engines: Sequence[str], images_per_second: Sequence[float]) -> go.Figure:
    fig = go.Figure(go.Bar(x=list(engines), y=list(images_per_second), marker_color=FLOAT_COLOR))
    return _layout(fig, "Throughput on the 10k test set (one run)", "inference path", "images / s")


def equalization_figure(pair: str, ranges_before: Sequence[float], ranges_after: Sequence[float]) -> go.Figure:
    """How the pair's first-layer channel ranges (max |w|) are distributed before and after
    equalization: one box per state, every channel a point (500 bars side by side are unreadable)."""
    fig = go.Figure()
    fig.add_box(y=list(ranges_before), name="before", marker_color=FLOAT_COLOR, boxpoints="all", jitter=0.4)
    fig.add_box(y=list(ranges_after), name="after", marker_color=CLIP_COLOR, boxpoints="all", jitter=0.4)
    fig.update_layout(showlegend=False)
    fig.update_yaxes(type="log", dtick=1)
    count = len(ranges_before)
    return _layout(fig, f"Equalization {pair}: max |w| of its {count} channels", "", "max |w| per channel (log)")


def adaround_figure(layers: Sequence[str], flipped_fraction: Sequence[float]) -> go.Figure:
    fig = go.Figure(go.Bar(x=list(layers), y=[100 * f for f in flipped_fraction], marker_color=QUANT_COLOR))
    return _layout(fig, "Weights AdaRound rounds the other way than nearest", "layer", "flipped (%)")


def block_reconstruction_figure(
    blocks: Sequence[str], nearest: Sequence[float], reconstructed: Sequence[float]
) -> go.Figure:
    """Each block's output error with nearest rounding beside what block reconstruction left (log scale:
    the blocks' errors span orders of magnitude)."""
    fig = go.Figure(
        [
            go.Bar(name="nearest rounding", x=list(blocks), y=list(nearest), marker_color=FLOAT_COLOR),
            go.Bar(name="reconstructed", x=list(blocks), y=list(reconstructed), marker_color=QUANT_COLOR),
        ]
    )
    fig.update_yaxes(type="log", dtick=1)
    fig.update_layout(barmode="group")
    return _layout(fig, "Each block's output error on the calibration images", "block", "squared error (log)")


MAX_CHANNEL_BARS = 50  # more bars than this are unreadable: show the distribution instead


def bias_shift_figure(layer_name: str, shifts: Sequence[float]) -> go.Figure:
    """The bias shift per output channel: one bar each for a few channels, else their distribution
    (fc1 has 500 channels)."""
    if len(shifts) <= MAX_CHANNEL_BARS:
        fig = go.Figure(go.Bar(x=list(range(len(shifts))), y=list(shifts), marker_color=FLOAT_COLOR))
        return _layout(fig, f"Bias correction of {layer_name} per output channel", "channel", "bias shift")
    fig = go.Figure(go.Histogram(x=list(shifts), nbinsx=40, marker_color=FLOAT_COLOR))
    title = f"Bias correction of {layer_name}: the shifts of its {len(shifts)} channels"
    return _layout(fig, title, "bias shift", "channels")


def _edge_path(x0: float, y0: float, x1: float, y1: float, arc: bool) -> tuple[list[float], list[float]]:
    """An arrow's points: straight, or an arc above the boxes a skip along one lane passes."""
    if not arc:
        return [x0, x1], [y0, y1]
    steps = [i / 12 for i in range(13)]
    return [x0 + (x1 - x0) * t for t in steps], [y0 + 0.55 * 4 * t * (1 - t) for t in steps]


def network_diagram_figure(
    diagram: Diagram, damage_points: dict[str, float] | None = None, title: str = "Click a layer for its detail"
) -> go.Figure:
    """The model graph's boxes left to right, branches below the main path, arrows for what each box
    reads (a skip along the main path arcs over the boxes it skips). With `damage_points`, each layer is
    filled by the accuracy it loses alone (white: none, red: the worst), else coloured by its kind.
    Layer markers carry their name as customdata, so a click (Streamlit's point selection) names it."""
    fig = go.Figure()
    xs: list[float | None] = []
    ys: list[float | None] = []
    for source, target in diagram.edges:
        a, b = diagram.box(source), diagram.box(target)
        path_x, path_y = _edge_path(a.x, -a.lane, b.x, -b.lane, diagram.passes_over(source, target))
        xs += [*path_x, None]
        ys += [*path_y, None]
    fig.add_scatter(x=xs, y=ys, mode="lines", line={"color": "#888", "width": 2}, hoverinfo="skip", showlegend=False)

    def hover(box: DiagramBox) -> str:
        parameters = f", {box.parameters:,} parameters" if box.parameters else ""
        return f"{box.name}: {box.kind.replace('_', ' ')}, output {list(box.shape)}{parameters}"

    others = [box for box in diagram.boxes if not box.is_layer]
    fig.add_scatter(
        x=[box.x for box in others],
        y=[-box.lane for box in others],
        mode="markers+text",
        marker={"symbol": "square", "size": 40, "color": "#eeeeee", "line": {"color": "#555", "width": 1}},
        text=[box.label for box in others],
        textposition="middle center",
        hovertext=[hover(box) for box in others],
        hoverinfo="text",
        showlegend=False,
        unselected={"marker": {"opacity": 1}, "textfont": {"color": "#222"}},  # a click must not fade the diagram
    )
    layers = [box for box in diagram.boxes if box.is_layer]
    marker: dict[str, object] = {"symbol": "square", "size": 54, "line": {"color": "#333", "width": 2}}
    if damage_points is not None:
        worst = max([*damage_points.values(), 1e-9])
        marker |= {
            "color": [damage_points.get(box.name, 0.0) for box in layers],
            "colorscale": [[0, "#ffffff"], [1, QUANT_COLOR]],
            "cmin": 0,
            "cmax": worst,
            "colorbar": {"title": {"text": "points lost<br>alone"}, "thickness": 12},
        }
        hovers = [
            f"{hover(box)}<br>{damage_points.get(box.name, 0.0):.2f} points lost when only it is quantized"
            for box in layers
        ]
    else:
        kind_colors = {"conv": "#d6e6f5", "depthwise_conv": "#fde2c4", "linear": "#dcefd6"}
        marker["color"] = [kind_colors[box.kind] for box in layers]
        hovers = [hover(box) for box in layers]
    fig.add_scatter(
        x=[box.x for box in layers],
        y=[-box.lane for box in layers],
        mode="markers+text",
        marker=marker,
        text=["<br>".join(f"<b>{line}</b>" for line in Diagram.short_label(box.label)) for box in layers],
        textposition="middle center",
        textfont={"size": 10},
        customdata=[box.name for box in layers],
        hovertext=hovers,
        hoverinfo="text",
        showlegend=False,
        unselected={"marker": {"opacity": 1}, "textfont": {"color": "#222"}},
        selected={"marker": {"opacity": 1}},
    )
    lanes = max((box.lane for box in diagram.boxes), default=0)
    fig.update_xaxes(visible=False, range=[-0.6, len(diagram.boxes) - 0.4])
    fig.update_yaxes(visible=False, range=[-lanes - 0.7, 1.0])
    fig.update_layout(
        height=170 + 70 * lanes,
        margin={"l": 10, "r": 10, "t": 30, "b": 10},
        template="plotly_white",
        title=title,
        dragmode=False,
        clickmode="event+select",
    )
    return fig


def lsb_difference_figure(differences: dict[str, dict[int, int]]) -> go.Figure:
    """Per layer, how many output integers the integer engine puts 0, 1, 2, ... LSB away from the
    simulation's, on a log scale (the zero bin holds almost all of them); the title counts the differing
    values, so one differing value in millions is read as that, not as a bar."""
    fig = go.Figure()
    for layer_name, counts in differences.items():
        bins = sorted(counts.items())
        fig.add_bar(x=[f"{k:+d}" if k else "0" for k, _ in bins], y=[c for _, c in bins], name=layer_name)
    total = sum(sum(counts.values()) for counts in differences.values())
    differing = sum(c for counts in differences.values() for k, c in counts.items() if k != 0)
    fig.update_layout(barmode="group")
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="log", dtick=1)
    title = f"Integer engine minus simulation: {differing:,} of {total:,} output values differ"
    return _layout(fig, title, "difference (LSB)", "values (log scale)")


def diagnosis_accuracy_figure(
    layers: Sequence[str], accuracies: dict[str, Sequence[float]], float_accuracy: float, quant_accuracy: float
) -> go.Figure:
    """Per layer, accuracy (%) in each variant, with the float and fully quantized accuracies as lines."""
    fig = go.Figure()
    for name, values in accuracies.items():
        fig.add_bar(x=list(layers), y=[100 * v for v in values], name=name)
    fig.add_hline(y=100 * float_accuracy, line_dash="dot", line_color=FLOAT_COLOR, annotation_text="float")
    fig.add_hline(y=100 * quant_accuracy, line_dash="dot", line_color=QUANT_COLOR, annotation_text="all quantized")
    low = min([100 * v for values in accuracies.values() for v in values] + [100 * quant_accuracy])
    fig.update_yaxes(range=[max(0.0, low - 0.5), min(100.0, 100 * float_accuracy + 0.3)])
    fig.update_layout(barmode="group")
    return _layout(fig, "Accuracy with parts of the network quantized", "layer", "accuracy (%)")


def number_line_figure(
    levels: Sequence[float], range_min: float, range_max: float, x: float, x_hat: float, title: str
) -> go.Figure:
    """One value on the quantization grid: every level a tick, the covered range shaded, x and its
    reconstruction x_hat marked. `levels` may be empty (too many to draw)."""
    fig = go.Figure()
    fig.add_shape(
        type="rect", x0=range_min, x1=range_max, y0=-0.5, y1=0.5, fillcolor=CLIP_COLOR, opacity=0.12, line_width=0
    )
    if levels:
        fig.add_scatter(
            x=list(levels),
            y=[0] * len(levels),
            mode="markers",
            marker={"symbol": "line-ns-open", "size": 22, "color": "gray"},
            name=f"the {len(levels)} levels",
            hovertemplate="level %{x:.5g}<extra></extra>",
        )
    fig.add_scatter(
        x=[x],
        y=[0.25],
        mode="markers+text",
        marker={"size": 12, "color": FLOAT_COLOR},
        name="x",
        text=["x"],
        textposition="top center",
    )
    fig.add_scatter(
        x=[x_hat],
        y=[-0.25],
        mode="markers+text",
        marker={"size": 12, "color": QUANT_COLOR},
        name="x̂ = s(q − z)",
        text=["x̂"],
        textposition="bottom center",
    )
    low, high = min(range_min, x, x_hat), max(range_max, x, x_hat)
    pad = 0.08 * (high - low or 1.0)
    fig.update_yaxes(visible=False, range=[-1, 1])
    fig.update_xaxes(range=[low - pad, high + pad])
    fig.update_layout(height=240)
    _layout(fig, title, "", "")
    fig.update_layout(legend={"orientation": "h", "y": -0.35})  # below the tick labels, clear of them
    return fig


def heatmaps_figure(
    titles: Sequence[str], matrices: Sequence[Sequence[Sequence[float]]], annotate: bool = True
) -> go.Figure:
    """Small heatmaps side by side (a filter, its integers, ...), each with its own color scale and,
    for small matrices, the numbers written in the cells."""
    fig = make_subplots(rows=1, cols=len(matrices), subplot_titles=list(titles), horizontal_spacing=0.04)
    for index, matrix in enumerate(matrices, start=1):
        small = annotate and len(matrix) <= 8
        fig.add_heatmap(
            z=matrix,
            colorscale="RdBu",
            zmid=0,
            showscale=False,
            text=[[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row] for row in matrix] if small else None,
            texttemplate="%{text}" if small else None,
            textfont={"size": 10},
            row=1,
            col=index,
        )
        fig.update_yaxes(autorange="reversed", showticklabels=False, row=1, col=index)
        fig.update_xaxes(showticklabels=False, row=1, col=index)
    fig.update_layout(height=260, margin={"l": 10, "r": 10, "t": 40, "b": 10}, template="plotly_white")
    return fig


def logits_figure(logits_int32: Sequence[int], float_probabilities: Sequence[float]) -> go.Figure:
    """The integer logits beside the float model's softmax, digit by digit."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["int32 logits (integer engine)", "softmax (float model)"])
    digits = [str(d) for d in range(10)]
    fig.add_bar(x=digits, y=list(logits_int32), marker_color=QUANT_COLOR, showlegend=False, row=1, col=1)
    fig.add_bar(x=digits, y=list(float_probabilities), marker_color=FLOAT_COLOR, showlegend=False, row=1, col=2)
    fig.update_layout(height=300, margin={"l": 40, "r": 10, "t": 40, "b": 30}, template="plotly_white")
    return fig


def outlier_figure(
    settings: Sequence[str],
    without: Sequence[float],
    with_outlier: Sequence[float],
    what: str,
    float_levels: tuple[float, float] | None = None,
) -> go.Figure:
    """One measure per range setting, without and with the outlier; `float_levels` (the float model without
    and with the outlier) as dashed lines, so the outlier's own effect is not read as quantization's."""
    fig = go.Figure()
    fig.add_bar(x=list(settings), y=list(without), name="without the outlier", marker_color=FLOAT_COLOR)
    fig.add_bar(x=list(settings), y=list(with_outlier), name="with the outlier", marker_color=QUANT_COLOR)
    if float_levels is not None:
        for level, text, color in zip(
            float_levels, ("float model", "float model with the outlier"), (FLOAT_COLOR, QUANT_COLOR), strict=True
        ):
            fig.add_hline(y=level, line_dash="dash", line_color=color, annotation_text=text)
    fig.update_layout(barmode="group", height=320)
    fig.update_yaxes(rangemode="tozero")
    return _layout(fig, what, "range setting", what)


def channel_ranges_figure(layer: str, ranges_before: Sequence[float], ranges_after: Sequence[float]) -> go.Figure:
    """max |w| of every output channel of `layer`, before and after BatchNorm folding (log scale): the
    spread one per-tensor scale has to cover."""
    channels = list(range(len(ranges_before)))
    fig = go.Figure()
    fig.add_bar(x=channels, y=list(ranges_before), name="before folding", marker_color=FLOAT_COLOR)
    fig.add_bar(x=channels, y=list(ranges_after), name="after folding", marker_color=QUANT_COLOR)
    fig.update_layout(barmode="group")
    fig.update_yaxes(type="log", dtick=1)
    return _layout(fig, f"{layer}: weight range per output channel", "output channel", "max |w| (log)")


GRANULARITY_SERIES = (
    ("per_channel", "per-channel"),
    ("per_tensor", "per-tensor"),
    ("per_tensor_equalized", "per-tensor + equalization"),
    ("per_tensor_mse", "per-tensor, MSE-clipped weights"),
)


def granularity_figure(rows: Sequence[dict[str, float]]) -> go.Figure:
    """Accuracy per bit-width: per-channel, per-tensor, per-tensor after equalization (min/max weight
    ranges) and per-tensor with MSE-clipped weights (rows carry 'bits' and those keys as fractions)."""
    bits = [str(row["bits"]) for row in rows]
    fig = go.Figure()
    colors = (FLOAT_COLOR, QUANT_COLOR, CLIP_COLOR, "#999999")
    for (key, name), color in zip(GRANULARITY_SERIES, colors, strict=True):
        fig.add_bar(x=bits, y=[100 * row[key] for row in rows], name=name, marker_color=color)
    low = min(100 * row[key] for row in rows for key, _ in GRANULARITY_SERIES)
    fig.update_layout(barmode="group", yaxis_range=[max(0.0, low - 5), 100])
    return _layout(fig, "Accuracy by weight granularity", "bits", "accuracy (%)")


def residual_figure(adds: Sequence[str], own_db: Sequence[float], shared_db: Sequence[float]) -> go.Figure:
    """Per residual add: its output's SQNR with each tensor on its own grid and with one shared grid."""
    fig = go.Figure()
    fig.add_bar(x=list(adds), y=list(own_db), name="own scales (requantized)", marker_color=FLOAT_COLOR)
    fig.add_bar(x=list(adds), y=list(shared_db), name="one shared scale", marker_color=QUANT_COLOR)
    fig.update_layout(barmode="group")
    return _layout(fig, "Residual add output: SQNR", "add", "SQNR (dB)")


def pareto_figure(
    labels: Sequence[str],
    sizes: Sequence[float],
    accuracies: Sequence[float],
    frontier: Sequence[int],
    chosen: int | None,
    target: float,
    float_accuracy: float,
    size_title: str,
) -> go.Figure:
    """The auto search's points: size against validation accuracy (in %), each labelled with its config;
    the frontier as a line, the chosen point ringed, the accuracy budget as a dashed line. Every point
    carries its index as customdata, so a click can name it."""
    fig = go.Figure()
    within = [i for i, a in enumerate(accuracies) if a >= target - 1e-12]
    outside = [i for i in range(len(labels)) if i not in set(within)]
    for name, indices, color in (
        ("within the budget", within, "#2ca02c"),
        ("outside the budget", outside, "#9e9e9e"),
    ):
        fig.add_scatter(
            name=name,
            x=[sizes[i] for i in indices],
            y=[100 * accuracies[i] for i in indices],
            customdata=indices,
            text=[labels[i] for i in indices],
            mode="markers",
            marker={"color": color, "size": 10},
            hovertemplate="%{text}<br>%{x:,.4~g}<br>validation %{y:.2f}%<extra></extra>",
        )
    fig.add_scatter(
        name="frontier",
        x=[sizes[i] for i in frontier],
        y=[100 * accuracies[i] for i in frontier],
        customdata=list(frontier),
        text=[labels[i] for i in frontier],
        mode="lines",
        line={"color": FLOAT_COLOR, "shape": "hv"},
        hoverinfo="skip",
    )
    if chosen is not None:
        fig.add_scatter(
            name="chosen: the smallest within the budget",
            x=[sizes[chosen]],
            y=[100 * accuracies[chosen]],
            customdata=[chosen],
            text=[labels[chosen]],
            mode="markers",
            marker={"color": "rgba(0,0,0,0)", "size": 22, "line": {"color": QUANT_COLOR, "width": 3}},
            hovertemplate="%{text}<extra>chosen</extra>",
        )
    fig.add_hline(y=100 * target, line_dash="dash", line_color=QUANT_COLOR, annotation_text="budget")
    fig.add_hline(y=100 * float_accuracy, line_dash="dot", line_color=FLOAT_COLOR, annotation_text="float")
    fig.update_xaxes(rangemode="tozero", tickformat=",")
    fig.update_layout(clickmode="event+select")
    return _layout(
        fig, "Every config measured: smaller is left, more accurate is up", size_title, "validation accuracy (%)"
    )
