"""Caching rules: st.cache_resource only for read-only shared data (the datasets, the bundled nets);
results are kept per kind in a bounded in-process cache of the objects themselves, keyed by (model
fingerprint, data source, config JSON, ...), in front of the shared result store (qcore.store) that a
server's replicas share, keyed by content; sessions share results only for identical weights and data."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager, nullcontext
from typing import TypeVar

import streamlit as st
from streamlit.delta_generator import DeltaGenerator
from streamlit.runtime import Runtime
from streamlit.runtime.scriptrunner import get_script_run_ctx
from torch import nn

from qcore import progress
from qcore.analysis.auto import SearchPoint, SearchResult, SearchSettings, auto_search
from qcore.analysis.diagnose import Diagnosis, LayerDiagnosis, diagnose
from qcore.analysis.tables import (
    Report,
    Sensitivity,
    SweepPoint,
    bit_sweep,
    build_report,
    layer_sensitivity,
    quantize_for,
)
from qcore.cancel import Cancelled
from qcore.data import Dataset, data_dir, load_dataset, parse_input_view, with_input_scale
from qcore.export.deploy import EngineResult, compare_engines
from qcore.export.formats import export_onnx_for, input_step_of, qtensors_bytes
from qcore.graph import ModelGraph, model_graph
from qcore.inference.evaluate import EvalResult, evaluate, slice_estimate
from qcore.inference.integer import IntegerNet
from qcore.lessons.failures import (
    FoldedLayer,
    FoldingWalk,
    ResidualAdd,
    folded_spreads,
    folding_walkthrough,
    residual_adds,
)
from qcore.lessons.prepare import ItemDone, PreparedClass, StoreFailed, prepare_class
from qcore.lessons.steps import OutlierRow, outlier_lesson
from qcore.lessons.walk import Walk, explain
from qcore.models.checkpoint import load_model
from qcore.models.onnx_import import ImportedModel, import_onnx
from qcore.quantize.config import QuantConfig
from qcore.store import STORE_ENV, StoreConfigError, result_key, store_from_environment
from qcore.training.qat import QatCheckpoint
from ui.gate import Gate, GateConfigError, configure_torch_threads, default_slots, slots_from_environment


def _session_present(session_id: Hashable) -> bool:
    """Whether a browser session is still connected. Streamlit drops a session from its active map as
    soon as its websocket closes (a closed tab), so work for it can stop at once. Without a runtime
    (AppTest, scripts) every session counts as present."""
    if not Runtime.exists():
        return True
    return Runtime.instance().is_active_session(str(session_id))


def _this_session() -> str | None:
    context = get_script_run_ctx(suppress_warning=True)
    return None if context is None else context.session_id


# One gate per server process (this module is imported once). A bad QCORE_MAX_COMPUTATIONS is kept in
# GATE_PROBLEM, and app.py refuses to serve with it, so the default below never hides it.
try:
    GATE, GATE_PROBLEM = Gate(slots_from_environment(), _session_present), ""
except GateConfigError as error:
    GATE, GATE_PROBLEM = Gate(default_slots(), _session_present), str(error)
configure_torch_threads(GATE.slots)
# The shared result store (QCORE_RESULT_STORE); a bad size setting, like the gate's, stops the app
try:
    STORE, STORE_PROBLEM = store_from_environment(), ""
except StoreConfigError as error:
    STORE, STORE_PROBLEM = None, str(error)
# Set to 1 on the instance whoever runs the server uses: the tour page then offers to prepare a class.
# Never on the class's own replicas: one click is minutes of computation on a shared machine.
OPERATOR_ENV = "QCORE_OPERATOR"
Result = TypeVar("Result")


def _in_turn(key: Hashable, compute: Callable[[], Result], where: DeltaGenerator | None = None) -> Result:
    """`compute()` in the gate's line for `key`, showing this session its place while it waits (in
    `where`, default the main area)."""
    notice: list[DeltaGenerator] = []

    def show(message: str) -> None:
        if not notice:
            notice.append((where or st).empty())
        notice[0].info(message, icon=":material/hourglass_top:")

    try:
        with GATE.turn(key, show, _this_session()):
            return compute()
    except Cancelled:
        st.stop()  # every session that asked has left: nobody to show anything to
        raise  # unreachable: st.stop() raises
    finally:
        if notice:
            notice[0].empty()


def time_left(since: tuple[float, float], now: float, fraction: float) -> str:
    """', about N s left' at the rate since `since` (a time and the fraction done then); '' until 5% more
    of the work is done, when a rate means little."""
    started, at_start = since
    if fraction - at_start < 0.05:
        return ""
    return f", about {math.ceil((now - started) / (fraction - at_start) * (1 - fraction))} s left"


PROGRESS_EVERY_S = 0.5  # a progress bar is redrawn at most this often (each redraw is a message to the browser)


@contextmanager
def progress_shown(where: DeltaGenerator | None = None) -> Iterator[None]:
    """Within the block, a long computation's progress (qcore.progress: AdaRound's and block
    reconstruction's steps) as a bar with an estimate of the time left, drawn at its first report (in
    `where`, default the main area) and removed when the block ends. The estimate extrapolates the rate
    since the first report."""
    bar: list[DeltaGenerator] = []
    first: list[tuple[float, float]] = []  # (time, fraction) of the first report
    drawn = [0.0]

    def show(fraction: float, what: str) -> None:
        now = time.monotonic()
        if not first:
            first.append((now, fraction))
        if now - drawn[0] < PROGRESS_EVERY_S:
            return
        drawn[0] = now
        if not bar:
            bar.append((where or st).empty())
        left = time_left(first[0], now, fraction)
        bar[0].progress(fraction, text=f"{what + ': ' if what else ''}{100 * fraction:.0f}% done{left}")

    try:
        with progress.reporting(show):
            yield
    finally:
        if bar:
            bar[0].empty()


_RUNS = itertools.count()


def own_run(kind: str, compute: Callable[[], Result], where: DeltaGenerator | None = None) -> Result:
    """A computation of this session's alone (a training or QAT run: never shared, never cached) in the
    gate's line like every other, so that two students training at once cannot starve the rest of the
    class; a waiting trainer sees its place in line, and the run stops when its session has left."""

    def run() -> Result:
        with GATE.slot():
            return compute()

    return _in_turn((kind, _this_session(), next(_RUNS)), run, where)


VIEW_MARK = "|view="  # then qcore.data.input_view_name's string, for a model that reads other images


def data_source(dataset: str, folder: str, input_view: str = "normalized") -> str:
    """The one string that names a dataset, where it is read from and how a model reads it (an imported
    model may take raw pixels): every cached result is keyed by it (so two datasets, or one seen two ways,
    never share a result), and shared_data reads it back."""
    return f"{dataset}|{folder}" + (f"{VIEW_MARK}{input_view}" if input_view != "normalized" else "")


@st.cache_resource(show_spinner="Loading the dataset into memory…")
def shared_data(source: str) -> Dataset:
    source, _, view = source.rpartition(VIEW_MARK) if VIEW_MARK in source else (source, "", "")
    dataset, folder = source.split("|", 1)
    input_scale, affine = parse_input_view(view or "normalized")
    return with_input_scale(load_dataset(dataset, folder), input_scale, affine)


def imported_model(content: bytes, dataset: str, input_scale: str) -> ImportedModel:
    """A user's ONNX file imported and checked against ONNX Runtime on `dataset` (about 1 to 3 s), its
    pixel convention `input_scale` or, for "auto", the one measured best on training images, in the gate's
    line like every other computation; raises OnnxImportError (a CheckpointError) or DataError."""
    source = data_source(dataset, str(data_dir().resolve()))
    key = ("onnx import", hashlib.sha256(content).hexdigest(), source, input_scale)
    with st.spinner("Importing the model and checking it against ONNX Runtime on 1,000 test images…"):
        return _in_turn(key, lambda: import_onnx(content, shared_data(source), input_scale))


_MEMO: OrderedDict[tuple[object, ...], object] = OrderedDict()
_MEMO_LOCK = threading.Lock()
MEMO_ENTRIES = 256


def memo(kind: str, key: tuple[object, ...], build: Callable[[], Result]) -> Result:
    """What every session would otherwise build again from one result (a figure, a table's rows), built
    once per result and shared, read-only, by every session of this process. A page's plotly figure
    costs far more to build (plotly validates every value) than to send."""
    full = (kind, *key)
    with _MEMO_LOCK:
        if full in _MEMO:
            _MEMO.move_to_end(full)
            return _MEMO[full]  # type: ignore[return-value]
    built = build()
    with _MEMO_LOCK:
        _MEMO[full] = built
        while len(_MEMO) > MEMO_ENTRIES:
            _MEMO.popitem(last=False)
    return built


_GRAPHS: OrderedDict[str, ModelGraph] = OrderedDict()
_GRAPHS_LOCK = threading.Lock()


def model_graph_of(fingerprint: str, model: nn.Module) -> ModelGraph:
    """A model's graph, traced once per fingerprint (tracing and shape propagation cost a new session
    a third of its page's time when every session traced its own)."""
    with _GRAPHS_LOCK:
        found = _GRAPHS.get(fingerprint)
        if found is not None:
            _GRAPHS.move_to_end(fingerprint)
            return found
    graph = model_graph(model)
    with _GRAPHS_LOCK:
        _GRAPHS[fingerprint] = graph
        while len(_GRAPHS) > 64:
            _GRAPHS.popitem(last=False)
    return graph


@st.cache_resource(show_spinner=False)
def bundled_model(zoo: str) -> nn.Module:
    """Shared by every session: never trained, mutated or hooked in place (qcore copies before hooks)."""
    return load_model(None, zoo)


# --- results: every session's, in memory, in front of the shared store, computed in the gate's line ---


class _Results:
    """One kind of result, shared by every session of this process: a bounded in-memory LRU of the
    objects themselves (st.cache_data unpickled a copy, a Report with its quantized model, on every
    rerun of every session), in front of the disk store the replicas share (qcore.store). A miss waits its
    turn in the gate's line, where sessions asking for the same key share one computation."""

    def __init__(self, kind: str, limit: int, spinner: str | None = None) -> None:
        self.kind, self.limit, self.spinner = kind, limit, spinner
        self.results: OrderedDict[tuple[object, ...], object] = OrderedDict()
        self.lock = threading.Lock()

    def remember(self, key: tuple[object, ...], result: object) -> None:
        with self.lock:
            self.results[key] = result
            self.results.move_to_end(key)
            while len(self.results) > self.limit:
                self.results.popitem(last=False)

    def cached(self, key: tuple[object, ...], folder: str | None = None) -> object | None:
        """In memory, else (given the data's folder) in the shared store, remembered from then on."""
        with self.lock:
            found = self.results.get(key)
            if found is not None:
                self.results.move_to_end(key)
                return found
        if STORE is None or folder is None:
            return None
        found = STORE.get(self.store_key(key, folder))
        if found is not None:
            self.remember(key, found)
        return found

    def store_key(self, key: tuple[object, ...], folder: str) -> str:
        """The store's key: the folder (a server path) replaced by the data's content id."""
        fingerprint, _folder, *rest = key
        return result_key(self.kind, str(fingerprint), shared_data(folder).content_id, *rest)

    def get(
        self,
        key: tuple[object, ...],
        folder: str,
        compute: Callable[[], Result],
        where: DeltaGenerator | None = None,
    ) -> Result:
        found = self.cached(key, folder)
        if found is not None:
            return found  # type: ignore[return-value]

        def once() -> Result:
            found = self.cached(key, folder)  # computed while this session waited in line
            if found is not None:
                return found  # type: ignore[return-value]
            with st.spinner(self.spinner) if self.spinner else nullcontext():
                result = compute() if STORE is None else STORE.compute(self.store_key(key, folder), compute)
            self.remember(key, result)
            return result

        return _in_turn((self.kind, *key), once, where)


def _folder_first(fingerprint: str, folder: str, *rest: object) -> tuple[object, ...]:
    """A result's key: the model's fingerprint, the data source, then what else it depends on."""
    return (fingerprint, folder, *rest)


_FLOAT = _Results("float", 16, "Evaluating the float model…")
_REPORTS = _Results("report", 48, "Calibrating and evaluating the quantized model…")
_SWEEPS = _Results("sweep", 16, "Sweeping bit-widths (seven calibrations and evaluations)…")
_SENSITIVITIES = _Results("sensitivity", 16, "Quantizing one layer at a time…")
_ENGINES = _Results("engines", 8, "Running every inference path over the test set…")
_EXPORTS = _Results("exports", 8, "Building the exports…")
_DIAGNOSES = _Results("diagnosis", 16)  # the page draws its own progress
_FOLDING_WALKS = _Results("folding", 8)
_RESIDUALS = _Results("residual", 16, "Measuring every residual add…")
_OUTLIERS = _Results("outliers", 16)
_WALKS = _Results("walk", 32, "Running the image through the integer engine…")
_SEARCHES = _Results("auto", 8)  # the page draws each point as it is measured


def float_result(fingerprint: str, folder: str, model: nn.Module) -> EvalResult:
    def compute() -> EvalResult:
        with GATE.slot():
            return evaluate(model, shared_data(folder).test)

    return _FLOAT.get(_folder_first(fingerprint, folder), folder, compute)


FIRST_ANSWER_IMAGES = 1000  # a new what-if's first answer: the quantized accuracy on this many test images


def report(
    fingerprint: str,
    config_json: str,
    folder: str,
    model: nn.Module,
    where: DeltaGenerator | None = None,
    qat: QatCheckpoint | None = None,
    early: DeltaGenerator | None = None,
) -> Report:
    """A QAT model (its fingerprint differs from its float weights') is reported with its own grid when
    the config is the one it was trained for; any other config calibrates its float weights. With
    `early`, a config that calibrates quickly (no PTQ method) first shows there the accuracy on the first
    FIRST_ANSWER_IMAGES test images with its 95% interval, replaced when the full report is done."""

    def compute() -> Report:
        config = QuantConfig.from_json(config_json)
        reference = float_result(fingerprint, folder, model)  # its own turn, before taking a slot
        trained = None if qat is None else qat.trained_for(config)
        data = shared_data(folder)
        with GATE.slot(), progress_shown(where):
            if early is None or trained is not None or config.methods or config.weight_bits_budget:
                return build_report(model, data, config, reference, qnet=trained)
            qnet = quantize_for(model, data, config)
            first = slice_estimate(qnet, data.test, FIRST_ANSWER_IMAGES)
            early.info(
                f"**First answer: quantized accuracy {first.describe()}.** All {first.of:,} are being evaluated…",
                icon=":material/timelapse:",
            )
            try:
                return build_report(model, data, config, reference, qnet=qnet)
            finally:
                early.empty()

    return _REPORTS.get(_folder_first(fingerprint, folder, config_json), folder, compute, where)


def sweep(
    fingerprint: str,
    config_json: str,
    target: str,
    folder: str,
    model: nn.Module,
    on_point: Callable[[SweepPoint], None] | None = None,
) -> list[SweepPoint]:
    """Accuracy from 2 to 8 bits; `on_point` as each bit-width is measured (a page draws them as they come)."""

    def compute() -> list[SweepPoint]:
        config = QuantConfig.from_json(config_json)
        with GATE.slot():
            return bit_sweep(model, shared_data(folder), config, range(2, 9), target, on_point=on_point)

    return _SWEEPS.get(_folder_first(fingerprint, folder, config_json, target), folder, compute)


def operator_mode() -> bool:
    return os.environ.get(OPERATOR_ENV, "").strip() == "1"


def prepare_for_class(fingerprint: str, folder: str, model: nn.Module, on_done: ItemDone) -> PreparedClass:
    """`python -m qcore prepare --tour --lessons` for the session's model, into this server's store, in
    one of the gate's slots."""
    if STORE is None:
        raise StoreFailed(f"this server has no result store to prepare into (set ${STORE_ENV})")
    with GATE.slot():
        return prepare_class(STORE, fingerprint, model, shared_data(folder), on_done=on_done)


def sensitivity(fingerprint: str, config_json: str, folder: str, model: nn.Module) -> list[Sensitivity]:
    def compute() -> list[Sensitivity]:
        accuracy = float_result(fingerprint, folder, model).accuracy
        with GATE.slot():
            return layer_sensitivity(model, shared_data(folder), QuantConfig.from_json(config_json), accuracy)

    return _SENSITIVITIES.get(_folder_first(fingerprint, folder, config_json), folder, compute)


def engine_results(
    fingerprint: str, config_json: str, folder: str, model: nn.Module, qat: QatCheckpoint | None = None
) -> list[EngineResult]:
    def compute() -> list[EngineResult]:
        qnet = report(fingerprint, config_json, folder, model, qat=qat).qnet
        with GATE.slot():
            return compare_engines(model, shared_data(folder), qnet)

    return _ENGINES.get(_folder_first(fingerprint, folder, config_json), folder, compute)


def exports(
    fingerprint: str,
    config_json: str,
    folder: str,
    model: nn.Module,
    qat: QatCheckpoint | None = None,
    imported: ImportedModel | None = None,
) -> tuple[bytes, bytes]:
    """(qtensors file, ONNX QDQ model) for this model and config; an imported model's ONNX export reads
    the file's own input (its layout, type and pixel convention, then its input step)."""
    step = input_step_of(imported)

    def compute() -> tuple[bytes, bytes]:
        qnet = report(fingerprint, config_json, folder, model, qat=qat).qnet
        with GATE.slot():
            return qtensors_bytes(IntegerNet(qnet)), export_onnx_for(qnet, shared_data(folder).spec, imported)

    return _EXPORTS.get(_folder_first(fingerprint, folder, config_json, repr(step)), folder, compute)


def diagnosis(
    fingerprint: str,
    config_json: str,
    folder: str,
    model: nn.Module,
    on_progress: Callable[[int, int, str], None] | None = None,
    on_row: Callable[[list[LayerDiagnosis]], None] | None = None,
) -> Diagnosis:
    """The diagnosis (about 20 evaluations; `on_progress` as they finish, `on_row` as each layer's row is)."""
    key = _folder_first(fingerprint, folder, config_json)
    found = _DIAGNOSES.cached(key, folder)
    if found is not None:
        return found  # type: ignore[return-value]
    float_accuracy = float_result(fingerprint, folder, model).accuracy  # its own turn, before the diagnosis's
    config = QuantConfig.from_json(config_json)

    def compute() -> Diagnosis:
        with GATE.slot():
            return diagnose(model, shared_data(folder), config, float_accuracy, on_progress, on_row=on_row)

    return _DIAGNOSES.get(key, folder, compute)


def auto(
    fingerprint: str,
    base_json: str,
    folder: str,
    settings: SearchSettings,
    model: nn.Module,
    on_point: Callable[[SearchPoint, SearchResult], None] | None = None,
) -> SearchResult:
    """The auto search from `base_json`'s calibration settings (`on_point` after each config measured).
    Its time budget starts when it gets a slot, not while it waits in line."""
    key = _folder_first(fingerprint, folder, base_json, json.dumps(settings.to_dict(), sort_keys=True))

    def compute() -> SearchResult:
        with GATE.slot():
            return auto_search(model, shared_data(folder), QuantConfig.from_json(base_json), settings, on_point)

    return _SEARCHES.get(key, folder, compute)


def folding_walk(
    fingerprint: str,
    config_json: str,
    folder: str,
    model: nn.Module,
    on_progress: Callable[[int, int, str], None] | None = None,
) -> FoldingWalk:
    config = QuantConfig.from_json(config_json)

    def compute() -> FoldingWalk:
        with GATE.slot():
            return folding_walkthrough(model, shared_data(folder), config, on_progress)

    return _FOLDING_WALKS.get(_folder_first(fingerprint, folder, config_json), folder, compute)


@st.cache_data(show_spinner=False, max_entries=16)
def folded_spreads_of(fingerprint: str, _model: nn.Module) -> list[FoldedLayer]:
    """Every folded layer's range spread (weights only: no data, no gate), per model."""
    return folded_spreads(_model)


def residual(fingerprint: str, config_json: str, folder: str, model: nn.Module) -> list[ResidualAdd]:
    def compute() -> list[ResidualAdd]:
        qnet = report(fingerprint, config_json, folder, model).qnet
        with GATE.slot():
            return residual_adds(qnet, shared_data(folder))

    return _RESIDUALS.get(_folder_first(fingerprint, folder, config_json), folder, compute)


def outliers(
    fingerprint: str, config_json: str, target: str, factor: float, folder: str, model: nn.Module
) -> list[OutlierRow]:
    def compute() -> list[OutlierRow]:
        with GATE.slot():
            return outlier_lesson(model, shared_data(folder), QuantConfig.from_json(config_json), target, factor)

    return _OUTLIERS.get(_folder_first(fingerprint, folder, config_json, target, factor), folder, compute)


def walk(
    fingerprint: str,
    config_json: str,
    image: int,
    positions_json: str,
    folder: str,
    model: nn.Module,
    qat: QatCheckpoint | None = None,
) -> Walk:
    def compute() -> Walk:
        positions = json.loads(positions_json)
        config = QuantConfig.from_json(config_json)
        trained = None if qat is None else qat.trained_for(config)
        with GATE.slot():
            return explain(model, shared_data(folder), config, image, positions, qnet=trained)

    return _WALKS.get(_folder_first(fingerprint, folder, config_json, image, positions_json), folder, compute)
