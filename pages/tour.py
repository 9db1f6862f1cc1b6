"""Lesson 5: a guided tour for a class; each step sets the sidebar, and what it measures is shown live."""

import streamlit as st

from qcore.lessons.tour import TOUR, step_config
from ui import session

MEASURED_KEY = "tour_measured"

session.require_navigation()  # first: a deep link on a fresh server may run this page alone
st.title("Guided tour")
entry, config, report = session.current_report()
st.markdown(
    "Seven steps through what matters most, for a class to follow together. **Apply this step** sets "
    "the sidebar; the numbers beside a step are measured on the current model when you apply it, never "
    "written in advance."
)
st.latex(r"\Delta = \mathrm{accuracy}_{\mathrm{quantized}} - \mathrm{accuracy}_{\mathrm{float}}")
measured = st.session_state.setdefault(MEASURED_KEY, {})
for index, step in enumerate(TOUR):
    target = step_config(step)
    is_current = target == config
    if is_current:
        measured[(entry.fingerprint, index)] = (report.quant_result.accuracy, report.float_result.accuracy)
    with st.container(border=True):
        title, button = st.columns([4, 1])
        title.markdown(f"**{index + 1}. {step.title}**" + ("  (the sidebar is here now)" if is_current else ""))
        button.button(
            "Apply this step",
            key=f"tour_{index}",
            on_click=session.apply_settings,
            args=(step.changes,),
            kwargs={"reset": True},
            disabled=is_current,
        )
        st.caption(f"Look at: {step.look_at}")
        if (entry.fingerprint, index) in measured:
            quant, float_accuracy = measured[(entry.fingerprint, index)]
            st.markdown(
                f"Measured for this model: quantized **{100 * quant:.2f}%**, float {100 * float_accuracy:.2f}% "
                f"({100 * (quant - float_accuracy):+.2f} points)."
            )
st.caption("Each config is computed once per model and cached: coming back to a step is instant.")
