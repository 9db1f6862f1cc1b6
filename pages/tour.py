"""Lesson 5: a guided tour for a class; each step sets the sidebar, and what it measures is shown live."""

import time

import streamlit as st

from qcore.lessons.prepare import StoreFailed
from qcore.lessons.tour import NOISE_POINTS, sensitivity_config, step_config, tour_for, within_noise
from ui import cache, session
from ui.lessons import lesson_links

MEASURED_KEY = "tour_measured"

session.require_navigation()  # first: a deep link on a fresh server may run this page alone
st.title("Guided tour")
lesson_links("pages/tour.py")
entry, config, report = session.current_report()
st.markdown(
    "Seven steps through what matters most, for a class to follow together. **Apply this step** sets "
    "the sidebar; the numbers beside a step are measured on the current model when you apply it, never "
    "written in advance."
)
st.latex(r"\Delta = \mathrm{accuracy}_{\mathrm{quantized}} - \mathrm{accuracy}_{\mathrm{float}}")
with st.spinner("Measuring which layer 2-bit weights hurt most on this model (one layer at a time)…"):
    drops = cache.sensitivity(entry.fingerprint, sensitivity_config().to_json(), session.data_folder(), entry.model)
steps = tour_for({row.layer: row.drop for row in drops})
measured = st.session_state.setdefault(MEASURED_KEY, {})
for index, step in enumerate(steps):
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
            other = step.compare_with
            if other is not None and (entry.fingerprint, other) in measured:
                before = measured[(entry.fingerprint, other)][0]
                if within_noise(quant, before):
                    st.caption(
                        f"Within noise of step {other + 1} on this model ({100 * (quant - before):+.2f} points; "
                        f"differences under {NOISE_POINTS} points, {NOISE_POINTS * 100:.0f} of the 10,000 test "
                        "images, are not told apart): this change makes no measurable difference here."
                    )
                else:
                    st.caption(f"Against step {other + 1}: {100 * (quant - before):+.2f} points.")
st.caption("Each config is computed once per model and cached: coming back to a step is instant.")


def offer_to_prepare() -> None:
    """For whoever runs the server (QCORE_OPERATOR=1 on their own instance): the tour and the lessons of
    this model computed into the shared store now, as `python -m qcore prepare` does, with progress."""
    with st.expander("For whoever runs this server: prepare this model for a class"):
        st.markdown(
            "Computes every step of this tour and the lessons at their default settings into the server's "
            "result store, so that a class opens each of them from the store instead of waiting. The same as "
            "`python -m qcore prepare --model NAME`; what is stored already is not computed again."
        )
        if not st.button("Prepare the tour and the lessons", key="prepare_class"):
            return
        bar = st.progress(0.0, text="Starting…")
        started = time.monotonic()

        def on_done(done: int, total: int, what: str, stored_before: bool, seconds: float) -> None:
            state = "already stored" if stored_before else f"computed in {seconds:.0f} s"
            left = cache.time_left((started, 0.0), time.monotonic(), done / total)
            bar.progress(done / total, text=f"{done} of {total}: {what}, {state}{left}")

        try:
            prepared = cache.prepare_for_class(entry.fingerprint, session.data_folder(), entry.model, on_done)
        except StoreFailed as error:
            bar.empty()
            st.error(f"Not prepared: {error}")
            return
        bar.empty()
        st.success(
            f"Prepared: {len(prepared.log)} results in the store ({prepared.computed} computed now) "
            f"in {prepared.seconds:.0f} s."
        )


if cache.operator_mode() and entry.qat is None:  # a QAT model's steps are its own grid's: not what prepare computes
    offer_to_prepare()
