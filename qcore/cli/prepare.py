"""`prepare`: everything a class will ask of one zoo model, computed ahead into the server's result store.

A teacher's 50 minutes are not spent waiting: the guided tour's steps (its one-layer-at-a-time measurement
and every step's report, AdaRound's included), the lessons at the default settings, and the diagnoses
named are computed here, each stored under the key the app looks it up by (qcore.store.result_key, with
the same kinds and arguments as ui.cache), so that a session asking for one reads it instead of computing
it. What is already stored is not computed again: `prepare` can be run again after a restart or an update
(a new code version keys new results).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from qcore.analysis.diagnose import diagnose
from qcore.analysis.tables import build_report, layer_sensitivity
from qcore.cli.common import UsageError, add_common, dataset_of
from qcore.data import Dataset
from qcore.graph import OpKind, model_graph
from qcore.inference.evaluate import EvalResult, evaluate
from qcore.lessons.failures import folding_walkthrough, residual_adds
from qcore.lessons.steps import OUTLIER_DEFAULT_FACTOR, OUTLIER_TARGETS, outlier_lesson
from qcore.lessons.tour import TOUR_STEPS, sensitivity_config, step_config, tour_for
from qcore.lessons.walk import explain
from qcore.models.checkpoint import bundled_identity, load_model
from qcore.quantize.config import QuantConfig
from qcore.store import STORE_ENV, ResultStore, StoreConfigError, checked_store_folder, result_key, store_size_bytes

# The One image walk's settings as its page opens: the first test image, each layer's largest output
WALK_IMAGE = 0
WALK_POSITIONS = json.dumps({}, sort_keys=True)
BITS_LABEL = re.compile(r"W([2-8])A([2-8])")


def add_prepare(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser(
        "prepare",
        help="compute what a class will ask of a zoo model (the tour, the lessons, diagnoses) into the "
        "server's result store, ahead of the class",
    )
    add_common(command)
    command.add_argument(
        "--store",
        help=f"the result store's folder, as deploy/serve's --store (default: ${STORE_ENV})",
    )
    command.add_argument("--tour", action="store_true", help="the guided tour's steps")
    command.add_argument("--lessons", action="store_true", help="the lessons at the default settings")
    command.add_argument(
        "--diagnose",
        type=diagnose_configs,
        default=[],
        metavar="CONFIGS",
        help="diagnoses at these bit-widths, comma-separated, each W<weight bits>A<activation bits> with the "
        "other settings at their defaults (for example W4A4,W2A8)",
    )
    command.set_defaults(run=cmd_prepare)


def diagnose_configs(text: str) -> list[QuantConfig]:
    """'W4A4,W2A8' as configs; any other text is refused in one line."""
    configs = []
    for label in text.split(","):
        match = BITS_LABEL.fullmatch(label.strip())
        if match is None:
            raise argparse.ArgumentTypeError(
                f"{label.strip()[:20]!r} is not W<2-8>A<2-8> (a comma-separated list like W4A4,W2A8)"
            )
        configs.append(QuantConfig(weight_bits=int(match[1]), act_bits=int(match[2])))
    return configs


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

    def get(self, item: Item, total: int, show: bool) -> object:
        key = self.key(item.kind, *item.rest)
        started = time.monotonic()
        found = self.store.get(key)
        stored_before = found is not None
        result = found if stored_before else self.store.compute(key, item.compute)
        if self.store.problem or not self.store.has(key):  # the store computes without itself when it fails
            raise UsageError(f"prepare: {self.store.problem or 'the result store did not keep ' + item.label}")
        self.results[key] = result
        seconds = time.monotonic() - started
        self.log.append({"what": item.label, "kind": item.kind, "stored_before": stored_before, "seconds": seconds})
        if show:
            done = "already in the store" if stored_before else f"computed in {seconds:.1f} s"
            print(f"[{len(self.log)}/{total}] {item.label}: {done}", file=sys.stderr)
        return result

    def float_result(self) -> Item:
        return Item("the float model's accuracy", "float", (), lambda: evaluate(self.model, self.data.test))

    def report(self, config: QuantConfig, label: str) -> Item:
        return Item(
            label, "report", (config.to_json(),), lambda: build_report(self.model, self.data, config, self.reference)
        )


def _lesson_items(preparation: Preparation) -> list[Item]:
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


def cmd_prepare(args: argparse.Namespace) -> dict[str, object]:
    folder = args.store or os.environ.get(STORE_ENV, "").strip()
    if not folder:
        raise UsageError(f"prepare: name the server's result store with --store or ${STORE_ENV}")
    try:
        store = ResultStore(checked_store_folder(folder, "--store"), store_size_bytes())
    except StoreConfigError as error:
        raise UsageError(f"prepare: {error}") from None
    tour, lessons = args.tour, args.lessons
    if not (tour or lessons or args.diagnose):
        tour = lessons = True  # nothing named: what a class follows
    data = dataset_of(args)
    model = load_model(None, args.model)
    preparation = Preparation(store, bundled_identity(args.model, model), model, data)
    lesson_items = _lesson_items(preparation) if lessons else []
    # counted ahead, so that progress says how far along it is: float, the tour's measurement and its
    # seven steps, the lessons' results, each diagnosis
    total = 1 + (1 + TOUR_STEPS if tour else 0) + len(lesson_items) + len(args.diagnose)
    show = not args.json
    started = time.monotonic()
    reference: EvalResult = preparation.get(preparation.float_result(), total, show)  # type: ignore[assignment]
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
            show,
        )
        for index, step in enumerate(tour_for({row.layer: row.drop for row in drops})):  # type: ignore[attr-defined]
            preparation.get(preparation.report(step_config(step), f"tour step {index + 1}: {step.title}"), total, show)
    for item in lesson_items:
        preparation.get(item, total, show)
    for config in args.diagnose:
        item = Item(
            f"diagnosis at {config.bits_label}",
            "diagnosis",
            (config.to_json(),),
            lambda config=config: diagnose(model, data, config, reference.accuracy),
        )
        preparation.get(item, total, show)
    seconds = time.monotonic() - started
    computed = sum(1 for entry in preparation.log if not entry["stored_before"])
    if show:
        print(
            f"prepared {args.model}: {len(preparation.log)} results in the store ({computed} computed now) "
            f"in {seconds:.0f} s"
        )
    return {"model": args.model, "identity": preparation.identity, "results": preparation.log, "seconds": seconds}
