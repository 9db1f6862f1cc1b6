"""A self-contained HTML report of a diagnosis: inline CSS and SVG, no script, nothing fetched.

Charts are drawn as SVG here rather than with plotly, whose embedded library carries dozens of
remote URLs (CDN and map tiles); the report must open offline and reference nothing outside itself.
Every piece of text is escaped: a model's name comes from an uploaded file.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from qcore.analysis.diagnose import Diagnosis, LayerDiagnosis


def damage_points(float_accuracy: float, row: LayerDiagnosis) -> float:
    """Accuracy lost, in points, when only this layer is quantized (the damage it does alone)."""
    return 100 * (float_accuracy - row.only_this_accuracy)


def damage_color(points: float, worst: float) -> str:
    """White (no damage) to red (the worst layer), as an RGB hex string."""
    fraction = 0.0 if worst <= 0 else max(0.0, min(1.0, points / worst))
    green_blue = round(255 - 180 * fraction)
    return f"#ff{green_blue:02x}{green_blue:02x}" if fraction > 0 else "#ffffff"


def _text(value: object) -> str:
    return html.escape(str(value), quote=True)


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _db(value: float) -> str:
    return "no error" if not math.isfinite(value) else f"{value:.1f} dB"


def diagram_svg(diagnosis: Diagnosis) -> str:
    """The model graph's boxes in execution order (branches on a lane below, arrows for what each box
    reads, a skip along one lane arcing over the boxes between), each layer filled by its damage."""
    assert diagnosis.diagram is not None
    diagram = diagnosis.diagram
    rows = {row.layer: row for row in diagnosis.layers}
    damages = {name: damage_points(diagnosis.float_accuracy, row) for name, row in rows.items()}
    worst = max(damages.values())
    width, gap, top, lane_height = 90, 30, 30, 80

    def place(x: int, lane: int) -> tuple[float, float]:
        return 10 + x * (width + gap), top + lane * lane_height

    parts = []
    for source, target in diagram.edges:
        a, b = diagram.box(source), diagram.box(target)
        (ax, ay), (bx, by) = place(a.x, a.lane), place(b.x, b.lane)
        if diagram.passes_over(source, target):  # a skip: an arc above the boxes it passes
            parts.append(
                f'<path d="M {ax + width / 2} {ay} Q {(ax + bx + width) / 2} {ay - 40} {bx + width / 2} {by}" '
                'fill="none" stroke="#555"/>'
            )
        else:
            parts.append(f'<line x1="{ax + width}" y1="{ay + 25}" x2="{bx}" y2="{by + 25}" stroke="#555"/>')
    for box in diagram.boxes:
        x, y = place(box.x, box.lane)
        fill = damage_color(damages[box.name], worst) if box.name in damages else "#eeeeee"
        detail = f"{0.0 - damages[box.name]:+.2f} pt" if box.name in damages else ""  # 0.0 - x: never "-0.00"
        parts.append(
            f'<rect x="{x}" y="{y}" width="{width}" height="50" rx="6" fill="{fill}" stroke="#555"/>'
            f'<text x="{x + width / 2}" y="{y + 24}" text-anchor="middle" font-weight="bold" '
            f'font-size="{12 if len(box.label) > 10 else 15}">{_text(box.label[:14])}</text>'
            f'<text x="{x + width / 2}" y="{y + 42}" text-anchor="middle" font-size="12">{_text(detail)}</text>'
        )
    total = 20 + len(diagram.boxes) * (width + gap)
    height = top + 60 + lane_height * max((box.lane for box in diagram.boxes), default=0)
    return (
        f'<svg width="{total}" height="{height}" font-family="sans-serif" '
        f'role="img" aria-label="network diagram">{"".join(parts)}</svg>'
    )


def bar_chart_svg(title: str, labels: Sequence[str], series: dict[str, Sequence[float]], unit: str) -> str:
    """Grouped horizontal bars, one group per label; non-finite values are drawn as absent."""
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    finite = [v for values in series.values() for v in values if math.isfinite(v)]
    top = max(finite + [1e-9])
    bar, row_gap, left, width = 14, 10, 70, 420
    height_per_label = bar * len(series) + row_gap
    parts = [f'<text x="0" y="14" font-weight="bold">{_text(title)}</text>']
    for i, label in enumerate(labels):
        y0 = 26 + i * height_per_label
        parts.append(f'<text x="0" y="{y0 + bar}" font-size="12">{_text(label)}</text>')
        for j, (name, values) in enumerate(series.items()):
            value = values[i]
            y = y0 + j * bar
            if math.isfinite(value):
                length = max(0.0, value) / top * width
                parts.append(
                    f'<rect x="{left}" y="{y}" width="{length:.1f}" height="{bar - 2}" fill="{colors[j % 4]}"/>'
                    f'<text x="{left + length + 4:.1f}" y="{y + bar - 3}" font-size="11">'
                    f"{value:.2f} {_text(unit)}</text>"
                )
            else:
                parts.append(f'<text x="{left}" y="{y + bar - 3}" font-size="11">{_text(name)}: no error</text>')
    legend_y = 26 + len(labels) * height_per_label + 6
    for j, name in enumerate(series):
        parts.append(
            f'<rect x="{left + j * 170}" y="{legend_y}" width="10" height="10" fill="{colors[j % 4]}"/>'
            f'<text x="{left + j * 170 + 14}" y="{legend_y + 9}" font-size="11">{_text(name)}</text>'
        )
    return f'<svg width="{left + width + 120}" height="{legend_y + 20}" font-family="sans-serif">{"".join(parts)}</svg>'


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{_text(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_text(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def diagnosis_html(diagnosis: Diagnosis, model_name: str, fingerprint: str) -> str:
    """The whole report as one HTML document."""
    d = diagnosis
    layer_table = _table(
        [
            "layer",
            "only this quantized",
            "all but this quantized",
            "weights only",
            "activations only",
            "SQNR isolated",
            "SQNR accumulated",
        ],
        [
            [
                r.layer,
                _percent(r.only_this_accuracy),
                _percent(r.all_but_this_accuracy),
                _percent(r.weights_only_accuracy),
                _percent(r.activations_only_accuracy),
                _db(r.sqnr_isolated_db),
                _db(r.sqnr_accumulated_db),
            ]
            for r in d.layers
        ],
    )
    damage_chart = bar_chart_svg(
        "Accuracy lost (points)",
        [r.layer for r in d.layers],
        {
            "only this layer quantized": [damage_points(d.float_accuracy, r) for r in d.layers],
            "everything quantized but this layer": [
                100 * (d.float_accuracy - r.all_but_this_accuracy) for r in d.layers
            ],
        },
        "pt",
    )
    sqnr_chart = bar_chart_svg(
        "SQNR of each layer's output (higher is better)",
        [r.layer for r in d.layers],
        {"isolated": [r.sqnr_isolated_db for r in d.layers], "accumulated": [r.sqnr_accumulated_db for r in d.layers]},
        "dB",
    )
    if d.suggestions:
        suggestions = _table(
            ["change", "accuracy after it", "gain", "extra average weight bits"],
            [
                [s.text, _percent(s.accuracy), f"{s.gain_points:+.2f} pt", f"{s.extra_weight_bits:+.2f}"]
                for s in d.suggestions
            ],
        )
    else:
        suggestions = "<p>No change tried here raised the accuracy.</p>"
    gap = d.engine_gap
    if gap.available:
        gap_rows = [
            [
                g.layer,
                g.values,
                sum(c for k, c in g.differences.items() if k != 0),
                ", ".join(f"{k:+d}: {c}" for k, c in sorted(g.differences.items()) if k != 0) or "none",
                "no tie window measured (an add's or a cat's own rounding)"
                if g.tie_window is None
                else f"{g.differing_near_tie} within {g.tie_window:.4g} LSB of a tie",
            ]
            for g in gap.layers
        ]
        engines = (
            f"<p>The integer engine and the simulation predict differently on {len(gap.disagreeing_images)} of "
            f"the 10,000 test images.</p>"
            + _table(["layer", "values compared", "differing", "differences (LSB: count)", "cause"], gap_rows)
            + "<p>Each layer, add and cat is fed the simulation's own input integers, so each gap is its own. A "
            "differing value lies within the tie window of a rounding tie: the simulation rounds the "
            "real value half to even in float, the engine multiplies by a 31-bit fixed-point approximation "
            "of the multiplier and rounds once, half up.</p>"
        )
    else:
        engines = f"<p>The integer engine cannot run this config: {_text(gap.reason)}.</p>"
    config_rows = [[key, value] for key, value in d.config.to_dict().items()]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Quantization Lab diagnosis</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; max-width: 1000px; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
</style></head><body>
<h1>Why did accuracy drop?</h1>
<p>Model: {_text(model_name)} (fingerprint {_text(fingerprint)}). Float accuracy {_percent(d.float_accuracy)},
quantized {_percent(d.quant_accuracy)} ({100 * (d.quant_accuracy - d.float_accuracy):+.2f} points), on the
10,000 MNIST test images.</p>
<h2>Where the damage is</h2>
{diagram_svg(d)}
<p>Each layer is filled by the accuracy lost when only that layer is quantized (white: none).</p>
{damage_chart}
{layer_table}
{sqnr_chart}
<h2>What to do about it</h2>
<p>Each change was applied and measured on the test set.</p>
{suggestions}
<h2>Integer engine vs simulation</h2>
{engines}
<h2>Config</h2>
{_table(["setting", "value"], config_rows)}
</body></html>
"""
