"""Lesson: BatchNorm folding spreads the channels' weight ranges; per-tensor scales fail, equalization helps."""

import streamlit as st

from qcore.figures import channel_ranges_figure, granularity_figure
from qcore.graph import batchnorm_folding
from qcore.lessons.failures import FAILURE_POINTS, folding_conclusion, granularity_table
from ui import cache, session
from ui.lessons import lesson_links
from ui.tables import table_with_csv

session.require_navigation()  # first: a deep link on a fresh server may run this page alone
st.title("BatchNorm folding")
lesson_links("pages/folding.py")
entry, config, report = session.current_report()
st.markdown(
    "A deployed network has no BatchNorm: each one is folded into the convolution before it, channel by channel. "
    "The folded weights are what every path quantizes. Each output channel is multiplied by its own factor "
    "γ/√(var+ε), so channels whose factors differ end up with very different weight ranges; one per-tensor scale "
    "must cover the widest, and the narrow channels keep only a few levels (Nagel et al. 2019 found MobileNetV2 "
    "per-tensor INT8 at 0.1% top-1 for this reason). Cross-layer equalization rescales channels between two layers "
    "to even the ranges out."
)
st.latex(
    r"W'_c = W_c \cdot \frac{\gamma_c}{\sqrt{\sigma_c^2 + \varepsilon}}, \qquad "
    r"b'_c = (b_c - \mu_c)\,\frac{\gamma_c}{\sqrt{\sigma_c^2 + \varepsilon}} + \beta_c"
)
folded = entry.graph.folded_batchnorm
if not folded:
    st.info(
        "This model has no BatchNorm, so nothing is folded. Choose fashion-mobilenet or fashion-resnet on the "
        "Model page to see the failure."
    )
    session.stop_page()
depthwise = [name for name in folded if entry.graph.is_depthwise(name)]
layers = list(folded)
left, right = st.columns(2)
layer = left.selectbox("Folded layer", layers, index=layers.index(depthwise[0]) if depthwise else 0, key="fold_layer")
channels = int(entry.graph.weight(layer).shape[0])
channel = int(right.number_input(f"Channel (0 to {channels - 1})", 0, channels - 1, 0, key=f"fold_channel_{layer}"))
fold = batchnorm_folding(entry.model, layer, channel)
columns = st.columns(4)
columns[0].metric("γ/√(var+ε) of this channel", f"{fold.factor:.4g}")
columns[1].metric("bias before → after", f"{fold.bias_before:.3g} → {fold.bias_after:.3g}")
columns[2].metric("range spread before", f"{fold.spread_before:.3g}×")
columns[3].metric("range spread after", f"{fold.spread_after:.3g}×")
st.plotly_chart(channel_ranges_figure(layer, fold.ranges_before, fold.ranges_after), key="fold_ranges")
table_with_csv(
    [
        {"weight": index, "before folding": before, "after folding": after}
        for index, (before, after) in enumerate(zip(fold.weights_before, fold.weights_after, strict=True))
    ],
    f"{layer} channel {channel} weights",
    "fold_weights",
)
st.caption("Spread: the largest channel's max |w| over the smallest's, for every folded layer.")
table_with_csv(
    [
        {
            "layer": row.layer,
            "batchnorm": row.batchnorm,
            "depthwise": row.depthwise,
            "spread before": row.spread_before,
            "spread after": row.spread_after,
        }
        for row in cache.folded_spreads_of(entry.fingerprint, entry.model)
    ],
    "range spread per layer",
    "fold_spreads",
)

st.subheader("Per-tensor against per-channel, then equalization")
st.markdown(
    f"Measured on the full test set with the sidebar's activation calibration and the weights' ranges their "
    f"min/max, as in Nagel et al. 2019: W8A8 and W6A6, then weight bits from 7 down (8-bit activations) until "
    f"per-tensor alone loses {FAILURE_POINTS:g} points against float. The last bars are per-tensor with "
    "MSE-clipped weight ranges (the lab's default), which trade the widest channels' outliers for finer "
    "steps everywhere else: a partial fix of its own."
)
if st.button("Measure (about twenty calibrations and evaluations)", key="run_folding") or st.session_state.get(
    "folding_shown"
):
    st.session_state["folding_shown"] = True
    bar = st.empty()

    def show(done: int, total: int, what: str) -> None:
        bar.progress(min(done / 18, 1.0), text=f"Measuring ({done + 1}): {what}")

    try:
        walk = cache.folding_walk(entry.fingerprint, config.to_json(), session.data_folder(), entry.model, show)
    except Exception as error:  # noqa: BLE001 - a model that cannot be measured is explained, not a traceback
        session.show_compute_failure(error)
        session.stop_page()
    bar.empty()
    rows = [
        {
            "bits": f"W{row.weight_bits}A{row.act_bits}",
            "per_channel": row.per_channel,
            "per_tensor": row.per_tensor,
            "per_tensor_equalized": row.per_tensor_equalized,
            "per_tensor_mse": row.per_tensor_mse,
        }
        for row in walk.rows
    ]
    st.plotly_chart(granularity_figure(rows), key="granularity_chart")
    table_with_csv(granularity_table(walk), "granularity", "granularity")
    st.info(folding_conclusion(walk), icon=":material/lightbulb:")
