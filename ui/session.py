"""Per-session state (the user's model, the QuantConfig and its URL) and the sidebar."""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from qcore.analysis import Report
from qcore.calibrate import OBSERVERS
from qcore.checkpoint import fingerprint
from qcore.config import WEIGHT_RANGES, QuantConfig, max_calib_batches
from qcore.data import DataNotFoundError, Mnist, data_dir
from qcore.methods import METHODS
from qcore.model import LAYER_NAMES, Net
from qcore.quant import Granularity, Scheme
from ui import cache

BIT_OPTIONS = [2, 3, 4, 5, 6, 7, 8, 16]
BATCH_SIZES = [16, 32, 64, 128, 256, 512, 1024]
MODEL_KEY = "qlab_model"
URL_WARNINGS_KEY = "qlab_url_warnings"


@dataclass(frozen=True)
class ModelEntry:
    """The session's current model and where it came from."""

    model: Net
    name: str
    fingerprint: str


def set_model(model: Net, name: str) -> ModelEntry:
    entry = ModelEntry(model.eval(), name, fingerprint(model))
    st.session_state[MODEL_KEY] = entry
    return entry


def current_model() -> ModelEntry:
    if MODEL_KEY not in st.session_state:
        bundled = cache.bundled_model()
        st.session_state[MODEL_KEY] = ModelEntry(bundled, "bundled pretrained net", fingerprint(bundled))
    return st.session_state[MODEL_KEY]


def data_folder() -> str:
    return str(data_dir().resolve())


def mnist_or_stop() -> Mnist:
    """The shared MNIST tensors, or a clear error (what folder, what to do) and stop."""
    try:
        return cache.shared_mnist(data_folder())
    except DataNotFoundError as error:
        st.error(f"**MNIST is not available.** {error}")
        st.stop()
        raise  # unreachable: st.stop() ends the script run


# --- the QuantConfig: sidebar widgets <-> session state <-> URL query string -----------------


def _seed_widgets_from_url() -> None:
    """On a session's first run, the URL's config (corrected, with warnings) fills the widgets."""
    if "weight_bits" in st.session_state:
        return
    config, warnings = QuantConfig.from_query({key: st.query_params[key] for key in st.query_params})
    if config.weight_bits not in BIT_OPTIONS or config.act_bits not in BIT_OPTIONS:
        warnings.append(f"bit-widths offered here are {BIT_OPTIONS}; using 8 instead")
        config = config.with_changes(
            weight_bits=config.weight_bits if config.weight_bits in BIT_OPTIONS else 8,
            act_bits=config.act_bits if config.act_bits in BIT_OPTIONS else 8,
        )
    if config.batch_size not in BATCH_SIZES:
        warnings.append(f"batch sizes offered here are {BATCH_SIZES}; using 64 instead of {config.batch_size}")
        config = config.with_changes(batch_size=64, calib_batches=min(config.calib_batches, max_calib_batches(64)))
    for key, value in config.to_dict().items():
        if key == "methods":
            st.session_state[key] = list(value)
        elif key == "float_layers":
            for name in LAYER_NAMES:
                st.session_state[f"float_{name}"] = name in config.float_layers
        else:
            st.session_state[key] = value
    st.session_state[URL_WARNINGS_KEY] = warnings


def config_controls() -> QuantConfig:
    """The sidebar's quantization settings; returns the QuantConfig they describe and mirrors it
    into the URL so that the link reproduces this what-if."""
    _seed_widgets_from_url()
    for warning in st.session_state.get(URL_WARNINGS_KEY, []):
        st.sidebar.warning(f"Link setting corrected: {warning}")
    sidebar = st.sidebar
    sidebar.subheader("Quantization settings")
    sidebar.select_slider("Weight bits", BIT_OPTIONS, key="weight_bits")
    sidebar.select_slider("Activation bits", BIT_OPTIONS, key="act_bits")
    with sidebar.expander("Calibration and scheme", expanded=False):
        st.select_slider("Calibration batch size", BATCH_SIZES, key="batch_size")
        limit = max_calib_batches(st.session_state["batch_size"])
        if st.session_state["calib_batches"] > limit:
            st.session_state["calib_batches"] = limit
        st.number_input(
            f"Calibration batches (1 to {limit}: all training images)",
            min_value=1,
            max_value=limit,
            key="calib_batches",
        )
        st.selectbox("Activation range rule (observer)", list(OBSERVERS), key="observer")
        st.radio("Weight granularity", [g.value for g in Granularity], key="granularity", horizontal=True)
        st.radio("Weight scheme", [s.value for s in Scheme], key="scheme", horizontal=True)
        st.radio("Weight range", list(WEIGHT_RANGES), key="weight_range", horizontal=True)
        st.checkbox("Quantize the network's input", key="quantize_input")
        st.number_input("Calibration sample seed", min_value=0, max_value=2**31 - 1, key="seed")
        st.caption("Keep these layers in float:")
        columns = st.columns(len(LAYER_NAMES))
        for column, name in zip(columns, LAYER_NAMES, strict=True):
            column.checkbox(name, key=f"float_{name}")
    with sidebar.expander("PTQ methods", expanded=bool(st.session_state["methods"])):
        st.multiselect("Methods (applied in this order)", list(METHODS), key="methods")
        st.number_input(
            "Mixed precision: average weight bits at most (0 = off)",
            min_value=0.0,
            max_value=8.0,
            step=0.25,
            key="weight_bits_budget",
        )
    budget = float(st.session_state["weight_bits_budget"])
    if 0 < budget < 2:
        sidebar.warning("A weight-bits budget below 2 cannot be met (2 bits is the least); mixed precision is off.")
        budget = 0.0
    config = QuantConfig(
        weight_bits=st.session_state["weight_bits"],
        act_bits=st.session_state["act_bits"],
        calib_batches=int(st.session_state["calib_batches"]),
        batch_size=st.session_state["batch_size"],
        observer=st.session_state["observer"],
        granularity=st.session_state["granularity"],
        scheme=st.session_state["scheme"],
        weight_range=st.session_state["weight_range"],
        quantize_input=st.session_state["quantize_input"],
        float_layers=tuple(name for name in LAYER_NAMES if st.session_state[f"float_{name}"]),
        seed=int(st.session_state["seed"]),
        methods=tuple(st.session_state["methods"]),
        weight_bits_budget=budget,
    ).validate()
    query = config.to_query()
    if {key: st.query_params[key] for key in st.query_params} != query:
        st.query_params.from_dict(query)
    return config


def sidebar_summary(entry: ModelEntry, config: QuantConfig) -> None:
    """Current model, float vs quantized accuracy for the current config, and the config itself."""
    sidebar = st.sidebar
    sidebar.divider()
    sidebar.markdown(f"**Model:** {entry.name}  \n`{entry.fingerprint}`")
    try:
        result = cache.report(entry.fingerprint, config.to_json(), data_folder(), entry.model)
    except DataNotFoundError:
        sidebar.error("MNIST is missing: see the Model page.")
        return
    sidebar.metric("Float accuracy", percent(result.float_result.accuracy))
    sidebar.metric(
        "Quantized accuracy",
        percent(result.quant_result.accuracy),
        delta=f"{100 * -result.accuracy_drop:+.2f} pts",
    )
    with sidebar.expander("Current QuantConfig"):
        st.json(config.to_dict())
        st.caption("The page URL holds these settings: share it to share this what-if.")


def current_report() -> tuple[ModelEntry, QuantConfig, Report]:
    """For pages: the model, the config (set by app.py this run) and its cached report."""
    entry = current_model()
    config = st.session_state["qlab_config"]
    mnist_or_stop()
    return entry, config, cache.report(entry.fingerprint, config.to_json(), data_folder(), entry.model)


def percent(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"
