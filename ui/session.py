"""Per-session state (the user's model, the QuantConfig and its URL) and the sidebar.

Untrusted text (URL values, upload names, anything read from a file) is only ever shown through
`plain_text`, never inside markdown: st.warning, st.error, st.info and st.markdown all render
markdown, where a link or an image from a URL would become live.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import NoReturn

import streamlit as st
from streamlit.delta_generator import DeltaGenerator
from streamlit.runtime.pages_manager import PagesManager
from torch import nn

from qcore.analysis.tables import Report
from qcore.data import DATASETS, MAX_SEED, DataError, DataFileError, Dataset, DatasetSpec, data_dir
from qcore.files import shorten
from qcore.graph import ModelGraph
from qcore.models.checkpoint import bundled_identity, fingerprint
from qcore.models.onnx_import import ImportedModel
from qcore.models.zoo import DEFAULT_MODEL, ZOO, zoo_model
from qcore.quantize.calibrate import OBSERVERS
from qcore.quantize.config import DASHBOARD, WEIGHT_RANGES, QuantConfig
from qcore.quantize.methods import METHODS
from qcore.quantize.quant import Granularity, Scheme
from qcore.training.qat import QatCheckpoint, qat_fingerprint
from ui import cache

BIT_OPTIONS = list(DASHBOARD.bits)
BATCH_SIZES = list(DASHBOARD.batch_sizes)
MODEL_KEY = "qlab_model"
PREVIOUS_MODEL_KEY = "qlab_previous_model"
URL_WARNINGS_KEY = "qlab_url_warnings"
CONFIG_KEY = "qlab_config"  # set by app.py on every run, before the page runs
PENDING_SETTINGS_KEY = "qlab_pending_settings"  # set by a page; applied before the next run draws the sidebar
MODEL_QUERY_KEY = "model"  # the zoo model in the URL, beside the QuantConfig's settings
log = logging.getLogger("qlab")


SUMMARY_HOOK_KEY = "qlab_sidebar_summary"  # app.py's "draw the sidebar summary" for this run


def draw_sidebar_summary() -> None:
    """Draw this run's sidebar summary, once: app.py calls it after the page, stop_page before stopping."""
    hook = st.session_state.pop(SUMMARY_HOOK_KEY, None)
    if hook is not None:
        hook()


def stop_page() -> NoReturn:
    """End the page's run early (st.stop), after drawing the sidebar summary that app.py would have
    drawn below the page: a stopped run never gets back to app.py."""
    draw_sidebar_summary()
    st.stop()
    raise AssertionError("unreachable: st.stop() ends the script run")


def plain_text(text: str, where: DeltaGenerator | None = None) -> None:
    """Show untrusted text as plain text (st.text renders no markdown or HTML), one line, shortened."""
    (where or st).text(shorten(text, 300))


def require_navigation() -> None:
    """On a fresh server Streamlit starts in its legacy pages/ mode (this repo has a pages/ folder)
    until some session runs app.py's st.navigation; a first request for a deep link like /accuracy
    would run pages/accuracy.py alone, without the sidebar or the config. Leave that mode and rerun:
    the rerun keeps the page (its hash is its url_path either way) and the query string. The config
    key is the per-session sign that app.py ran: a session that started in legacy mode while another
    session cleared the flag sees it cleared, but still has no config."""
    if PagesManager.uses_pages_directory or CONFIG_KEY not in st.session_state:
        PagesManager.uses_pages_directory = False
        st.rerun()


@dataclass(frozen=True)
class ModelEntry:
    """The session's current model and where it came from."""

    model: nn.Module  # the float weights (a QAT model's trained float weights)
    name: str
    fingerprint: str
    qat: QatCheckpoint | None = None  # a QAT model: its own quantization, used when the sidebar matches it
    start: ModelEntry | None = None  # the float model QAT started from, when it was trained here
    zoo: str = DEFAULT_MODEL  # its zoo architecture, and so its dataset (an imported model: ignored)
    imported: ImportedModel | None = None  # a user's ONNX model: its own graph, dataset and input scale

    @property
    def graph(self) -> ModelGraph:
        """The model graph (layers for the sidebar and the lessons): traced once per weights for the
        whole server, not once per session (a new session's entry is a new object)."""
        return cache.model_graph_of(self.fingerprint, self.model)

    @property
    def dataset(self) -> DatasetSpec:
        return DATASETS[self.imported.dataset if self.imported is not None else zoo_model(self.zoo).dataset]

    @property
    def input_scale(self) -> str:
        return self.imported.input_scale if self.imported is not None else "normalized"

    @property
    def input_view(self) -> str:
        """How this model reads its dataset's images (qcore.data.input_view_name)."""
        return self.imported.input_view if self.imported is not None else "normalized"

    @property
    def is_bundled(self) -> bool:
        return self.name == bundled_name(self.zoo)

    def qat_applies(self, config: QuantConfig) -> bool:
        """Whether `config` is the one this QAT model was trained for (else results calibrate afresh)."""
        return self.qat is not None and self.qat.trained_for(config) is not None


def bundled_name(zoo: str) -> str:
    return f"bundled {zoo}"


def set_model(
    model: nn.Module,
    name: str,
    qat: QatCheckpoint | None = None,
    start: ModelEntry | None = None,
    zoo: str | None = None,
    imported: ImportedModel | None = None,
) -> ModelEntry:
    """Make `model` the session's model: of zoo architecture `zoo`, or a user's ONNX model `imported`;
    with neither, the current model's (QAT keeps the architecture and the data). The one it replaces
    stays one click away."""
    if zoo is None and imported is None:
        zoo, imported = current_model().zoo, current_model().imported
    zoo = DEFAULT_MODEL if zoo is None else zoo
    key = fingerprint(model) if qat is None else qat_fingerprint(qat)
    if imported is not None and qat is None:
        key = imported.identity  # its graph, weights, dataset and input convention
    origin = "onnx" if imported is not None else zoo
    entry = ModelEntry(model.eval(), shorten(name), f"{origin}-{key}", qat, start, zoo, imported)
    replaced = st.session_state.get(MODEL_KEY)
    if replaced is not None and replaced.fingerprint != entry.fingerprint:
        st.session_state[PREVIOUS_MODEL_KEY] = replaced
    st.session_state[MODEL_KEY] = entry
    return entry


def download_name(entry: ModelEntry, what: str, extension: str, config: QuantConfig | None = None) -> str:
    """One name per kind of file, model and config: two downloads that are different files never share
    a name (a QAT checkpoint and the float weights it holds were both qlab_qat-<fingerprint>.pt)."""
    parts = ["qlab", entry.fingerprint]
    if config is not None:  # what depends on the config carries it: the bits, and a hash of the rest
        parts.append(f"W{config.weight_bits}A{config.act_bits}-{hashlib.sha256(config.to_json().encode()).hexdigest()[:8]}")
    return "_".join([*parts, what]) + "." + extension


def previous_model() -> ModelEntry | None:
    return st.session_state.get(PREVIOUS_MODEL_KEY)


def restore_model(entry: ModelEntry) -> None:
    """Make a model the session held before current again (the current one becomes the previous)."""
    replaced = current_model()
    if replaced.fingerprint != entry.fingerprint:
        st.session_state[PREVIOUS_MODEL_KEY] = replaced
    st.session_state[MODEL_KEY] = entry


def switch_model(zoo: str) -> None:
    """The zoo model `zoo` with its bundled weights becomes the session's model (and its dataset)."""
    restore_model(bundled_entry(zoo))


def bundled_entry(zoo: str) -> ModelEntry:
    bundled = cache.bundled_model(zoo)
    return ModelEntry(bundled, bundled_name(zoo), bundled_identity(zoo, bundled), zoo=zoo)


def is_bundled(entry: ModelEntry) -> bool:
    """The entry is a zoo model with the weights it ships with (not retrained, not QAT, not an upload)."""
    return entry.imported is None and entry.qat is None and entry.fingerprint == bundled_entry(entry.zoo).fingerprint


def current_model() -> ModelEntry:
    """The session's model; on its first run, the bundled model the URL names (else the default)."""
    if MODEL_KEY not in st.session_state:
        asked = st.query_params.get(MODEL_QUERY_KEY, DEFAULT_MODEL)
        zoo = asked if asked in ZOO else DEFAULT_MODEL
        if zoo != asked:
            st.session_state.setdefault(URL_WARNINGS_KEY, []).append(
                f"ignored model={shorten(asked)!r}: not a model of the zoo; using {DEFAULT_MODEL}"
            )
        st.session_state[MODEL_KEY] = bundled_entry(zoo)
    return st.session_state[MODEL_KEY]


def data_folder() -> str:
    """The data source of the current model, as the cache keys it: its dataset and the data folder."""
    entry = current_model()
    return cache.data_source(entry.dataset.name, str(data_dir().resolve()), entry.input_view)


def show_data_error(error: DataError, where: DeltaGenerator | None = None) -> None:
    """What a user may see of a data problem: no server path (the log has it), what to do."""
    spec = current_model().dataset
    log.error("%s unavailable: %s", spec.title, error)
    where = where or st
    if isinstance(error, DataFileError):
        where.error(
            f"**{spec.title} is not available: a data file on this server is damaged.** The server's log has details."
        )
        plain_text(str(error), where)  # names the file (no folder) and what is wrong with it
    else:
        where.error(
            f"**{spec.title} is not available on this server.** Whoever runs it must put its four "
            f"`*-ubyte` files in `{spec.folder}/raw/` under the folder that `QCORE_DATA_DIR` names, or "
            f"{spec.how_to_get} (see docs/setup.md, Data); the server's log names the folder searched."
        )


def mnist_or_stop() -> Dataset:
    """The current model's dataset (shared tensors), or a clear error and stop."""
    try:
        return cache.shared_data(data_folder())
    except DataError as error:
        show_data_error(error)
        stop_page()


def show_compute_failure(error: Exception, where: DeltaGenerator | None = None) -> None:
    """A failure computing results for this session's model: a short message for the user, the
    traceback in the server's log, and the way out (the bundled net, other settings)."""
    log.exception("computing results failed")
    (where or st).error(
        f"Results could not be computed for this model and these settings ({type(error).__name__}). "
        "Try other settings, or go back to the bundled net on the Model page."
    )


# --- the QuantConfig: sidebar widgets <-> session state <-> URL query string -----------------


def _seed_widgets_from_url() -> None:
    """On a session's first run, the URL's config (corrected, with warnings) fills the widgets."""
    if "weight_bits" in st.session_state:
        return
    query = {key: st.query_params[key] for key in st.query_params}
    layers = current_model().graph.layers
    config, warnings = QuantConfig.from_query(query, DASHBOARD, layers)  # bounded by what the sidebar offers
    _set_widgets(config.to_dict())
    st.session_state[URL_WARNINGS_KEY] = [*st.session_state.get(URL_WARNINGS_KEY, []), *warnings]


def config_controls() -> QuantConfig:
    """The sidebar's quantization settings; returns the QuantConfig they describe and mirrors it
    into the URL so that the link reproduces this what-if."""
    _seed_widgets_from_url()
    if PENDING_SETTINGS_KEY in st.session_state:  # before any widget is drawn, so setting them is allowed
        _set_widgets({**QuantConfig().to_dict(), **st.session_state.pop(PENDING_SETTINGS_KEY)})
    for warning in st.session_state.get(URL_WARNINGS_KEY, []):
        box = st.sidebar.container(border=True)
        box.markdown(":orange[:material/warning: **A link setting was corrected**]")
        plain_text(warning, box)  # holds text from the URL: plain text only
    sidebar = st.sidebar
    sidebar.subheader("Quantization settings")
    sidebar.select_slider("Weight bits", BIT_OPTIONS, key="weight_bits")
    sidebar.select_slider("Activation bits", BIT_OPTIONS, key="act_bits")
    with sidebar.expander("Calibration and scheme", expanded=False):
        st.select_slider("Calibration batch size", BATCH_SIZES, key="batch_size")
        limit = DASHBOARD.max_calib_batches(st.session_state["batch_size"])
        if st.session_state["calib_batches"] > limit:
            st.session_state["calib_batches"] = limit
        st.number_input(
            f"Calibration batches (1 to {limit}: {limit * st.session_state['batch_size']} images)",
            min_value=1,
            max_value=limit,
            key="calib_batches",
        )
        st.selectbox("Activation range rule (observer)", list(OBSERVERS), key="observer")
        st.radio("Weight granularity", [g.value for g in Granularity], key="granularity", horizontal=True)
        st.radio("Weight scheme", [s.value for s in Scheme], key="scheme", horizontal=True)
        st.radio("Weight range", list(WEIGHT_RANGES), key="weight_range", horizontal=True)
        st.checkbox("Quantize the network's input", key="quantize_input")
        _bits_of_their_own(
            "First and last layers' bits (weights and inputs)",
            "edge_bits",
            "like the rest",
            "Low-bit QAT work (LSQ, PACT) keeps the first and last layers at 8 bits.",
        )
        _bits_of_their_own(
            "Residual adds' input bits",
            "add_bits",
            "the activation bits",
            "The tensors that are no layer's input (an add's two inputs): they feed no multiplication.",
        )
        st.number_input("Calibration sample seed", min_value=0, max_value=MAX_SEED, key="seed")
        st.caption("Keep these layers in float:")
        layers = current_model().graph.layers
        for row_start in range(0, len(layers), 2):  # two per row: four columns cut the names to "c…"
            columns = st.columns(2)
            for column, name in zip(columns, layers[row_start : row_start + 2], strict=False):
                column.checkbox(name, key=f"float_{name}")
    with (
        sidebar.expander("PTQ methods", expanded=bool(st.session_state["methods"])),
        st.form("methods_form", border=False),  # several clicks, one computation: AdaRound takes a while
    ):
        st.multiselect("Methods (applied in this order)", list(METHODS), key="methods")
        st.number_input(
            "Mixed precision: average weight bits at most (0 = off)",
            min_value=0.0,
            max_value=8.0,
            step=0.25,
            key="weight_bits_budget",
        )
        st.form_submit_button("Apply methods")
    budget = float(st.session_state["weight_bits_budget"])
    if 0 < budget < 2:
        sidebar.warning("A weight-bits budget below 2 cannot be met (2 bits is the least); mixed precision is off.")
        budget = 0.0
    if budget and st.session_state["edge_bits"]:
        sidebar.warning("Mixed precision is off while the first and last layers have bits of their own.")
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
        float_layers=tuple(name for name in layers if st.session_state.get(f"float_{name}", False)),
        seed=int(st.session_state["seed"]),
        methods=tuple(st.session_state["methods"]),
        weight_bits_budget=budget,
        edge_bits=st.session_state["edge_bits"],
        add_bits=st.session_state["add_bits"],
    ).validate(layers)
    query = config.to_query()
    if current_model().zoo != DEFAULT_MODEL and current_model().imported is None:  # an upload cannot be linked
        query[MODEL_QUERY_KEY] = current_model().zoo
    if {key: st.query_params[key] for key in st.query_params} != query:
        st.query_params.from_dict(query)
    return config


def sidebar_summary(entry: ModelEntry, config: QuantConfig, sidebar: DeltaGenerator) -> None:
    """Current model, float vs quantized accuracy for the current config, and the config itself, in
    `sidebar` (a container in the sidebar)."""
    sidebar.divider()
    # the name alone: the fingerprint is the model card's (issue 29: a hash is not a way in)
    plain_text(f"Model: {entry.name}", sidebar)  # an upload's name is untrusted
    sidebar.caption(f"Dataset: {entry.dataset.title}")
    try:
        result = cache.report(entry.fingerprint, config.to_json(), data_folder(), entry.model, sidebar, entry.qat)
    except DataError:
        sidebar.error(f"{entry.dataset.title} is missing: see the Model page.")
        return
    except Exception as error:  # noqa: BLE001 - whatever fails for this model, the sidebar must still render
        show_compute_failure(error, sidebar)
        return
    sidebar.metric("Float accuracy", percent(result.float_result.accuracy))
    sidebar.metric(
        "Quantized accuracy",
        percent(result.quant_result.accuracy),
        delta=f"{100 * -result.accuracy_drop:+.2f} pts",
    )
    if entry.qat is not None:
        trained = entry.qat.config.bits_label
        if entry.qat_applies(config):
            sidebar.caption(f"A QAT model trained at {trained}: the quantized results use its trained grid.")
        else:
            sidebar.info(
                f"This QAT model was trained at {trained} with the default settings. These settings differ, so "
                "results calibrate its float weights afresh (PTQ)."
            )
            sidebar.button(
                f"Back to {trained}, as trained",
                on_click=apply_settings,
                args=(entry.qat.config.to_dict(), True),
                key="qat_back_to_trained",
            )
    with sidebar.expander("Current QuantConfig"):
        st.json(config.to_dict())
        st.caption("The page URL holds these settings: share it to share this what-if.")


def current_report() -> tuple[ModelEntry, QuantConfig, Report]:
    """For pages: the model, the config (set by app.py this run) and its cached report."""
    entry = current_model()
    config = st.session_state[CONFIG_KEY]
    mnist_or_stop()
    first_answer = st.empty()  # a new what-if shows its first answer here while the rest is measured
    try:
        return (
            entry,
            config,
            cache.report(
                entry.fingerprint, config.to_json(), data_folder(), entry.model, qat=entry.qat, early=first_answer
            ),
        )
    except Exception as error:  # noqa: BLE001 - a page for a model that cannot be quantized says so and stops
        show_compute_failure(error)
        stop_page()


def percent(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"


def _bits_of_their_own(label: str, key: str, off: str, why: str) -> None:
    """A selectbox of a setting whose 0 means off (`off` says what then applies) or else the bits."""
    st.selectbox(
        label, [0, *BIT_OPTIONS], format_func=lambda bits: off if bits == 0 else f"{bits} bits", key=key, help=why
    )


def _set_widgets(settings: dict[str, object]) -> None:
    """Put QuantConfig fields into the sidebar's widget state (float_layers is one checkbox a layer)."""
    for key, value in settings.items():
        if key == "float_layers":
            for name in current_model().graph.layers:
                st.session_state[f"float_{name}"] = name in value  # type: ignore[operator]
        elif key == "methods":
            st.session_state[key] = list(value)  # type: ignore[call-overload]
        else:
            st.session_state[key] = value


def apply_settings(changes: dict[str, object], reset: bool = False) -> None:
    """A button callback that sets the sidebar's widgets (callbacks run before the widgets are drawn
    again, so this is allowed). With `reset`, every setting first goes back to its default."""
    _set_widgets({**(QuantConfig().to_dict() if reset else {}), **changes})
