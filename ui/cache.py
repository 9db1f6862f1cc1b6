"""Caching rules: st.cache_resource only for read-only shared data (MNIST, the bundled net);
results are st.cache_data keyed by (model fingerprint, QuantConfig JSON, data folder) with
max_entries, so sessions share results only for identical weights."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TypeVar

import streamlit as st
from streamlit.delta_generator import DeltaGenerator
from streamlit.runtime import Runtime
from streamlit.runtime.scriptrunner import get_script_run_ctx
from torch import nn

from qcore.analysis.diagnose import Diagnosis, diagnose
from qcore.analysis.tables import Report, Sensitivity, SweepPoint, bit_sweep, build_report, layer_sensitivity
from qcore.cancel import Cancelled
from qcore.config import QuantConfig
from qcore.data import Dataset, data_dir, load_dataset, with_input_scale
from qcore.export.formats import export_onnx, qtensors_bytes
from qcore.inference.deploy import EngineResult, compare_engines
from qcore.inference.evaluate import EvalResult, evaluate
from qcore.inference.integer import IntegerNet
from qcore.lessons.failures import (
    FoldedLayer,
    FoldingWalk,
    ResidualAdd,
    folded_spreads,
    folding_walkthrough,
    residual_adds,
)
from qcore.lessons.steps import OutlierRow, outlier_lesson
from qcore.lessons.walk import Walk, explain
from qcore.models.checkpoint import load_model
from qcore.models.onnx_import import ImportedModel, import_onnx
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


RAW_SUFFIX = "|raw"


def data_source(dataset: str, folder: str, input_scale: str = "normalized") -> str:
    """The one string that names a dataset, where it is read from and how a model reads it (an imported
    model may take raw pixels): every cached result is keyed by it (so two datasets, or one seen two ways,
    never share a result), and shared_data reads it back."""
    return f"{dataset}|{folder}" + (RAW_SUFFIX if input_scale == "raw" else "")


@st.cache_resource(show_spinner="Loading the dataset into memory…")
def shared_data(source: str) -> Dataset:
    raw = source.endswith(RAW_SUFFIX)
    dataset, folder = source.removesuffix(RAW_SUFFIX).split("|", 1)
    return with_input_scale(load_dataset(dataset, folder), "raw" if raw else "normalized")


def imported_model(content: bytes, dataset: str, input_scale: str) -> ImportedModel:
    """A user's ONNX file imported and checked against ONNX Runtime on `dataset` (about 1 to 3 s), in the
    gate's line like every other computation; raises OnnxImportError (a CheckpointError) or DataError."""
    source = data_source(dataset, str(data_dir().resolve()), input_scale)
    key = ("onnx import", hashlib.sha256(content).hexdigest(), source)
    with st.spinner("Importing the model and checking it against ONNX Runtime on 1,000 test images…"):
        return _in_turn(key, lambda: import_onnx(content, shared_data(source), input_scale))


@st.cache_resource(show_spinner=False)
def bundled_model(zoo: str) -> nn.Module:
    """Shared by every session: never trained, mutated or hooked in place (qcore copies before hooks)."""
    return load_model(None, zoo)


@st.cache_data(max_entries=16, show_spinner="Evaluating the float model…")
def _float_result(fingerprint: str, folder: str, _model: nn.Module) -> EvalResult:
    with GATE.slot():
        return evaluate(_model, shared_data(folder).test)


@st.cache_data(max_entries=48, show_spinner="Calibrating and evaluating the quantized model…")
def _report(
    fingerprint: str, config_json: str, folder: str, _model: nn.Module, _qat: QatCheckpoint | None = None
) -> Report:
    """A QAT model (its fingerprint differs from its float weights') is reported with its own grid when
    the config is the one it was trained for; any other config calibrates its float weights."""
    config = QuantConfig.from_json(config_json)
    reference = float_result(fingerprint, folder, _model)
    trained = None if _qat is None else _qat.trained_for(config)
    with GATE.slot():
        return build_report(_model, shared_data(folder), config, reference, qnet=trained)


@st.cache_data(max_entries=16, show_spinner="Sweeping bit-widths (seven calibrations and evaluations)…")
def _sweep(fingerprint: str, config_json: str, target: str, folder: str, _model: nn.Module) -> list[SweepPoint]:
    with GATE.slot():
        return bit_sweep(_model, shared_data(folder), QuantConfig.from_json(config_json), range(2, 9), target)


@st.cache_data(max_entries=16, show_spinner="Quantizing one layer at a time…")
def _sensitivity(fingerprint: str, config_json: str, folder: str, _model: nn.Module) -> list[Sensitivity]:
    accuracy = float_result(fingerprint, folder, _model).accuracy
    with GATE.slot():
        return layer_sensitivity(_model, shared_data(folder), QuantConfig.from_json(config_json), accuracy)


@st.cache_data(max_entries=8, show_spinner="Running every inference path over the test set…")
def _engine_results(
    fingerprint: str, config_json: str, folder: str, _model: nn.Module, _qat: QatCheckpoint | None = None
) -> list[EngineResult]:
    data = shared_data(folder)
    qnet = report(fingerprint, config_json, folder, _model, qat=_qat).qnet
    with GATE.slot():
        return compare_engines(_model, data, qnet)


@st.cache_data(max_entries=8, show_spinner="Building the exports…")
def _exports(
    fingerprint: str, config_json: str, folder: str, _model: nn.Module, _qat: QatCheckpoint | None = None
) -> tuple[bytes, bytes]:
    """(qtensors file, ONNX QDQ model) for this model and config."""
    qnet = report(fingerprint, config_json, folder, _model, qat=_qat).qnet
    with GATE.slot():
        return qtensors_bytes(IntegerNet(qnet)), export_onnx(qnet, shared_data(folder).spec)


# A diagnosis (~20 evaluations) and the folding walk-through (~12) report progress as they go, which
# st.cache_data cannot pass through; so each has its own bounded cache, keyed like the others (the result
# depends only on the weights, the config and the data), shared by every session.
class _ProgressCache:
    def __init__(self, kind: str, limit: int = 16) -> None:
        self.kind, self.limit = kind, limit
        self.results: OrderedDict[tuple[str, ...], object] = OrderedDict()
        self.lock = threading.Lock()

    def cached(self, key: tuple[str, ...]) -> object | None:
        with self.lock:
            found = self.results.get(key)
            if found is not None:
                self.results.move_to_end(key)
            return found

    def get(self, key: tuple[str, ...], compute: Callable[[], Result]) -> Result:
        found = self.cached(key)
        if found is not None:
            return found  # type: ignore[return-value]

        def once() -> Result:
            # The gate's turn runs one computation per key: sessions asking for the same one while it runs
            # wait for it, count as its requesters (it stops only when they all leave), and read it here.
            found = self.cached(key)
            if found is not None:
                return found  # type: ignore[return-value]
            with GATE.slot():
                result = compute()
            with self.lock:
                self.results[key] = result
                while len(self.results) > self.limit:
                    self.results.popitem(last=False)
            return result

        return _in_turn((self.kind, *key), once)


_DIAGNOSES = _ProgressCache("diagnosis")
_FOLDING_WALKS = _ProgressCache("folding", limit=8)


def diagnosis(
    fingerprint: str,
    config_json: str,
    folder: str,
    model: nn.Module,
    on_progress: Callable[[int, int, str], None] | None = None,
) -> Diagnosis:
    key = (fingerprint, config_json, folder)
    found = _DIAGNOSES.cached(key)
    if found is not None:
        return found  # type: ignore[return-value]
    float_accuracy = float_result(fingerprint, folder, model).accuracy  # its own turn, before the diagnosis's
    config = QuantConfig.from_json(config_json)
    return _DIAGNOSES.get(key, lambda: diagnose(model, shared_data(folder), config, float_accuracy, on_progress))


def folding_walk(
    fingerprint: str,
    config_json: str,
    folder: str,
    model: nn.Module,
    on_progress: Callable[[int, int, str], None] | None = None,
) -> FoldingWalk:
    config = QuantConfig.from_json(config_json)
    return _FOLDING_WALKS.get(
        (fingerprint, config_json, folder), lambda: folding_walkthrough(model, shared_data(folder), config, on_progress)
    )


@st.cache_data(max_entries=16, show_spinner="Measuring every residual add…")
def _residual(fingerprint: str, config_json: str, folder: str, _model: nn.Module) -> list[ResidualAdd]:
    qnet = report(fingerprint, config_json, folder, _model).qnet
    with GATE.slot():
        return residual_adds(qnet, shared_data(folder))


@st.cache_data(show_spinner=False, max_entries=16)
def folded_spreads_of(fingerprint: str, _model: nn.Module) -> list[FoldedLayer]:
    """Every folded layer's range spread (weights only: no data, no gate), per model."""
    return folded_spreads(_model)


def residual(fingerprint: str, config_json: str, folder: str, model: nn.Module) -> list[ResidualAdd]:
    key = ("residual", fingerprint, config_json, folder)
    return _in_turn(key, lambda: _residual(fingerprint, config_json, folder, model))


@st.cache_data(max_entries=16, show_spinner=False)
def _outliers(
    fingerprint: str, config_json: str, target: str, factor: float, folder: str, _model: nn.Module
) -> list[OutlierRow]:
    with GATE.slot():
        return outlier_lesson(_model, shared_data(folder), QuantConfig.from_json(config_json), target, factor)


@st.cache_data(max_entries=32, show_spinner="Running the image through the integer engine…")
def _walk(
    fingerprint: str,
    config_json: str,
    image: int,
    positions_json: str,
    folder: str,
    _model: nn.Module,
    _qat: QatCheckpoint | None = None,
) -> Walk:
    positions = json.loads(positions_json)
    config = QuantConfig.from_json(config_json)
    trained = None if _qat is None else _qat.trained_for(config)
    with GATE.slot():
        return explain(_model, shared_data(folder), config, image, positions, qnet=trained)


# --- what pages call: each computation waits its turn in the gate; answers from the cache do not ---


def float_result(fingerprint: str, folder: str, model: nn.Module) -> EvalResult:
    return _in_turn(("float", fingerprint, folder), lambda: _float_result(fingerprint, folder, model))


def report(
    fingerprint: str,
    config_json: str,
    folder: str,
    model: nn.Module,
    where: DeltaGenerator | None = None,
    qat: QatCheckpoint | None = None,
) -> Report:
    key = ("report", fingerprint, config_json, folder)
    return _in_turn(key, lambda: _report(fingerprint, config_json, folder, model, qat), where)


def sweep(fingerprint: str, config_json: str, target: str, folder: str, model: nn.Module) -> list[SweepPoint]:
    key = ("sweep", fingerprint, config_json, target, folder)
    return _in_turn(key, lambda: _sweep(fingerprint, config_json, target, folder, model))


def sensitivity(fingerprint: str, config_json: str, folder: str, model: nn.Module) -> list[Sensitivity]:
    key = ("sensitivity", fingerprint, config_json, folder)
    return _in_turn(key, lambda: _sensitivity(fingerprint, config_json, folder, model))


def engine_results(
    fingerprint: str, config_json: str, folder: str, model: nn.Module, qat: QatCheckpoint | None = None
) -> list[EngineResult]:
    key = ("engines", fingerprint, config_json, folder)
    return _in_turn(key, lambda: _engine_results(fingerprint, config_json, folder, model, qat))


def exports(
    fingerprint: str, config_json: str, folder: str, model: nn.Module, qat: QatCheckpoint | None = None
) -> tuple[bytes, bytes]:
    key = ("exports", fingerprint, config_json, folder)
    return _in_turn(key, lambda: _exports(fingerprint, config_json, folder, model, qat))


def outliers(
    fingerprint: str, config_json: str, target: str, factor: float, folder: str, model: nn.Module
) -> list[OutlierRow]:
    key = ("outliers", fingerprint, config_json, target, factor, folder)
    return _in_turn(key, lambda: _outliers(fingerprint, config_json, target, factor, folder, model))


def walk(
    fingerprint: str,
    config_json: str,
    image: int,
    positions_json: str,
    folder: str,
    model: nn.Module,
    qat: QatCheckpoint | None = None,
) -> Walk:
    key = ("walk", fingerprint, config_json, image, positions_json, folder)
    return _in_turn(key, lambda: _walk(fingerprint, config_json, image, positions_json, folder, model, qat))
