"""Lesson 3: one test image through the network on integers alone, one output of each layer written out."""

import json

import streamlit as st

from qcore.config import integer_path_problems
from qcore.figures import digits_figure, heatmaps_figure, logits_figure
from qcore.files import shorten
from qcore.inference.integer import IntegerEngineError
from qcore.models.zoo import zoo_model
from ui import cache, session

TERMS_SHOWN = 4

session.require_navigation()  # first: a deep link on a fresh server may run this page alone
st.title("One image on integers")
entry, config, report = session.current_report()
mnist = session.mnist_or_stop()
st.markdown(
    "After the input is quantized, the integer engine never touches a float: each output is a sum of "
    "integer products, an int32 bias, and one fixed-point multiplication that brings the int32 "
    "accumulator back to 8 bits (or fewer). Pick a test image and follow one output of each layer."
)
st.latex(
    r"\mathrm{acc} = \sum_k (x_k - z_x)(w_k - z_w) + b, \qquad "
    r"y = \mathrm{clamp}\big(\mathrm{round}(\mathrm{acc} \cdot M_0 \cdot 2^{\mathrm{shift} - 31})"
    r" + z_y,\ z_y,\ q_{\max}\big)"
)
if not zoo_model(entry.zoo).is_notebook_net:
    st.info(
        "This lesson writes out the notebook's net (conv, pool, conv, pool, fc, fc) term by term; it does not "
        "walk this model's graph yet. The Deploy page runs this model on the integer engine and compares it "
        "with the simulation image by image; choose a notebook net on the Model page to follow one image here."
    )
    session.stop_page()
problems = integer_path_problems(config)
if problems:
    st.warning("The integer engine cannot run this config: " + "; ".join(problems) + ". Change it in the sidebar.")
    session.stop_page()
image = int(st.number_input("Test image (0 to 9999)", 0, len(mnist.test) - 1, 0, key="lesson3_image"))
positions = {}
with st.expander("Choose the output followed in each layer (default: each layer's largest output)"):
    for name, shape in (("conv1", (19, 23, 23)), ("conv2", (49, 7, 7)), ("fc1", (499,)), ("fc2", (9,))):
        if st.checkbox(f"choose for {name}", key=f"lesson3_pick_{name}"):
            columns = st.columns(len(shape))
            labels = ("channel", "row", "column") if len(shape) == 3 else ("output",)
            positions[name] = [
                int(column.number_input(f"{name} {label}", 0, top, 0, key=f"lesson3_{name}_{label}"))
                for column, label, top in zip(columns, labels, shape, strict=True)
            ]
try:
    walk = cache.walk(
        entry.fingerprint,
        config.to_json(),
        image,
        json.dumps(positions, sort_keys=True),
        session.data_folder(),
        entry.model,
        entry.qat,
    )
except IntegerEngineError as error:  # scales the engine cannot represent: said in words, not a crash
    st.warning("The integer engine cannot run this model: " + shorten(error, 300))
    session.stop_page()
picture = (mnist.test.images[image, 0] * mnist.spec.std + mnist.spec.mean).tolist()
left, right = st.columns([1, 3])
left.plotly_chart(digits_figure([picture], [f"#{image}: label {walk.label}"], columns=1), key="lesson3_digit")
right.markdown(
    f"Label **{walk.label}**. The integer engine predicts **{walk.prediction}**; the float model predicts "
    f"**{walk.float_prediction}**."
)
for layer in walk.layers:
    st.subheader(f"{layer.name}, output {layer.position}")
    if layer.feature_map_int:
        st.plotly_chart(
            heatmaps_figure(
                [f"integer map, channel {layer.position[0]} (after pool)", "float map (after pool)"],
                [layer.feature_map_int, layer.feature_map_float],
                annotate=False,
            ),
            key=f"lesson3_maps_{layer.name}",
        )
    shown = " + ".join(
        f"({x} − {layer.input_zero_point})·({w} − {layer.weight_zero_point})" for x, w in layer.terms[:TERMS_SHOWN]
    )
    products = sum((x - layer.input_zero_point) * (w - layer.weight_zero_point) for x, w in layer.terms)
    lines = [
        f"{len(layer.terms)} terms (x − z_x)·(w − z_w), the first {TERMS_SHOWN}:",
        f"  {shown} + …",
        f"sum of all {len(layer.terms)} products = {products}",
        f"+ int32 bias {layer.bias} = accumulator {layer.accumulator}",
        f"M = s_in·s_w / s_out = {layer.exact_multiplier:.10g} ≈ M0 · 2^(shift − 31) = "
        f"{layer.multiplier} · 2^({layer.shift} − 31) = {layer.real_multiplier:.10g}",
        f"acc · M0 + 2^({30 - layer.shift}), shifted right by 31 − shift = {31 - layer.shift} bits "
        f"(rounded once, half up) → {layer.scaled}",
        f"+ output zero point {layer.output_zero_point}, clamp to [{layer.output_min}, {layer.output_max}] "
        f"(the ReLU is the clamp at the zero point) = {layer.output}",
    ]
    if layer.pooled is not None:
        lines.append(f"max-pool over its 2x2 window {layer.pooled_window} = {layer.pooled}")
    if layer.name == "fc2":
        lines[-1] = f"fc2 keeps int32: logit {layer.output} for digit {layer.position[0]} (no clamp, no ReLU)"
    st.code("\n".join(lines), language=None)
st.subheader("The answer")
st.plotly_chart(logits_figure(walk.logits_int32, walk.float_probabilities), key="lesson3_logits")
st.caption(
    "acc × M0 is exact in 64 bits; adding half of 2^(31 − shift) and shifting right by 31 − shift bits "
    "divides it by 2^(31 − shift) rounded to the nearest integer (half up): a multiplication by M "
    "without a float, rounded once."
)
