"""Activations: calibrated ranges at each layer's input, and the qparams they give."""

import streamlit as st

from qcore.figures import activation_histogram_figure, activation_ranges_figure, range_history_figure
from ui import session
from ui.tables import table_with_csv

session.require_navigation()  # first: a deep link on a fresh server may run this page alone
st.title("Activations")
entry, config, report = session.current_report()
st.markdown(
    "Before quantizing a layer's input we must pick the real range `[min, max]` that its integers "
    "will cover. **Calibration** runs a few training batches through the float network and an "
    "**observer** turns what it saw into a clipping range. Too wide and small values lose precision; "
    "too narrow and large values are clipped. Activations use the affine (unsigned) scheme:"
)
st.latex(
    r"s = \frac{\max - \min}{2^b - 1}, \qquad z = \mathrm{round}\!\left(-\frac{\min}{s}\right), \qquad "
    r"q = \mathrm{clamp}\!\left(\mathrm{round}\!\left(\tfrac{x}{s}\right) + z,\ 0,\ 2^b - 1\right), \qquad "
    r"\hat{x} = s\,(q - z)"
)
if entry.qat_applies(config):
    st.info(
        "This is a QAT model on its trained grid: its activation ranges were learned in training (from the PTQ "
        "calibration they started at), not observed by a calibration, so there is no observer history to show. "
        "The ranges each layer's integers cover now:"
    )
    trained_rows = []
    for name, quant in report.qnet.layers.items():
        iq = quant.input_qparams
        if iq is None:
            continue
        scale, zero = float(iq.scale), int(iq.zero_point)
        trained_rows.append(
            {
                "layer": name,
                "covered min": (iq.qmin - zero) * scale,
                "covered max": (iq.qmax - zero) * scale,
                "scale": scale,
                "zero point": zero,
                "activation SQNR (dB)": next(r.act_sqnr_db for r in report.layers if r.layer == name),
            }
        )
    table_with_csv(trained_rows, "trained activation ranges", "qat_activation_ranges")
    session.stop_page()
stats = [q.activation for q in report.qnet.layers.values() if q.activation is not None]
if not stats:
    st.info("Every layer's input is kept in float with these settings: nothing to calibrate.")
    session.stop_page()
st.caption(
    f"Observer **{config.observer}**, {config.calib_batches} batch(es) of {config.batch_size} training images, "
    f"{config.act_bits}-bit activations" + (f" ({config.bits_label})." if config.edge_bits or config.add_bits else ".")
)
st.plotly_chart(activation_ranges_figure(stats), key="ranges_chart")
st.plotly_chart(range_history_figure(stats), key="history_chart")

st.subheader("Ranges and qparams per layer")
rows = [
    {
        "layer": row.layer,
        "observed min": row.act_observed_min,
        "observed max": row.act_observed_max,
        "clip min": row.act_clip_min,
        "clip max": row.act_clip_max,
        "scale": row.act_scale,
        "zero point": row.act_zero_point,
        "activation SQNR (dB)": row.act_sqnr_db,
    }
    for row in report.layers
    if row.input_quantized
]
table_with_csv(rows, "activation ranges", "activation_ranges")

layer = st.selectbox("Distribution of a layer's input", [s.layer for s in stats], key="act_hist_layer")
chosen = next(s for s in stats if s.layer == layer)
st.plotly_chart(activation_histogram_figure(chosen), key="act_hist_chart")
st.info(
    "Try next: set activation bits to 4 and switch the observer between **minmax** and **mse**; "
    f"watch {entry.graph.layers[min(1, len(entry.graph.layers) - 1)]}'s clipping range and the activation SQNR. "
    "Then try **notebook** to see the original notebook's ranges, about batch-size times too wide."
)
