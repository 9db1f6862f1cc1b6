"""Lesson 4: one outlier collapses the grid; per-channel scales and MSE clipping rescue it (or not)."""

import streamlit as st

from qcore.figures import outlier_figure
from qcore.lessons.steps import (
    OUTLIER_CALIB_BATCHES,
    OUTLIER_DEFAULT_FACTOR,
    OUTLIER_FACTORS,
    OUTLIER_TARGETS,
    outlier_conclusion,
    outlier_layer,
)
from ui import cache, session
from ui.lessons import lesson_links
from ui.tables import table_with_csv

session.require_navigation()  # first: a deep link on a fresh server may run this page alone
st.title("Outliers")
lesson_links("pages/outliers.py")
entry, config, report = session.current_report()
mnist = session.mnist_or_stop()
st.markdown(
    "A min/max range stretches to reach the largest value, so one outlier makes the step s huge and "
    "leaves ordinary values only a few levels. Per-channel scales confine the damage to one channel; "
    "an MSE-chosen range may clip the outlier instead. Put one in and measure."
)
st.latex(
    r"s = \frac{\max |x|}{q_{\max}} \quad\Rightarrow\quad "
    r"\text{levels in the typical range} \approx \frac{\mathrm{range}}{s}"
)
layer_name = outlier_layer(entry.model)
columns = st.columns(2)
target = columns[0].radio(
    "Where",
    list(OUTLIER_TARGETS),
    format_func=lambda t: {"weights": f"{layer_name}'s largest weight", "calibration": "one calibration image"}[t],
    key="lesson4_target",
    horizontal=True,
)
factor = columns[1].select_slider(
    "Multiplied by", [int(f) for f in OUTLIER_FACTORS], value=int(OUTLIER_DEFAULT_FACTOR), key="lesson4_factor"
)
with st.spinner("Eight calibrations and evaluations…"):
    rows = cache.outliers(
        entry.fingerprint, config.to_json(), target, float(factor), session.data_folder(), entry.model
    )
if entry.qat is not None:
    st.caption(
        "This lesson is about how ranges are chosen, so it calibrates the model's float weights afresh: for a QAT "
        "model it shows PTQ of its trained weights, not the trained grid."
    )
settings = [r.setting for r in rows if not r.with_outlier]
without = {r.setting: r for r in rows if not r.with_outlier}
with_outlier = {r.setting: r for r in rows if r.with_outlier}
st.caption(
    f"{layer_name} at the sidebar's {config.bits_label}, "
    f"calibrated on {OUTLIER_CALIB_BATCHES} batches "
    "to stay quick; accuracy on the first 2,000 test images; SQNR leaves the outlier itself out."
)
first, second = st.columns(2)
first.plotly_chart(
    outlier_figure(
        settings,
        [100 * without[s].accuracy for s in settings],
        [100 * with_outlier[s].accuracy for s in settings],
        "accuracy (%)",
        (100 * rows[0].float_accuracy, 100 * next(r for r in rows if r.with_outlier).float_accuracy),
    ),
    key="outlier_accuracy",
)
second.plotly_chart(
    outlier_figure(
        settings, [without[s].sqnr_db for s in settings], [with_outlier[s].sqnr_db for s in settings], "SQNR (dB)"
    ),
    key="outlier_sqnr",
)
table_with_csv(
    [
        {
            "setting": r.setting,
            "outlier": "yes" if r.with_outlier else "no",
            "scale": r.scale,
            "levels in the typical range": r.levels_in_typical_range,
            "SQNR (dB)": round(r.sqnr_db, 2),
            "accuracy (%)": round(100 * r.accuracy, 2),
            "float, same outlier (%)": round(100 * r.float_accuracy, 2),
            "quantization's cost (points)": round(r.quantization_cost, 2),
        }
        for r in rows
    ],
    "outlier lesson",
    "outliers",
)
st.info(outlier_conclusion(rows), icon=":material/lightbulb:")
