"""Accuracy: float vs quantized, per digit, the images that flip, sweeps and sensitivity."""

import json

import streamlit as st

from qcore.analysis.tables import SWEEP_TARGETS, SweepPoint, flip_gallery, per_class_rows, sensitivity_advice
from qcore.figures import digits_figure, per_class_figure, sensitivity_figure, sweep_figure
from qcore.models.checkpoint import fingerprint
from ui import cache, session
from ui.tables import table_with_csv

MAX_FLIPS_SHOWN = 24

session.require_navigation()  # first: a deep link on a fresh server may run this page alone
st.title("Accuracy")
entry, config, report = session.current_report()
mnist = session.mnist_or_stop()
st.markdown(
    "The test that matters: the same 10,000 test images through the float network and through its "
    "quantized twin. Quantization noise usually costs little until a few bits; which layer is most "
    "sensitive, and which classes suffer first, tells you where to spend bits."
)
st.latex(
    r"\mathrm{accuracy} = \frac{1}{N}\sum_{i=1}^{N} [\arg\max_k f(x_i)_k = y_i], \qquad "
    r"\mathrm{loss} = -\frac{1}{N}\sum_{i=1}^{N} \log p(y_i \mid x_i)"
)
float_result, quant_result = report.float_result, report.quant_result
columns = st.columns(4)
columns[0].metric("Float accuracy", session.percent(float_result.accuracy))
columns[1].metric(
    "Quantized accuracy",
    session.percent(quant_result.accuracy),
    delta=f"{100 * (quant_result.accuracy - float_result.accuracy):+.2f} pts",
)
columns[2].metric("Float loss", f"{float_result.loss:.4f}")
columns[3].metric(
    "Quantized loss",
    f"{quant_result.loss:.4f}",
    delta=f"{quant_result.loss - float_result.loss:+.4f}",
    delta_color="inverse",
)

if entry.qat is not None and entry.qat_applies(config):
    # The question QAT answers: at these bits, what does training on the grid buy over rounding after?
    folder = session.data_folder()
    if entry.start is not None:
        start, origin = entry.start, f"the model QAT started from ({entry.start.name})"
    else:  # an uploaded QAT checkpoint: its own float weights are the only float model at hand
        start = session.ModelEntry(
            entry.model, "its float weights", fingerprint(entry.model), zoo=entry.zoo, imported=entry.imported
        )
        origin = "this checkpoint's own float weights (the model it started from is not in the file)"
    start_float = cache.float_result(start.fingerprint, folder, start.model).accuracy
    ptq = cache.report(start.fingerprint, config.to_json(), folder, start.model).quant_result.accuracy
    st.subheader(f"Float, PTQ and QAT at {config.bits_label}")
    side = st.columns(3)
    side[0].metric("Float", session.percent(start_float))
    side[1].metric("PTQ", session.percent(ptq), delta=f"{100 * (ptq - start_float):+.2f} pts")
    side[2].metric(
        "QAT", session.percent(quant_result.accuracy), delta=f"{100 * (quant_result.accuracy - start_float):+.2f} pts"
    )
    st.caption(
        f"Float and PTQ are of {origin}; PTQ calibrates it with these settings, QAT is this model on its trained "
        "grid. All three on the 10,000 test images."
    )
classes = mnist.spec.class_names
figure_key = (entry.fingerprint, config.to_json(), session.data_folder())
st.plotly_chart(
    cache.memo(
        "per-class figure",
        figure_key,
        lambda: per_class_figure(float_result.per_class_accuracy, quant_result.per_class_accuracy, classes),
    ),
    key="per_class",
)
rows = cache.memo("per-class rows", figure_key, lambda: per_class_rows(report, classes))
table_with_csv(rows, "per-class accuracy", "per_class")

st.subheader("Images whose prediction flips")
broke, fixed = report.flips.get("broke", []), report.flips.get("fixed", [])
other = report.flips.get("other", [])
st.caption(
    f"{len(broke)} correct in float but wrong when quantized, {len(fixed)} the other way round, "
    f"{len(other)} wrong both ways with different answers."
)
if broke or fixed or other:
    gallery = cache.memo(
        "flips figure", figure_key, lambda: digits_figure(*flip_gallery(report, mnist, MAX_FLIPS_SHOWN))
    )
    st.plotly_chart(gallery, key="flips_grid")
    st.caption("Each title: test index, true class, float prediction → quantized prediction.")

st.subheader("Bit-width sweep")
target = st.radio(
    "Sweep",
    SWEEP_TARGETS,
    horizontal=True,
    key="sweep_target",
    format_func=lambda t: {
        "both": "weights and activations",
        "weights": "weights only",
        "activations": "activations only",
    }[t],
)
if st.button("Run the sweep (2 to 8 bits)", key="run_sweep") or st.session_state.get("sweep_shown"):
    st.session_state["sweep_shown"] = True
    live, so_far = st.empty(), []  # the points measured so far, drawn as they come

    def draw(point: SweepPoint) -> None:
        so_far.append(point)
        live.plotly_chart(sweep_figure(so_far, float_result.accuracy, target), key=f"sweep_so_far_{len(so_far)}")

    points = cache.sweep(entry.fingerprint, config.to_json(), target, session.data_folder(), entry.model, draw)
    live.empty()
    st.plotly_chart(sweep_figure(points, float_result.accuracy, target), key="sweep_chart")
    table_with_csv(
        [
            {
                "weight bits": p.weight_bits,
                "activation bits": p.act_bits,
                "quantized accuracy (%)": round(100 * p.accuracy, 2),
                "loss": round(p.loss, 4),
            }
            for p in points
        ],
        "sweep",
        "sweep",
    )

st.subheader("Per-layer sensitivity")
sensitivity_rows = []
if st.button("Quantize one layer at a time", key="run_sensitivity") or st.session_state.get("sensitivity_shown"):
    st.session_state["sensitivity_shown"] = True
    rows = sensitivity_rows = cache.sensitivity(entry.fingerprint, config.to_json(), session.data_folder(), entry.model)
    st.plotly_chart(sensitivity_figure(rows), key="sensitivity_chart")
    table_with_csv(
        [
            {
                "layer": r.layer,
                "accuracy, only this layer quantized (%)": round(100 * r.accuracy, 2),
                "drop (points)": round(100 * r.drop, 2),
            }
            for r in rows
        ],
        "sensitivity",
        "sensitivity",
    )

st.download_button(
    "Download the full result (JSON)",
    json.dumps({"model": entry.fingerprint, **report.to_dict()}, default=str),
    file_name=session.download_name(entry, "quantization_result", "json", config),
    mime="application/json",
    key="json_result",
)
if sensitivity_rows:
    st.info(sensitivity_advice(sensitivity_rows))
else:
    st.info(
        "Try next: **Quantize one layer at a time** above to see which layer costs the most; the advice here "
        "then names it, measured."
    )
