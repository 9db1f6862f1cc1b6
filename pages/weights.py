"""Weights: each layer's weights before and after quantization, and the error it adds."""

import streamlit as st

from qcore.analysis.tables import weight_histogram
from qcore.figures import error_histogram_figure, sqnr_figure, weight_histogram_figure, weight_snapshots_figure
from qcore.training.qat import valid_snapshots
from ui import session
from ui.tables import table_with_csv

session.require_navigation()  # first: a deep link on a fresh server may run this page alone
st.title("Weights")
entry, config, report = session.current_report()
st.markdown(
    "Weights are known ahead of time, so their range is exact. With the **symmetric** scheme the "
    "zero point is 0 and the integers run over a restricted signed range; **per-channel** gives every "
    "output channel its own scale, so a channel of small weights is not crushed by a channel of large ones."
)
st.latex(
    r"q_{\max} = 2^{b-1} - 1, \qquad s = \frac{c}{q_{\max}}, \qquad "
    r"q = \mathrm{clamp}\!\left(\mathrm{round}\!\left(\tfrac{w}{s}\right), -q_{\max}, q_{\max}\right)"
)
st.markdown(
    "The clipping value **c** is max|w| with the *minmax* weight range. With *mse* (the default) "
    "it is the c that minimizes the squared error of the quantized weights, searched over fractions "
    "of max|w|: clipping a few large weights buys a finer step for all the others."
)
st.latex(r"\mathrm{SQNR} = 10 \log_{10} \frac{\sum x^2}{\sum (x - \hat{x})^2}\ \mathrm{dB}")

quantized_layers = [name for name in entry.graph.layers if not report.qnet.layers[name].is_float]
if not quantized_layers:
    st.info("Every layer is kept in float with these settings.")
    session.stop_page()
left, right = st.columns(2)
layer = left.selectbox("Layer", quantized_layers, key="weights_layer")
quant = report.qnet.layers[layer]
channel = None
if quant.weight_qparams is not None and quant.weight_qparams.axis is not None:
    channels = quant.weight.shape[0]
    # One channel by default: its levels are drawn, while "all channels" pools many scales into a smear.
    choice = right.selectbox("Channel", [*range(channels), "all channels"], key="weights_channel")
    channel = None if choice == "all channels" else int(choice)
histogram = weight_histogram(quant, channel)
st.plotly_chart(weight_histogram_figure(histogram), key="weight_hist_chart")
if not histogram.levels:
    st.caption("Quantization levels are drawn for one channel (per-channel) and at 8 bits or fewer.")
st.plotly_chart(error_histogram_figure(histogram.errors, layer), key="weight_error_chart")

snapshots = valid_snapshots(entry.qat.meta, entry.qat.qnet.graph.layers) if entry.qat is not None else []
if snapshots:
    st.subheader("How QAT moved the weights onto the levels")
    st.plotly_chart(weight_snapshots_figure(snapshots, layer), key="qat_snapshots_chart")
    st.caption(
        "Each weight divided by its channel's step size at that moment (w / s): rounding sends it to the nearest "
        "integer. Before QAT the weights spread evenly between levels; training gathers them near the levels, "
        "where rounding costs least."
    )
elif entry.qat is not None:
    st.caption("This QAT checkpoint carries no usable weight snapshots.")

st.subheader("SQNR per layer")
st.plotly_chart(sqnr_figure(report.layers), key="sqnr_chart")
rows = [
    {
        "layer": row.layer,
        "weights": "quantized" if row.quantized else "float",
        "weight scale (min)": min(row.weight_scale) if row.weight_scale else None,
        "weight scale (max)": max(row.weight_scale) if row.weight_scale else None,
        "weight SQNR (dB)": row.weight_sqnr_db,
        "activation SQNR (dB)": row.act_sqnr_db,
    }
    for row in report.layers
]
table_with_csv(rows, "weight SQNR", "weight_sqnr")
st.info(
    f"Try next: set weight bits to 3, then switch granularity to per-tensor and watch {entry.graph.layers[0]}'s "
    "SQNR fall; switch weight range from mse to minmax to see what clipping the outliers buys."
)
