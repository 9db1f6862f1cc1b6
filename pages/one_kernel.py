"""Lesson 2: one conv1 filter as float, integers, reconstruction and error; per-channel vs per-tensor."""

import streamlit as st

from qcore.figures import heatmaps_figure
from qcore.lessons.steps import one_kernel
from ui import session

session.require_navigation()  # first: a deep link on a fresh server may run this page alone
st.title("One kernel")
entry, config, report = session.current_report()
st.markdown(
    "A conv1 filter is 25 weights. Quantizing it stores 25 small integers and one scale: the "
    "reconstruction s·q is what the network computes with, and the difference is the error. With a "
    "scale per filter (per-channel) a small filter gets a fine grid; with one scale for the whole layer "
    "(per-tensor) it shares the coarse grid of the layer's largest filter."
)
st.latex(r"\hat{w} = s \cdot q, \qquad q = \mathrm{clamp}(\mathrm{round}(w / s), -q_{\max}, q_{\max})")
channel = st.number_input("Filter (0 to 19)", 0, 19, 0, key="lesson2_channel")
kernel = one_kernel(entry.model, config, int(channel))
st.caption(f"At the sidebar's {config.weight_bits}-bit {config.scheme} weights, {config.weight_range} ranges.")
for view in (kernel.per_channel, kernel.per_tensor):
    st.subheader(f"{view.granularity}: scale {view.scale:.5g}, SQNR {view.sqnr_db:.1f} dB")
    st.plotly_chart(
        heatmaps_figure(
            ["float weights", "integers q", "reconstructed s·q", "error"],
            [kernel.weights, view.ints, view.reconstructed, view.error],
        ),
        key=f"kernel_{view.granularity}",
    )
ratio = kernel.per_tensor.scale / kernel.per_channel.scale
st.info(
    f"Measured for filter {channel}: the per-tensor step is {ratio:.2f}× the per-channel step, and the "
    f"filter's SQNR is {kernel.per_channel.sqnr_db:.1f} dB per-channel against "
    f"{kernel.per_tensor.sqnr_db:.1f} dB per-tensor."
)
