"""A class prepared in advance: everything a class will ask of one model (the guided tour's steps, the
lessons at their default settings, diagnoses) computed ahead into the server's result store.

A teacher's 50 minutes are not spent waiting: each result is stored under the key the app looks it up by
(qcore.store.result_key, with the same kinds and arguments as ui.cache), so that a session asking for one
reads it instead of computing it. What is already stored is not computed again: preparing again after a
restart or an update costs only what is new (a new code version keys new results). `python -m qcore
prepare` and the tour page's operator button both run `prepare_class`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

from qcore.analysis.diagnose import diagnose
from qcore.analysis.tables import build_report, layer_sensitivity
from qcore.data import Dataset
from qcore.graph import OpKind, model_graph
from qcore.inference.evaluate import EvalResult, evaluate
from qcore.lessons.failures import folding_walkthrough, residual_adds
from qcore.lessons.steps import OUTLIER_DEFAULT_FACTOR, OUTLIER_TARGETS, outlier_lesson
from qcore.lessons.tour import TOUR_STEPS, sensitivity_config, step_config, tour_for
from qcore.lessons.walk import explain
from qcore.quantize.config import QuantConfig
from qcore.store import ResultStore, result_key

# The One image walk's settings as its page opens: the first test image, each layer's largest output
WALK_IMAGE = 0
WALK_POSITIONS = json.dumps({}, sort_keys=True)


class StoreFailed(RuntimeError):
    """The store stopped keeping results: preparing into it would fool the class."""


# Called after each result: (done, total, what, stored before, seconds)
ItemDone = Callable[[int, int, str, bool, float], None]


@dataclass(frozen=True)
class Item:
    """One result to store: what a person would call it, its key's kind and arguments, how to compute it."""

    label: str
    kind: str
    rest: tuple[object, ...]
    compute: Callable[[], object]


class Preparation:
    """The results of one model on one dataset, each read from the store or computed into it once."""

    def __init__(self, store: ResultStore, identity: str, model: nn.Module, data: Dataset) -> None:
        self.store, self.identity, self.model, self.data = store, identity, model, data
        self.log: list[dict[str, object]] = []
        self.results: dict[str, object] = {}  # by key: what this run got, for the items that build on it
        self.reference: EvalResult | None = None  # the float model's, which every report is read against

    def key(self, kind: str, *rest: object) -> str:
        return result_key(kind, self.identity, self.data.content_id, *rest)

    def get(self, item: Item, total: int, on_done: ItemDone | None = None) -> object:
        key = self.key(item.kind, *item.rest)
        started = time.monotonic()
        found = self.store.get(key)
        stored_before = found is not None
        result = found if stored_before else self.store.compute(key, item.compute)
        if self.store.problem or not self.store.has(key):  # the store computes without itself when it fails
            raise StoreFailed(self.store.problem or f"the result store did not keep {item.label}")
        self.results[key] = result
        seconds = time.monotonic() - started
        self.log.append({"what": item.label, "kind": item.kind, "stored_before": stored_before, "seconds": seconds})
        if on_done is not None:
            on_done(len(self.log), total, item.label, stored_before, seconds)
        return result

    def float_result(self) -> Item:
        return Item("the float model's accuracy", "float", (), lambda: evaluate(self.model, self.data.test))

    def report(self, config: QuantConfig, label: str) -> Item:
        return Item(
            label, "report", (config.to_json(),), lambda: build_report(self.model, self.data, config, self.reference)
        )


def lesson_items(preparation: Preparation) -> list[Item]:
    """What the lesson pages compute at the default settings on this model: its report, the Outliers
    lesson at both targets, the folding walk and the residual adds where the model has folded BatchNorm
    or adds (elsewhere those pages say so and stop), and the One image walk."""
    model, data, default = preparation.model, preparation.data, QuantConfig()
    config_json = default.to_json()
    graph = model_graph(model)
    report = preparation.report(default, "the default settings' report")
    items = [
        report,
        *(
            Item(
                f"Outliers lesson ({target})",
                "outliers",
                (config_json, target, OUTLIER_DEFAULT_FACTOR),
                lambda target=target: outlier_lesson(model, data, default, target, OUTLIER_DEFAULT_FACTOR),
            )
            for target in OUTLIER_TARGETS
        ),
    ]
    if graph.folded_batchnorm:
        walk = lambda: folding_walkthrough(model, data, default)  # noqa: E731
        items.append(Item("BatchNorm folding lesson", "folding", (config_json,), walk))
    if any(op.kind is OpKind.ADD for op in graph.ops):

        def residual() -> object:  # on the report's quantized net, as the page does: got by the first item
            got = preparation.results[preparation.key(report.kind, *report.rest)]
            return residual_adds(got.qnet, data)  # type: ignore[attr-defined]

        items.append(Item("Residual adds lesson", "residual", (config_json,), residual))
    items.append(
        Item(
            "One image on integers lesson",
            "walk",
            (config_json, WALK_IMAGE, WALK_POSITIONS),
            lambda: explain(model, data, default, WALK_IMAGE, json.loads(WALK_POSITIONS)),
        )
    )
    return items


@dataclass
class PreparedClass:
    """What `prepare_class` did: one entry per result (what, kind, stored before, seconds)."""

    log: list[dict[str, object]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def computed(self) -> int:
        return sum(1 for entry in self.log if not entry["stored_before"])


def prepare_class(
    store: ResultStore,
    identity: str,
    model: nn.Module,
    data: Dataset,
    tour: bool = True,
    lessons: bool = True,
    diagnoses: Sequence[QuantConfig] = (),
    on_done: ItemDone | None = None,
) -> PreparedClass:
    """The float result, the tour's measurement and steps, the lessons' results and each diagnosis of the
    model known to the app as `identity`, read from `store` or computed into it; raises StoreFailed when
    the store stops keeping them."""
    preparation = Preparation(store, identity, model, data)
    lessons_to_prepare = lesson_items(preparation) if lessons else []
    # counted ahead, so that progress says how far along it is: float, the tour's measurement and its
    # seven steps, the lessons' results, each diagnosis
    total = 1 + (1 + TOUR_STEPS if tour else 0) + len(lessons_to_prepare) + len(diagnoses)
    started = time.monotonic()
    reference: EvalResult = preparation.get(preparation.float_result(), total, on_done)  # type: ignore[assignment]
    preparation.reference = reference
    if tour:
        sensitivity = sensitivity_config()
        drops = preparation.get(
            Item(
                "the tour's one-layer-at-a-time measurement",
                "sensitivity",
                (sensitivity.to_json(),),
                lambda: layer_sensitivity(model, data, sensitivity, reference.accuracy),
            ),
            total,
            on_done,
        )
        for index, step in enumerate(tour_for({row.layer: row.drop for row in drops})):  # type: ignore[attr-defined]
            preparation.get(
                preparation.report(step_config(step), f"tour step {index + 1}: {step.title}"), total, on_done
            )
    for item in lessons_to_prepare:
        preparation.get(item, total, on_done)
    for config in diagnoses:
        item = Item(
            f"diagnosis at {config.bits_label}",
            "diagnosis",
            (config.to_json(),),
            lambda config=config: diagnose(model, data, config, reference.accuracy),
        )
        preparation.get(item, total, on_done)
    return PreparedClass(preparation.log, time.monotonic() - started)
