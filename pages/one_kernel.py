"""Lesson 2: one conv filter as float, integers, reconstruction and error; per-channel vs per-tensor."""

import streamlit as st

from qcore.figures import heatmaps_figure
from qcore.lessons.steps import kernel_layers, one_kernel
from ui import session
from ui.lessons import lesson_links

session.require_navigation()  # first: a deep link on a fresh server may run this page alone
st.title("One kernel")
lesson_links("pages/one_kernel.py")
entry, config, report = session.current_report()
choices = kernel_layers(entry.model)
rows = entry.graph.op(choices[0]).kind == "linear"  # no convolution with filters wider than 1x1
layer_name = st.selectbox("Linear layer" if rows else "Conv layer", choices, key="lesson2_layer")
size = int(entry.graph.weight(layer_name)[0, 0].numel()) if not rows else int(entry.graph.weight(layer_name).shape[1])
if rows:
    st.info(
        "This model has no convolution with filters wider than 1x1, so the lesson shows a row of a linear layer: "
        "the weights one output reads from every input (drawn as a square when it is one: 784 weights read the "
        "image's 28x28 pixels). Everything below holds for it as for a filter."
    )
st.markdown(
    f"A {layer_name} {'row' if rows else 'filter (one input channel of it)'} is {size} weights. Quantizing it "
    f"stores {size} small "
    "integers and one scale: the "
    "reconstruction s·q is what the network computes with, and the difference is the error. With a "
    "scale per filter (per-channel) a small filter gets a fine grid; with one scale for the whole layer "
    "(per-tensor) it shares the coarse grid of the layer's largest filter."
)
st.latex(r"\hat{w} = s \cdot q, \qquad q = \mathrm{clamp}(\mathrm{round}(w / s), -q_{\max}, q_{\max})")
filters = int(entry.graph.weight(layer_name).shape[0])
channel = st.number_input(
    f"{'Row' if rows else 'Filter'} (0 to {filters - 1})", 0, filters - 1, 0, key=f"lesson2_channel_{layer_name}"
)
kernel = one_kernel(entry.model, config, int(channel), layer_name)
if entry.graph.folded_batchnorm.get(layer_name):
    st.caption(
        f"{layer_name}'s BatchNorm ({entry.graph.folded_batchnorm[layer_name]}) is folded into these weights: "
        "each filter is multiplied by its channel's γ/√(var+ε), which is why folded filters differ so much in range."
    )
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
