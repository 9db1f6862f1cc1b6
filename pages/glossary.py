"""The words the lab uses, each defined once, with the formula it stands for."""

import streamlit as st

from ui import session
from ui.lessons import LESSONS

session.require_navigation()  # first: a deep link on a fresh server may run this page alone
st.title("Glossary")
st.markdown(
    "The words the lessons and pages use, in the order you meet them. Every number elsewhere in the lab is "
    "measured on the current model; these are definitions."
)
TERMS = (
    (
        "Quantization, PTQ and QAT",
        "Storing and computing a network's numbers as small integers instead of 32-bit floats. **PTQ** "
        "(post-training quantization) picks the integer grids for a network already trained, from a few "
        "calibration images; **QAT** (quantization-aware training) trains the network with the rounding in "
        "the loop so its weights settle on the grid.",
        None,
    ),
    (
        "Scale (s) and zero point (z)",
        "The grid: a real value x is stored as the integer q, and read back as s (q - z). The scale is the "
        "step between two levels; the zero point is the integer that stands for 0.0 (0 for a symmetric grid).",
        r"q = \mathrm{clamp}\!\left(\mathrm{round}\!\left(\tfrac{x}{s}\right) + z,\ q_{\min},\ q_{\max}\right),"
        r"\qquad \hat{x} = s\,(q - z)",
    ),
    (
        "Bits, levels and LSB",
        "b bits give 2^b levels. One **LSB** (least significant bit) is one step of the grid, s in real units: "
        "an error of 1 LSB means one level off.",
        r"\text{levels} = 2^{b}, \qquad 1\ \mathrm{LSB} = s",
    ),
    (
        "Symmetric and affine (asymmetric)",
        "A symmetric grid is centred on 0 (z = 0), as weights usually are; an affine grid places its levels "
        "over [min, max] with any zero point, as activations after a ReLU need.",
        None,
    ),
    (
        "Per-tensor and per-channel",
        "One scale for a layer's whole weight tensor, or one scale per output channel (filter). Per-channel "
        "keeps a channel with small weights from being crushed by one with large ones.",
        None,
    ),
    (
        "Calibration and observer",
        "**Calibration** runs a few training images through the float network to see the range of each "
        "tensor that will be quantized. The **observer** turns what it saw into a range: min/max, a "
        "percentile, or the range that minimizes the mean squared rounding error (MSE).",
        None,
    ),
    (
        "Clipping",
        "A range narrower than the values seen: values outside it are clamped to the end levels. It trades "
        "a large error on a few outliers for finer steps on everything else.",
        None,
    ),
    (
        "SQNR",
        "Signal-to-quantization-noise ratio: how much larger a tensor is than the error quantization put in "
        "it, in decibels. Each 6 dB is about one bit; 20 dB means the error is a tenth of the signal.",
        r"\mathrm{SQNR} = 10 \log_{10} \frac{\sum y^2}{\sum (y - \hat{y})^2}\ \mathrm{dB}",
    ),
    (
        "Fake quantization (the simulation)",
        "Rounding a float onto its grid and reading it straight back as a float: the network then computes "
        "in float with exactly the values the integers stand for. The lab's definition of the quantized model.",
        None,
    ),
    (
        "Accumulator, M0 and the shift",
        "An integer-only layer sums products of 8-bit integers into a 32-bit **accumulator**, then must "
        "multiply by the real factor s_in s_w / s_out to land on the next layer's grid. That factor is "
        "written as a 31-bit integer **M0** and a right **shift** n, so the multiply is integer arithmetic.",
        r"\frac{s_{\mathrm{in}}\, s_w}{s_{\mathrm{out}}} \approx M_0 \cdot 2^{-31-n}",
    ),
    (
        "Requantization",
        "That step: accumulator times M0, shifted and rounded once, plus the output's zero point, clamped to "
        "the output's levels.",
        None,
    ),
)
for term, text, formula in TERMS:
    st.subheader(term)
    st.markdown(text)
    if formula:
        st.latex(formula)
st.caption("The lessons, in order: " + ", ".join(title for _, title in LESSONS) + ".")
