"""Lesson 1: one number through the quantizer, step by step, symmetric and affine side by side."""

import streamlit as st

from qcore.figures import number_line_figure
from qcore.lessons.steps import one_number
from qcore.quantize.quant import Scheme
from ui import session
from ui.lessons import lesson_links

session.require_navigation()  # first: a deep link on a fresh server may run this page alone
st.title("One number")
lesson_links("pages/one_number.py")
entry, config, report = session.current_report()
st.markdown(
    "Quantization maps a real number onto one of 2^b evenly spaced levels. The **scale** s is the "
    "step between levels; the **zero point** z is the integer that stands for 0.0. Pick a real weight "
    "or activation of the current model, or type one, and follow it through every step."
)
st.latex(
    r"q = \mathrm{clamp}\!\left(\mathrm{round}\!\left(\tfrac{x}{s}\right) + z,\ q_{\min},\ q_{\max}\right),"
    r"\qquad \hat{x} = s\,(q - z)"
)
first_layer = entry.graph.layers[0]
# an activation: the input of the second layer (fc1 in the notebook's net), which follows a ReLU
activation_layer = entry.graph.layers[min(2, len(entry.graph.layers) - 1)]
source = st.radio(
    "The value",
    [f"a weight of {first_layer}", f"an input of {activation_layer} (an activation)", "a value I type"],
    horizontal=True,
    key="lesson1_source",
)
if source == f"a weight of {first_layer}":
    first_weight = entry.graph.weight(first_layer).detach()  # BatchNorm folded in, as it is quantized
    per_filter = first_weight[0].numel()
    columns = st.columns(2)
    channel = columns[0].number_input(
        "Filter (output channel)", 0, first_weight.shape[0] - 1, 0, key="lesson1_channel"
    )
    index = columns[1].number_input(
        f"Position in the filter (0 to {per_filter - 1})", 0, per_filter - 1, per_filter // 2, key="lesson1_index"
    )
    weights = first_weight[int(channel)].flatten()
    x = float(weights[int(index)])
    low, high = float(weights.min()), float(weights.max())
    where = f"{first_layer} filter {channel}, weight {index}; its filter's range [{low:.4g}, {high:.4g}] (min/max)"
else:
    row = next(row for row in report.layers if row.layer == activation_layer)
    if row.act_clip_min is None or row.act_clip_max is None:
        low, high = 0.0, 10.0
        where = f"{activation_layer}'s input stays float in this config; a range of [0, 10] is used"
    else:
        low, high = row.act_clip_min, row.act_clip_max
        where = f"{activation_layer}'s input range from calibration [{low:.4g}, {high:.4g}]"
    if source == "a value I type":
        columns = st.columns(3)
        x = columns[0].number_input("x", value=1.2345, format="%.5f", key="lesson1_x")
        low = columns[1].number_input("range min", value=float(low), format="%.4f", key="lesson1_low")
        high = columns[2].number_input("range max", value=float(high), format="%.4f", key="lesson1_high")
        where = f"typed value, range [{low:.4g}, {high:.4g}]"
    else:
        x = float(high) * 0.37  # a value inside the calibrated range, to start from
        x = st.slider(
            "x (an activation value within the calibrated range)", float(low), float(high), x, key="lesson1_act"
        )
# One source of truth: the slider starts from the sidebar's bits (the weights' for a weight, the activations'
# for an activation) every time those change; moving it here is a local override, and says so
is_weight = source == f"a weight of {first_layer}"
sidebar_bits = config.weight_bits if is_weight else config.act_bits
if st.session_state.get("lesson1_bits_from") != (sidebar_bits, is_weight):
    st.session_state["lesson1_bits_from"] = (sidebar_bits, is_weight)
    st.session_state["lesson1_bits"] = min(sidebar_bits, 8)
bits = st.select_slider("Bits", [2, 3, 4, 5, 6, 7, 8], key="lesson1_bits")
role = "weight" if is_weight else "activation"
if bits == sidebar_bits:
    st.caption(f"{where}. At the sidebar's {role} bits ({sidebar_bits}).")
else:
    st.caption(
        f"{where}. At {bits} bits here, a local override: the sidebar's {role} bits are {sidebar_bits}, and "
        "this slider goes back to them when they change."
    )

columns = st.columns(2)
for column, scheme in zip(columns, (Scheme.SYMMETRIC, Scheme.ASYMMETRIC), strict=True):
    lesson = one_number(float(x), float(low), float(high), int(bits), scheme)
    with column:
        st.subheader("Symmetric" if scheme is Scheme.SYMMETRIC else "Affine (asymmetric)")
        st.table(
            {
                "step": [
                    "x",
                    "range covered",
                    "s (scale)",
                    "z (zero point)",
                    "x / s",
                    "round(x / s)",
                    "round(x / s) + z",
                    f"clamp to [{lesson.qmin}, {lesson.qmax}] = q",
                    "x̂ = s (q − z)",
                    "error x̂ − x",
                ],
                "value": [
                    f"{lesson.x:.6g}",
                    f"[{lesson.range_min:.6g}, {lesson.range_max:.6g}]",
                    f"{lesson.scale:.6g}",
                    str(lesson.zero_point),
                    f"{lesson.x_over_s:.6g}",
                    str(lesson.rounded),
                    str(lesson.plus_zero_point),
                    f"{lesson.q}" + ("  (clipped)" if lesson.clipped else ""),
                    f"{lesson.x_hat:.6g}",
                    f"{lesson.error:+.3g}",
                ],
            }
        )
        st.plotly_chart(
            number_line_figure(
                lesson.levels, lesson.range_min, lesson.range_max, lesson.x, lesson.x_hat, f"{bits} bits"
            ),
            key=f"number_line_{scheme.value}",
        )
st.caption(
    "Symmetric spends a level on -max|x| even when no value is that negative; affine fits the grid to "
    "[min, max] and pays with a zero point. Move the bits slider: each bit halves the step."
)
