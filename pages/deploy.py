"""Deploy: the quantized model on integers alone, against PyTorch int8 and ONNX Runtime, and exports."""

import streamlit as st

from qcore.export.formats import size_table
from qcore.figures import throughput_figure
from qcore.files import shorten
from qcore.inference.integer import IntegerEngineError, IntegerNet
from qcore.quantize.config import integer_path_problems
from ui import cache, session
from ui.tables import table_with_csv

session.require_navigation()  # first: a deep link on a fresh server may run this page alone
st.title("Deploy")
entry, config, report = session.current_report()
st.markdown(
    "The simulation predicts what a quantized model would score. Here the same model runs on "
    "**integers alone**: int32 accumulators with zero-point corrections, int32 bias, and between "
    "layers a requantization by a fixed-point multiplier instead of a float division. Production "
    "runtimes (PyTorch's int8 kernels, ONNX Runtime) run it too, so you can check they agree."
)
st.latex(r"M = \frac{s_{in}\, s_w}{s_{out}} = M_0 \cdot 2^{\,shift - 31},\quad M_0 \in [2^{30}, 2^{31})")
st.latex(
    r"q_{out} = \mathrm{clamp}\big(z_{out} + \big\lfloor (acc \cdot M_0 + 2^{\,30 - shift}) / 2^{\,31 - shift}"
    r"\big\rfloor,\ z_{out},\ 2^b - 1\big)"
)
st.markdown(
    "The int32 accumulator is multiplied by the int32 M0 into a 64-bit product, and that product is "
    "**rounded once**, half up, by adding half of 2^(31 − shift) and shifting right by 31 − shift bits: "
    "a multiplication by M without a float (TFLite's single-rounding requantization, as TFLite Micro "
    "and CMSIS-NN run it). gemmlowp's older recipe rounds twice (a rounding doubling high multiply, "
    "then a rounding right shift); with 2-bit activations that second rounding changed about 5% of "
    "the predictions here. The lesson *One image on integers* writes the steps out for one value."
)
try:
    engine = IntegerNet(report.qnet)
except IntegerEngineError as error:
    advice = (
        " Quantize every layer and the input, at 8 bits or fewer, to deploy on integers."
        if integer_path_problems(config)
        else ""
    )
    st.warning(f"The integer engine cannot run this model: {shorten(error, 300)}.{advice}")
    st.session_state.pop("engines_shown", None)  # a later visit does not ask for the comparison again
    session.stop_page()

st.subheader("Integer parameters per layer")
table_with_csv(
    [
        {
            "layer": name,
            "input zero point": layer.input_zero,
            "output zero point": layer.output_zero,
            "M0 (min)": int(layer.multiplier.min()),
            "M0 (max)": int(layer.multiplier.max()),
            "shift (min)": int(layer.shift.min()),
            "shift (max)": int(layer.shift.max()),
            "bias range": f"{int(layer.bias.min())} .. {int(layer.bias.max())}",
        }
        for name, layer in engine.layers.items()
    ],
    "integer parameters",
    "integer_params",
)

st.subheader("Agreement and throughput")
if config.max_bits > 8:
    st.info("The ONNX export and PyTorch's int8 kernels store 8-bit integers; use at most 8 bits to compare.")
elif st.button("Run every inference path on the 10k test set", key="run_engines") or st.session_state.get(
    "engines_shown"
):
    st.session_state["engines_shown"] = True
    results = cache.engine_results(entry.fingerprint, config.to_json(), session.data_folder(), entry.model, entry.qat)
    table_with_csv(
        [
            {
                "path": r.engine,
                "accuracy (%)": round(100 * r.accuracy, 2),
                "same prediction as the simulation (%)": round(100 * r.agreement_with_simulation, 2),
                "seconds": round(r.seconds, 3),
                "images/s": round(r.images_per_second),
            }
            for r in results
        ],
        "engine comparison",
        "engines",
    )
    st.plotly_chart(
        throughput_figure([r.engine for r in results], [r.images_per_second for r in results]), key="throughput_chart"
    )
    st.caption(
        "PyTorch int8 picks its own ranges (histogram observer, 7-bit activations), so it may differ "
        "from the simulation on a few images; the integer engine and ONNX Runtime use ours."
    )

st.subheader("Size")
table_with_csv(size_table(report.qnet), "model size", "sizes")

if config.max_bits <= 8:
    qtensors, onnx_model = cache.exports(
        entry.fingerprint, config.to_json(), session.data_folder(), entry.model, entry.qat, entry.imported
    )
    left, right = st.columns(2)
    left.download_button(
        "Download integer tensors (.pt, weights_only)",
        qtensors,
        file_name=session.download_name(entry, "qtensors", "pt", config),
        key="download_qtensors",
    )
    right.download_button(
        "Download ONNX (QDQ)",
        onnx_model,
        file_name=session.download_name(entry, "qdq", "onnx", config),
        key="download_onnx",
    )
