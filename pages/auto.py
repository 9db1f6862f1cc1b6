"""Auto: the smallest model within the accuracy you can afford to lose, searched live on a Pareto chart."""

import streamlit as st

from qcore.analysis.auto import (
    DEFAULT_BUDGET_S,
    DEFAULT_MAX_DROP,
    MAX_BUDGET_S,
    OBJECTIVE_TITLES,
    OBJECTIVES,
    VALIDATION_IMAGES,
    SearchResult,
    SearchSettings,
    search_base,
)
from qcore.figures import pareto_figure
from ui import cache, session
from ui.tables import table_with_csv

REQUEST_KEY = "auto_request"  # (model fingerprint, base config JSON, settings) of the search asked for
CHART_KEY = "auto_pareto"

session.require_navigation()  # first: a deep link on a fresh server may run this page alone
st.title("Auto: the smallest model within your accuracy budget")
st.markdown(
    "Say how much accuracy you can lose; the search measures configs the lab knows how to build (fewer "
    "bits everywhere, the first and last layers at 8, per-layer bits by sensitivity, other range rules, "
    "bias correction, equalization, AdaRound, the most harmful layers kept float) and keeps the smallest "
    f"within the budget. Each config is scored on {VALIDATION_IMAGES:,} **training** images that calibration "
    "never sees, so the test set never steers the choice; only the chosen config is then measured on the "
    "test set. Cheap configs come first and AdaRound last, so the best answer so far is there whenever the "
    "time runs out."
)
entry = session.current_model()
config = st.session_state[session.CONFIG_KEY]
session.mnist_or_stop()
if entry.qat_applies(config):
    st.info(
        "This is a QAT model on its trained grid. The search calibrates its own configs from the float "
        "weights, which would not be the trained model. Change any setting in the sidebar to search PTQ of "
        "its weights."
    )
    session.stop_page()

with st.form("auto_settings"):
    columns = st.columns(4)
    max_drop = columns[0].number_input(
        "Accuracy you can lose (points)", min_value=0.0, max_value=100.0, value=DEFAULT_MAX_DROP, step=0.1
    )
    objective = columns[1].radio(
        "Minimize", OBJECTIVES, format_func=lambda name: OBJECTIVE_TITLES[name], key="auto_objective"
    )
    budget_s = columns[2].number_input(
        "Time budget (s)", min_value=10.0, max_value=MAX_BUDGET_S, value=DEFAULT_BUDGET_S, step=10.0
    )
    integer_only = columns[3].checkbox(
        "Integer-only", help="Only configs an integer-only runtime can run: 8 bits or fewer everywhere, nothing float."
    )
    started = st.form_submit_button("Search", type="primary")
if started:
    settings = SearchSettings(float(max_drop), str(objective), bool(integer_only), float(budget_s))
    problems = settings.problems()
    if problems:
        for problem in problems:
            st.error(problem, icon=":material/error:")
        session.stop_page()
    # the search starts from the sidebar's calibration settings, kept for this search whatever is applied later
    st.session_state[REQUEST_KEY] = (entry.fingerprint, search_base(config).to_json(), settings)
request = st.session_state.get(REQUEST_KEY)
if request is None or request[0] != entry.fingerprint:
    st.caption(
        f"The calibration settings come from the sidebar ({config.calib_batches} batches of {config.batch_size}, "
        f"observer {config.observer}, weight range {config.weight_range}); the search chooses the rest."
    )
    session.stop_page()
_, base_json, settings = request


def figure(result: SearchResult):  # noqa: ANN201 - a plotly Figure
    points = result.points
    index = {id(p): i for i, p in enumerate(points)}
    chosen = result.chosen
    if settings.objective == "bytes":
        sizes, size_title = [p.weight_bytes for p in points], "weight bytes"
    else:
        sizes, size_title = [p.average_bits for p in points], "average bits (weights and activations)"
    return pareto_figure(
        [p.label for p in points],
        sizes,
        [p.validation_accuracy for p in points],
        [index[id(p)] for p in result.frontier],
        None if chosen is None else index[id(chosen)],
        result.target,
        result.float_validation_accuracy,
        size_title,
    )


live = st.empty()
status = st.empty()


def show_point(_point: object, result: SearchResult) -> None:
    status.info(
        f"Measured {len(result.points)} configs in {result.seconds or 0:.0f} s; searching (time budget "
        f"{settings.budget_s:.0f} s)…",
        icon=":material/timelapse:",
    )
    live.plotly_chart(figure(result), key=f"auto_live_{len(result.points)}")


try:
    result = cache.auto(entry.fingerprint, base_json, session.data_folder(), settings, entry.model, show_point)
except Exception as error:  # noqa: BLE001 - a model the search cannot quantize is explained, not a traceback
    session.show_compute_failure(error)
    session.stop_page()
live.empty()
status.empty()


def apply_clicked() -> None:
    """The chart's selection callback: runs before the sidebar is drawn again, so it may set its widgets."""
    selection = st.session_state.get(CHART_KEY)
    points = [] if selection is None else selection.selection.points
    picked = next((p.get("customdata") for p in points if isinstance(p.get("customdata"), int)), None)
    if picked is not None and 0 <= picked < len(result.points):
        session.apply_settings(result.points[picked].config.to_dict(), reset=True)


st.plotly_chart(figure(result), key=CHART_KEY, on_select=apply_clicked, selection_mode="points")
st.caption(
    f"{len(result.points)} configs measured in {result.seconds:.0f} s ({result.stopped_by}). Click a point "
    "to set the sidebar (and the link) to it."
)
chosen = result.chosen
columns = st.columns(3)
columns[0].metric("Float, validation", session.percent(result.float_validation_accuracy))
columns[1].metric("Budget: validation at least", session.percent(result.target))
if chosen is None:
    columns[2].metric("Chosen", "none within the budget")
    st.warning("No config measured is within the budget: allow a larger drop or more time.")
else:
    columns[2].metric(
        f"Chosen: weight bytes ({100 * chosen.weight_bytes / result.float_weight_bytes:.1f}% of float's)",
        f"{chosen.weight_bytes:,}",
    )
    st.subheader("The chosen config")
    session.plain_text(chosen.label)
    report = cache.report(entry.fingerprint, chosen.config.to_json(), session.data_folder(), entry.model)
    st.markdown(
        f"Test set: **{session.percent(report.quant_result.accuracy)}** quantized against "
        f"{session.percent(report.float_result.accuracy)} float "
        f"({100 * (report.quant_result.accuracy - report.float_result.accuracy):+.2f} points); on the validation "
        f"images: {session.percent(chosen.validation_accuracy)} against "
        f"{session.percent(result.float_validation_accuracy)} "
        f"({100 * (chosen.validation_accuracy - result.float_validation_accuracy):+.2f} points)."
    )
    st.button(
        "Apply the chosen config",
        on_click=session.apply_settings,
        args=(chosen.config.to_dict(), True),
        key="auto_apply_chosen",
        type="primary",
    )

table_with_csv(
    [
        {
            "config": p.label,
            "step": p.stage,
            "validation accuracy (%)": round(100 * p.validation_accuracy, 2),
            "within the budget": "yes" if result.within_budget(p) else "no",
            "weight bytes": p.weight_bytes,
            "average weight bits": round(p.average_weight_bits, 2),
            "average activation bits": round(p.average_activation_bits, 2),
            "seconds": round(p.seconds, 1),
        }
        for p in result.points
    ],
    "every config measured",
    "auto_search",
)
with st.expander("What each step of the search found"):
    for line in result.log:
        session.plain_text(line)
