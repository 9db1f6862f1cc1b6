"""Lesson: a residual add needs its own requantization; one shared scale costs the finer input its levels."""

import streamlit as st

from qcore.figures import residual_figure
from qcore.lessons.failures import RESIDUAL_IMAGES
from ui import cache, session
from ui.lessons import lesson_links
from ui.tables import table_with_csv

session.require_navigation()  # first: a deep link on a fresh server may run this page alone
st.title("Residual adds")
lesson_links("pages/residual.py")
entry, config, report = session.current_report()
st.markdown(
    "A residual add sums two tensors that reached it along different paths, so their ranges and scales differ. "
    "On integers (TFLite's int8 ADD) each input is first rescaled from its own scale with its own fixed-point "
    "multiplier, the two are summed, and the sum is requantized to the output's scale and zero point. Adding "
    "the integers directly would need one scale for all three: the coarsest, which takes levels from the finer input."
)
st.latex(r"y_q = z_y + \mathrm{round}\!\Big(\frac{s_a}{s_y}(a_q - z_a) + \frac{s_b}{s_y}(b_q - z_b)\Big)")
if not any(op.kind.value == "add" for op in entry.graph.ops):
    st.info("This model has no residual add. Choose fashion-resnet on the Model page.")
    session.stop_page()
try:
    adds = cache.residual(entry.fingerprint, config.to_json(), session.data_folder(), entry.model)
except Exception as error:  # noqa: BLE001 - a model that cannot be measured is explained, not a traceback
    session.show_compute_failure(error)
    session.stop_page()
if not adds:
    st.info("Every add's inputs stay float with these settings: nothing is requantized.")
    session.stop_page()
st.plotly_chart(
    residual_figure([a.add for a in adds], [a.sqnr_own_db for a in adds], [a.sqnr_shared_db for a in adds]),
    key="residual_chart",
)
table_with_csv(
    [
        {
            "add": a.add,
            "input a": a.inputs[0],
            "scale a": a.input_scales[0],
            "input b": a.inputs[1],
            "scale b": a.input_scales[1],
            "output scale": a.output_scale,
            "shared scale": a.shared_scale,
            "finer grid coarsened by": a.scale_ratio,
            "SQNR own scales (dB)": a.sqnr_own_db,
            "SQNR shared scale (dB)": a.sqnr_shared_db,
        }
        for a in adds
    ],
    "residual adds",
    "residual_adds",
)
worst = max(adds, key=lambda a: a.sqnr_own_db - a.sqnr_shared_db)
st.info(
    f"Measured at A{config.act_bits} on the first {RESIDUAL_IMAGES} test images: at {worst.add} one shared scale makes "
    f"the finer input's grid {worst.scale_ratio:.2f}× coarser, and the output's SQNR goes from "
    f"{worst.sqnr_own_db:.1f} dB to {worst.sqnr_shared_db:.1f} dB. Try 4 activation bits in the sidebar."
)
