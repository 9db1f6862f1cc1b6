"""Methods: what equalization, mixed precision, AdaRound, block reconstruction and bias correction changed."""

import streamlit as st

from qcore.analysis.tables import block_rows
from qcore.figures import adaround_figure, bias_shift_figure, block_reconstruction_figure, equalization_figure
from qcore.models.peers import LAB, PeersFileError, comparison_rows, peer_comparison
from qcore.quantize.config import QuantConfig
from qcore.quantize.methods import average_bits
from ui import session
from ui.tables import table_with_csv

session.require_navigation()  # first: a deep link on a fresh server may run this page alone


def adaround_row(values: dict[str, object]) -> dict[str, object]:
    """'kept' is a flag: yes/no, not 1/0."""
    return {k: ("yes" if v else "no") if k == "kept" else v for k, v in values.items()}


def show_peers(entry: session.ModelEntry, config: QuantConfig) -> None:
    """What the tools engineers use instead got on this zoo model: measured by bench/bench_peers.py and
    shipped with the model, never computed here; an upload or retrained weights have no such numbers."""
    try:
        comparison = peer_comparison(entry.zoo) if session.is_bundled(entry) else None
    except PeersFileError as error:
        st.warning(f"The peers' comparison shipped with this model cannot be read: {error}", icon=None)
        return
    if comparison is None:
        return
    st.subheader("What would I get elsewhere?")
    st.markdown(
        "The same model quantized by AIMET, Brevitas, NNCF, ONNX Runtime's quantizer and torchao (PT2E), beside "
        "the lab's own recipes: each tool's best setting per column, chosen on 5,000 validation images, then "
        "measured once on the full test set. Each tool's conventions are in the benchmarks page of the docs; "
        "the row *lab (peers' conventions)* is the lab again under the peers' looser ones (residual adds kept "
        "in float, Brevitas's percentile ranges), shown for fairness and not counted as the lab's."
    )
    table_with_csv(comparison_rows(comparison), "peers", "peers")
    label = f"W{config.weight_bits}A{config.act_bits}"
    lead = comparison.lab_lead(label) if label in comparison.bits else None
    if lead is not None:
        lab = comparison.best[LAB][label]
        # the file's text (a setting's name, a commit) is shown as plain text, never as markdown
        session.plain_text(
            f"At the sidebar's {label}, the lab's best recipe ({lab.setting}, chosen on validation) scores "
            f"{lab.accuracy:.2f}%, {abs(lead):.2f} points {'above' if lead >= 0 else 'below'} the best peer."
        )
    session.plain_text(
        f"Measured by bench/bench_peers.py (at commit {comparison.commit}), float accuracy "
        f"{comparison.float_accuracy:.2f}%; not measured on this server."
    )


st.title("Methods")
entry, config, report = session.current_report()
methods = report.qnet.methods
st.markdown(
    "Beyond choosing ranges, five published post-training methods push quantization to fewer bits "
    "without retraining. Pick them in the sidebar (**PTQ methods**); they run in a fixed order: "
    "cross-layer equalization, mixed precision, AdaRound or block reconstruction, bias correction. "
    "AdaRound learns, per weight, whether to round down or up, so that the layer's output on "
    "calibration data is kept:"
)
st.latex(
    r"\min_{V}\ \big\| W x - \tilde W \hat x \big\|^2 + \lambda \sum_{i} \big(1 - |2h(V_i) - 1|^{\beta}\big),"
    r"\qquad \tilde W = s \cdot \mathrm{clamp}\big(\lfloor W / s \rfloor + h(V),\ q_{\min},\ q_{\max}\big)"
)
show_peers(entry, config)
if not config.methods and not config.weight_bits_budget:
    st.info(
        "No method is selected. Try: weight bits 2, then add **adaround** in the sidebar and compare "
        "the quantized accuracy. AdaRound trains a rounding for every weight, so its first run takes a "
        "while (the page then shows how long it took here); later visits are cache hits."
    )
    session.stop_page()

if methods.weight_bits:
    st.subheader("Weight bits per layer")
    table_with_csv([{"layer": n, "weight bits": b} for n, b in methods.weight_bits.items()], "bits", "method_bits")
    st.caption(f"Average over parameters: {average_bits(methods.weight_bits, methods.parameters):.2f} bits.")
if methods.seconds:
    table_with_csv([{"method": k, "seconds": v} for k, v in methods.seconds.items()], "method times", "method_times")

if methods.equalization:
    st.subheader("Cross-layer equalization")
    for pair, data in methods.equalization.items():
        st.plotly_chart(equalization_figure(pair, data["ranges_before"], data["ranges_after"]), key=f"eq_{pair}")
    st.caption("Each chart: how the channels' weight ranges are distributed before and after (log scale).")
    replaced = [name for data in methods.equalization.values() for name in data.get("relu6_replaced_by_relu", [])]
    if replaced:
        st.caption(
            f"Equalization rescales channels across ReLU6, whose clip at 6 would move per channel, so it replaced "
            f"{len(replaced)} ReLU6 by ReLU ({', '.join(replaced)}), as Nagel et al. (2019) did for MobileNetV2: "
            "the quantized model computes max(0, x) there."
        )
if methods.adaround:
    st.subheader("AdaRound")
    names = list(methods.adaround)
    st.plotly_chart(adaround_figure(names, [methods.adaround[n]["flipped_fraction"] for n in names]), key="ada")
    table_with_csv([{"layer": n, **adaround_row(methods.adaround[n])} for n in names], "AdaRound", "adaround")
if methods.blocks:
    st.subheader("Block reconstruction")
    st.markdown(
        "The same objective, but for a whole block at once (a residual block, a depthwise-separable pair, a "
        "pair of layers: the blocks found in this model's graph), with the block's activations quantized "
        "while it learns and, as QDrop does, left in float at random half the time."
    )
    rows = block_rows(methods.blocks)
    before = [r["error, nearest rounding"] for r in rows]
    figure = block_reconstruction_figure([r["block"] for r in rows], before, [r["error, reconstructed"] for r in rows])
    st.plotly_chart(figure, key="blocks_chart")
    table_with_csv(rows, "Block reconstruction", "block_reconstruction")
if methods.bias_shift:
    st.subheader("Bias correction")
    chosen = st.selectbox("Layer", list(methods.bias_shift), key="bias_layer")
    st.plotly_chart(bias_shift_figure(chosen, methods.bias_shift[chosen]), key="bias_shift_chart")
