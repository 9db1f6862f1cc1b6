"""Lesson 3: one test image through the network on integers alone, one output of each layer written out."""

import json

import streamlit as st

from qcore.figures import digits_figure, heatmaps_figure, logits_figure
from qcore.files import shorten
from qcore.inference.integer import IntegerEngineError
from qcore.lessons.walk import AddWalk, LookupWalk, walk_shapes
from qcore.quantize.config import integer_path_problems
from ui import cache, session
from ui.lessons import lesson_links

TERMS_SHOWN = 4

session.require_navigation()  # first: a deep link on a fresh server may run this page alone
st.title("One image on integers")
lesson_links("pages/one_image.py")
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
problems = integer_path_problems(config)
if problems:
    st.warning("The integer engine cannot run this config: " + "; ".join(problems) + ". Change it in the sidebar.")
    session.stop_page()
image = int(st.number_input("Test image (0 to 9999)", 0, len(mnist.test) - 1, 0, key="lesson3_image"))
positions = {}
with st.expander("Choose the output followed in each layer and add (default: each one's largest output)"):
    for name, shape in walk_shapes(entry.graph).items():
        if st.checkbox(f"choose for {name}", key=f"lesson3_pick_{name}"):
            columns = st.columns(len(shape))
            labels = ("channel", "row", "column") if len(shape) == 3 else ("output",)
            positions[name] = [
                int(column.number_input(f"{name} {label}", 0, size - 1, 0, key=f"lesson3_{name}_{label}"))
                for column, label, size in zip(columns, labels, shape, strict=True)
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
classes = mnist.spec.class_names
left, right = st.columns([1, 3])
left.plotly_chart(digits_figure([picture], [f"#{image}: label {walk.label}"], columns=1), key="lesson3_digit")
right.markdown(
    f"Label **{walk.label}** ({classes[walk.label]}). The integer engine predicts **{walk.prediction}** "
    f"({classes[walk.prediction]}); the float model predicts **{walk.float_prediction}** "
    f"({classes[walk.float_prediction]})."
)
last_layer = entry.graph.layers[-1]
steps = {step.name: step for step in [*walk.layers, *walk.adds, *walk.lookups]}
for name in walk.order:
    step = steps[name]
    st.subheader(f"{name}, output {step.position}")
    if isinstance(step, LookupWalk):
        lines = [
            f"{step.function} on integers is one table lookup (TFLite's int8 LOGISTIC and TANH): "
            f"{step.table_size} entries, one per level of its input's grid",
            f"input level {step.input_level} stands for {step.input_real:.6g}; {step.function} of it is "
            f"{step.activation_real:.6g}",
            f"table entry {step.input_level}: level {step.output_level}, which stands for {step.output_real:.6g}",
        ]
        st.code("\n".join(lines), language=None)
        continue
    if isinstance(step, AddWalk):
        lines = [
            f"TFLite's int8 ADD of {step.inputs[0]} and {step.inputs[1]}, each on its own grid:",
            *(
                f"  ({q} − {z}) << {step.left_shift} = {(q - z) << step.left_shift}, times M0 {m} · 2^({s} − 31)"
                f" (rounded once) → {r}"
                for q, z, m, s, r in zip(
                    step.input_values,
                    step.input_zero_points,
                    step.input_multipliers,
                    step.input_shifts,
                    step.rescaled,
                    strict=True,
                )
            ),
            f"sum {step.rescaled[0]} + {step.rescaled[1]} = {step.total}",
            f"times M0 {step.multiplier} · 2^({step.shift} − 31), rounded once → {step.scaled}",
            f"+ output zero point {step.output_zero_point}, clamp to [{step.output_min}, {step.output_max}] "
            f"(a ReLU after the add is the clamp at the zero point) = {step.output}",
        ]
        st.code("\n".join(lines), language=None)
        continue
    layer = step
    if layer.feature_map_int:
        st.plotly_chart(
            heatmaps_figure(
                [f"integer map, channel {layer.position[0]} (on its grid)", "float map (the same place)"],
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
        f"(a ReLU is the clamp at the zero point) = {layer.output}",
    ]
    if layer.pooled is not None:
        lines.append(f"max-pool over its window {layer.pooled_window} = {layer.pooled}")
    if layer.name == last_layer:
        lines[-1] = (
            f"{layer.name} keeps int32: logit {layer.output} for class {layer.position[0]} "
            f"({classes[layer.position[0]]}), at the logits' common scale (no clamp, no ReLU)"
        )
    st.code("\n".join(lines), language=None)
st.subheader("The answer")
st.plotly_chart(logits_figure(walk.logits_int32, walk.float_probabilities), key="lesson3_logits")
st.caption(
    "acc × M0 is exact in 64 bits; adding half of 2^(31 − shift) and shifting right by 31 − shift bits "
    "divides it by 2^(31 − shift) rounded to the nearest integer (half up): a multiplication by M "
    "without a float, rounded once."
)
