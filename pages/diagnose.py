"""Diagnose: which layer causes the drop, what to do about it, and where the engines part."""

import time

import streamlit as st

from qcore.analysis.diagnose import layer_table, worst_channels
from qcore.analysis.report import damage_points, diagnosis_html
from qcore.analysis.tables import weight_histogram
from qcore.figures import (
    diagnosis_accuracy_figure,
    lsb_difference_figure,
    network_diagram_figure,
    weight_histogram_figure,
)
from ui import cache, session
from ui.tables import table_with_csv

LAYER_KEY = "diagnose_layer"
PICK_KEY = "diagnose_last_pick"

session.require_navigation()  # first: a deep link on a fresh server may run this page alone
st.title("Diagnose")
entry, config, report = session.current_report()
st.markdown(
    "Which layer causes the drop? Each layer is quantized alone, then everything but it, then only its "
    "weights or only its input, all from the same calibration and on all 10,000 test images. The "
    "signal-to-quantization-noise ratio of its output says where error enters (**isolated**: only "
    "this layer quantized) and where it grows (**accumulated**: everything up to it quantized)."
)
st.latex(r"\mathrm{SQNR} = 10 \log_{10} \frac{\sum y^2}{\sum (y - \hat{y})^2}\ \mathrm{dB}")
st.page_link(
    "pages/auto.py",
    label="Or let the lab search: the smallest config within the accuracy you can lose (Auto)",
    icon=":material/auto_mode:",
)

if entry.qat_applies(config):
    # A diagnosis calibrates variants of the config; for a QAT model they would not be the trained model.
    st.info(
        "This is a QAT model on its trained grid. A diagnosis calibrates variants of the settings (each layer "
        "alone, one more bit, another range rule), which would diagnose PTQ of its float weights, not the "
        "trained model. Change any setting in the sidebar to diagnose PTQ of its weights."
    )
    session.stop_page()
key = (entry.fingerprint, config.to_json(), session.data_folder())
bar = st.empty()  # a progress bar, only while a diagnosis is computed (a cached one returns at once)
measured = st.empty()  # and the rows measured so far, filled in layer by layer


first_report: list[tuple[float, float]] = []  # when the diagnosis first said how far it was, and how far


def show(done: int, total: int, what: str) -> None:
    now = time.monotonic()
    if not first_report:
        first_report.append((now, done / total))
    left = cache.time_left(first_report[0], now, done / total)
    bar.progress(done / total, text=f"Diagnosing ({done}/{total}{left}): {what}")


def show_rows(rows_so_far: list) -> None:
    measured.dataframe(layer_table(rows_so_far), hide_index=True, key=f"diagnosis_so_far_{len(rows_so_far)}")


try:
    result = cache.diagnosis(*key, entry.model, on_progress=show, on_row=show_rows)
except Exception as error:  # noqa: BLE001 - a model that cannot be diagnosed is explained, not a traceback
    session.show_compute_failure(error)
    session.stop_page()
bar.empty()
measured.empty()

columns = st.columns(2)
columns[0].metric("Float accuracy", session.percent(result.float_accuracy))
columns[1].metric(
    "Quantized accuracy",
    session.percent(result.quant_accuracy),
    delta=f"{100 * (result.quant_accuracy - result.float_accuracy):+.2f} pts",
)

damages = {row.layer: damage_points(result.float_accuracy, row) for row in result.layers}
event = st.plotly_chart(
    network_diagram_figure(result.diagram, damages),
    key="diagram",
    on_select="rerun",
    selection_mode="points",
)
picked = next((p.get("customdata") for p in event.selection.points if p.get("customdata")), None)
layer_names = [row.layer for row in result.layers]
if picked in layer_names and picked != st.session_state.get(PICK_KEY):
    st.session_state[PICK_KEY] = picked
    st.session_state[LAYER_KEY] = picked  # before the radio below is drawn
if LAYER_KEY not in st.session_state:
    st.session_state[LAYER_KEY] = max(damages, key=lambda name: damages[name])

rows = result.layers
st.plotly_chart(
    diagnosis_accuracy_figure(
        [r.layer for r in rows],
        {
            "only this layer": [r.only_this_accuracy for r in rows],
            "all but this layer": [r.all_but_this_accuracy for r in rows],
            "its weights only": [r.weights_only_accuracy for r in rows],
            "its input only": [r.activations_only_accuracy for r in rows],
        },
        result.float_accuracy,
        result.quant_accuracy,
    ),
    key="diagnosis_accuracy",
)
table_with_csv(layer_table(rows), "per-layer diagnosis", "diagnosis")

st.subheader("Layer detail")
chosen = st.radio("Layer", layer_names, key=LAYER_KEY, horizontal=True)
row = next(r for r in rows if r.layer == chosen)
layer_row = next(r for r in report.layers if r.layer == chosen)
lost = 100 * (result.float_accuracy - row.only_this_accuracy) + 0.0  # + 0.0: never "-0.00"
st.caption(
    f"{chosen}: {lost:.2f} points lost when only it is quantized; "
    f"SQNR {row.sqnr_isolated_db:.1f} dB isolated, {row.sqnr_accumulated_db:.1f} dB accumulated."
)
if layer_row.input_quantized:
    st.markdown(
        f"Input range: observed [{layer_row.act_observed_min:.4g}, {layer_row.act_observed_max:.4g}], "
        f"clipped to [{layer_row.act_clip_min:.4g}, {layer_row.act_clip_max:.4g}]: "
        f"scale {layer_row.act_scale:.4g}, zero point {layer_row.act_zero_point}."
    )
else:
    st.markdown("Its input stays float in this config.")
quant = report.qnet.layers[chosen]
if quant.weight_qparams is not None:
    st.plotly_chart(weight_histogram_figure(weight_histogram(quant)), key="diagnose_weights")
    table_with_csv(
        [{"channel": c.channel, "weight SQNR (dB)": round(c.weight_sqnr_db, 2)} for c in worst_channels(quant)],
        "worst channels",
        "worst_channels",
    )
else:
    st.markdown("Its weights stay float in this config.")

st.subheader("What to do about it")
if result.suggestions:
    st.caption("Each change below was applied and measured on the test set; Apply sets the sidebar to it.")
    for index, suggestion in enumerate(result.suggestions):
        text, button = st.columns([4, 1])
        text.markdown(
            f"**{suggestion.text}**: {session.percent(suggestion.accuracy)} "
            f"({suggestion.gain_points:+.2f} points) for {suggestion.extra_weight_bits:+.2f} average weight bits"
        )
        button.button(
            "Apply",
            key=f"apply_{index}",
            on_click=session.apply_settings,
            args=(suggestion.changes,),
            help=suggestion.text,
        )
else:
    st.info("None of the changes tried (a layer in float, one more bit, a better range rule) raised the accuracy.")

st.subheader("Integer engine vs simulation")
gap = result.engine_gap
if gap.available:
    st.markdown(
        f"The integer engine predicts differently from the simulation on **{len(gap.disagreeing_images)}** of the "
        "10,000 test images. Below, each layer (and each add or cat) gets the simulation's own input integers, so "
        "each gap is its own."
    )
    st.plotly_chart(lsb_difference_figure({g.layer: g.differences for g in gap.layers}), key="lsb_differences")
    table_with_csv(
        [
            {
                "layer": g.layer,
                "values compared": g.values,
                "differing": g.values - g.differences.get(0, 0),
                "within the tie window": g.differing_near_tie,
                "tie window (LSB)": g.tie_window,
                "farthest from a tie (LSB)": round(g.largest_tie_distance, 5),
            }
            for g in gap.layers
        ],
        "engine gap",
        "engine_gap",
    )
    st.caption(
        "Why: the simulation divides by the output scale in float and rounds half to even; the engine multiplies "
        "by a 31-bit fixed-point M0 and rounds once, half up. M0 approximates the real multiplier to 2^-31 of "
        "itself, so only a value within that error of a tie (x.5), or on one, can come out one integer apart; "
        "the tie window bounds that error, and float32's on the simulation's side, for the largest accumulator."
    )
    if gap.disagreeing_images:
        st.caption(f"Test images predicted differently (first 30): {gap.disagreeing_images[:30]}")
else:
    st.info(f"The integer engine cannot run this config: {gap.reason}.")

st.download_button(
    "Download the diagnosis report (HTML, works offline)",
    diagnosis_html(result, entry.name, entry.fingerprint),
    file_name=session.download_name(entry, "diagnosis", "html", config),
    mime="text/html",
    key="diagnosis_html",
)
