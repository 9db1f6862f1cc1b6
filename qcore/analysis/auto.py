"""Auto: the smallest quantized model within the accuracy a user can lose, searched over what the lab
already knows how to do, every config measured for real.

Honest selection: every config is scored on a validation split of the training images that calibration
never sees (`validation_split`); the test set never steers the search, and only the configs reported at
the end (`measure_on_test`) are measured on it.

The order (docs/DESIGN.md, "Auto"): cheap single calibrations first, so that most of the space is ruled
out before an expensive method is spent.
1. uniform weight bits from 8 down (activations at the base config's bits), stopping at the first miss;
   with the "bits" objective, activation bits from 8 down too;
2. the first and last layers at 8 bits, the rest lower (LSQ's convention), from one bit below the best;
3. mixed precision: an average weight-bits budget from half a bit below the best, layer bits chosen by
   measured sensitivity (one sensitivity pass, remembered for every budget);
4. the near misses (the configs smaller than the best that missed by the least) with the other range
   rules, then with the cheap methods (bias correction, equalization), then AdaRound on the closest;
5. when float layers are allowed, the closest near miss with its most harmful layers kept float, ranked
   as NNCF's accuracy control ranks them (the accuracy each one's quantization costs on a subset).
A recipe that rescues a near miss is carried one bit further down. Each stage stops at the deadline: the
search is anytime, and a cut search reports the frontier of what it measured.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from qcore import cancel
from qcore.analysis.diagnose import variant
from qcore.data import Dataset, Split, calibration_indices
from qcore.graph import ModelGraph, OpKind, model_graph
from qcore.inference.evaluate import evaluate
from qcore.quantize.calibrate import OBSERVERS
from qcore.quantize.config import WEIGHT_RANGES, QuantConfig, integer_path_problems
from qcore.quantize.methods import equalization_pairs, parameter_counts
from qcore.quantize.qmodel import (
    QuantizedNet,
    calibration_data,
    config_plan,
    edge_layers,
    point_bits,
    quantize_model,
)
from qcore.quantize.quant import Granularity

OBJECTIVES = ("bytes", "bits")
OBJECTIVE_TITLES = {"bytes": "weight bytes", "bits": "average bits (weights and activations)"}
DEFAULT_MAX_DROP = 0.5  # points of accuracy below the float model's
DEFAULT_BUDGET_S = 120.0  # two minutes on this project's 2-core machine
MAX_BUDGET_S = 3600.0
MAX_POINTS = 200  # configs measured at most, whatever the time budget
VALIDATION_IMAGES = 5000
RANKING_IMAGES = 1000  # validation images that rank layers for float fallback (NNCF's subset is 300)
NEAR_MISSES = 2  # near misses that get the other range rules and the cheap methods
FLOAT_LAYERS_MAX = 3
LOWEST_BITS = 2
HIGHEST_BITS = 8  # the search never goes above: integer-only paths take at most 8
BUDGET_STEP = 0.5  # mixed precision's average-bits budgets, apart


@dataclass(frozen=True)
class SearchSettings:
    """What the user asks of the search; problems() says what is out of range, one line each."""

    max_drop: float = DEFAULT_MAX_DROP  # points
    objective: str = "bytes"
    integer_only: bool = False
    budget_s: float = DEFAULT_BUDGET_S
    max_points: int = MAX_POINTS

    def problems(self) -> list[str]:
        found = []
        if (
            not isinstance(self.max_drop, int | float)
            or not math.isfinite(self.max_drop)
            or not 0 <= self.max_drop <= 100
        ):
            found.append(f"the accuracy budget must be a number of points between 0 and 100 (got {self.max_drop!r})")
        if self.objective not in OBJECTIVES:
            found.append(f"the objective must be one of {', '.join(OBJECTIVES)} (got {self.objective!r})")
        if (
            not isinstance(self.budget_s, int | float)
            or not math.isfinite(self.budget_s)
            or not 0 < self.budget_s <= MAX_BUDGET_S
        ):
            found.append(
                f"the time budget must be more than 0 and at most {MAX_BUDGET_S:.0f} seconds (got {self.budget_s!r})"
            )
        if not isinstance(self.max_points, int) or not 1 <= self.max_points <= MAX_POINTS:
            found.append(f"the number of configs must be between 1 and {MAX_POINTS} (got {self.max_points!r})")
        return found

    def validate(self) -> SearchSettings:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def to_dict(self) -> dict[str, object]:
        return {
            "max_drop": self.max_drop,
            "objective": self.objective,
            "integer_only": self.integer_only,
            "budget_s": self.budget_s,
            "max_points": self.max_points,
        }


@dataclass(frozen=True)
class SearchPoint:
    """One config the search measured."""

    config: QuantConfig
    label: str  # what it is, in words
    stage: str  # which step of the search proposed it
    validation_accuracy: float
    weight_bytes: int  # conv and linear weights: bits/8 each, 4 bytes each for a float layer
    average_weight_bits: float  # parameter-weighted; a float layer counts 32
    average_activation_bits: float  # weighted by each quantized tensor's values per image; float counts 32
    seconds: float  # calibration and validation
    elapsed: float = 0.0  # seconds since the search started, when it was measured: when it was found

    @property
    def average_bits(self) -> float:
        return (self.average_weight_bits + self.average_activation_bits) / 2

    def objective(self, name: str) -> float:
        return float(self.weight_bytes) if name == "bytes" else self.average_bits

    def to_dict(self) -> dict[str, object]:
        return {
            "label": self.label,
            "stage": self.stage,
            "config": self.config.to_dict(),
            "validation_accuracy": self.validation_accuracy,
            "weight_bytes": self.weight_bytes,
            "average_weight_bits": self.average_weight_bits,
            "average_activation_bits": self.average_activation_bits,
            "seconds": self.seconds,
            "elapsed": self.elapsed,
        }


@dataclass
class SearchResult:
    settings: SearchSettings
    base: QuantConfig  # the calibration and range settings every config shares unless it says otherwise
    float_validation_accuracy: float
    validation_images: int
    float_weight_bytes: int
    points: list[SearchPoint] = field(default_factory=list)  # in the order measured
    stopped_by: str = "complete"  # "complete", "time budget" or "config limit"
    seconds: float = 0.0
    log: list[str] = field(default_factory=list)  # one line per stage: what it tried and found

    @property
    def target(self) -> float:
        """The lowest validation accuracy within the budget."""
        return self.float_validation_accuracy - self.settings.max_drop / 100

    def within_budget(self, point: SearchPoint) -> bool:
        return point.validation_accuracy >= self.target - 1e-12

    @property
    def chosen(self) -> SearchPoint | None:
        """The smallest config within the budget (ties: the more accurate, then the first measured)."""
        return choose(self.points, self.target, self.settings.objective)

    @property
    def frontier(self) -> list[SearchPoint]:
        return pareto_frontier(self.points, self.settings.objective)


def choose(points: Sequence[SearchPoint], target: float, objective: str) -> SearchPoint | None:
    passing = [p for p in points if p.validation_accuracy >= target - 1e-12]
    if not passing:
        return None
    return min(passing, key=lambda p: (p.objective(objective), -p.validation_accuracy))


def pareto_frontier(points: Sequence[SearchPoint], objective: str) -> list[SearchPoint]:
    """The points no other beats on both size and validation accuracy, smallest first (of equal points,
    the first measured)."""
    frontier: list[SearchPoint] = []
    for point in sorted(points, key=lambda p: (p.objective(objective), -p.validation_accuracy)):
        if not frontier or point.validation_accuracy > frontier[-1].validation_accuracy:
            frontier.append(point)
    return frontier


def validation_split(train: Split, config: QuantConfig, count: int = VALIDATION_IMAGES) -> Split:
    """The last `count` training images that the config's calibration sample does not hold: calibration,
    AdaRound, bias correction and mixed precision's sensitivities all read that sample only."""
    used = torch.zeros(len(train), dtype=torch.bool)
    used[calibration_indices(len(train), config.calib_batches, config.batch_size, config.seed)] = True
    free = torch.nonzero(~used).flatten()
    if len(free) < count:
        raise ValueError(
            f"the calibration sample leaves {len(free)} training images for validation; the search needs {count}"
        )
    chosen = free[-count:]
    return Split(train.images[chosen], train.labels[chosen], f"{train.content_hash}[validation {count}]")


def search_base(config: QuantConfig) -> QuantConfig:
    """The user's config with every setting the search chooses back at its start: the calibration (images,
    batches, seed, observer) and weight rules stay the user's."""
    return replace(
        config,
        weight_bits=min(config.weight_bits, HIGHEST_BITS),
        act_bits=min(config.act_bits, HIGHEST_BITS),
        quantize_input=True,
        float_layers=(),
        methods=(),
        weight_bits_budget=0.0,
        edge_bits=0,
        add_bits=0,
    )


def describe(config: QuantConfig, base: QuantConfig) -> str:
    """A config in words, saying what differs from the base."""
    if config.weight_bits_budget:
        text = f"mixed weights, {config.weight_bits_budget:g} bits on average, A{config.act_bits}"
    else:
        text = config.bits_label
    for name, title in (("observer", "observer"), ("weight_range", "weight range"), ("granularity", "weights")):
        if getattr(config, name) != getattr(base, name):
            text += f", {title} {getattr(config, name)}"
    if config.methods:
        text += ", + " + " + ".join(config.methods)
    if config.float_layers:
        text += ", float: " + ", ".join(config.float_layers)
    return text


def model_sizes(qnet: QuantizedNet, graph: ModelGraph) -> tuple[int, float, float]:
    """Weight bytes, average weight bits and average activation bits of a quantized model (see SearchPoint)."""
    counts = parameter_counts(graph)
    weight_bits = {
        n: (q.weight_bits if q.weight_qparams is not None and q.weight_bits else 32) for n, q in qnet.layers.items()
    }
    total_bits = sum(counts[n] * b for n, b in weight_bits.items())
    values = {op.name: math.prod(op.shape[1:]) for op in graph.ops}
    bits = point_bits(graph, qnet.plan, qnet.config)
    quantized_values = sum(values[name] for name in bits)
    # a layer input left float (a float layer's) counts at 32 bits
    float_inputs = sum(
        values[source] for name, source in _layer_sources(graph).items() if qnet.layers[name].input_qparams is None
    )
    activation_bits = sum(values[name] * b for name, b in bits.items()) + 32 * float_inputs
    return (
        math.ceil(total_bits / 8),
        total_bits / sum(counts.values()),
        activation_bits / max(1, quantized_values + float_inputs),
    )


def _layer_sources(graph: ModelGraph) -> dict[str, str]:
    return {name: graph.op(name).inputs[0] for name in graph.layers}


Progress = Callable[[SearchPoint, SearchResult], None]


class _Stop(Exception):
    """The search is over (its time or config budget is spent)."""


class _Search:
    def __init__(
        self,
        model: nn.Module,
        data: Dataset,
        config: QuantConfig,
        settings: SearchSettings,
        on_point: Progress | None,
    ) -> None:
        self.model, self.settings, self.on_point = model, settings.validate(), on_point
        self.graph = model_graph(model)
        self.base = search_base(config).validate(self.graph.layers)
        normalizations = [op.name for op in self.graph.ops if op.kind is OpKind.NORMALIZE]
        if settings.integer_only and normalizations:
            raise ValueError(
                "no config of this model runs integer-only: it normalizes by each sample's own statistics, in "
                f"float ({', '.join(normalizations[:3])})"
            )
        plan = config_plan(self.graph, self.base)
        self.has_adds = any(point not in plan.layer_input.values() for point in plan.points)
        self.batches = calibration_data(data.train, self.base)
        self.validation = validation_split(data.train, self.base)
        self.started = time.monotonic()
        self.deadline = self.started + settings.budget_s
        counts = parameter_counts(self.graph)
        self.result = SearchResult(
            settings,
            self.base,
            evaluate(model, self.validation).accuracy,
            len(self.validation),
            4 * sum(counts.values()),
        )
        self.by_config: dict[str, SearchPoint] = {}

    # --- measuring -------------------------------------------------------------------------------

    def measure(self, config: QuantConfig, stage: str) -> SearchPoint | None:
        """The point for `config` (measured once); None when it is not a config this search may pick."""
        key = config.to_json()
        if key in self.by_config:
            return self.by_config[key]
        if self.settings.integer_only and integer_path_problems(config):
            return None
        if len(self.result.points) >= self.settings.max_points:
            self.result.stopped_by = "config limit"
            raise _Stop
        if time.monotonic() >= self.deadline:
            self.result.stopped_by = "time budget"
            raise _Stop
        started = time.monotonic()
        try:
            with cancel.until(self.deadline):
                qnet = quantize_model(self.model, config, self.batches)
                accuracy = evaluate(qnet, self.validation).accuracy
        except cancel.DeadlinePassed:
            self.result.stopped_by = "time budget"
            raise _Stop from None
        sizes = model_sizes(qnet, self.graph)
        now = time.monotonic()
        point = SearchPoint(
            config, describe(config, self.base), stage, accuracy, *sizes, now - started, now - self.started
        )
        self.by_config[key] = point
        self.result.points.append(point)
        self.result.seconds = time.monotonic() - self.started
        if self.on_point is not None:
            self.on_point(point, self.result)
        return point

    def passes(self, point: SearchPoint | None) -> bool:
        return point is not None and self.result.within_budget(point)

    def best(self) -> SearchPoint | None:
        return self.result.chosen

    def best_size(self) -> float:
        best = self.best()
        return math.inf if best is None else best.objective(self.settings.objective)

    def near_misses(self, count: int) -> list[SearchPoint]:
        """The measured configs smaller than the best that missed the budget by the least."""
        smaller = [
            p
            for p in self.result.points
            if not self.passes(p)
            and p.objective(self.settings.objective) < self.best_size()
            and not p.config.float_layers
        ]
        return sorted(smaller, key=lambda p: -p.validation_accuracy)[:count]

    def log(self, text: str) -> None:
        self.result.log.append(text)

    # --- the stages --------------------------------------------------------------------------------

    def descend(self, configs: Sequence[QuantConfig], stage: str) -> SearchPoint | None:
        """Measure `configs` (largest first) until one misses; the last that passed."""
        passed = None
        for config in configs:
            point = self.measure(config, stage)
            if point is None:
                continue
            if not self.passes(point):
                break
            passed = point
        return passed

    def uniform(self) -> None:
        base = self.base
        weights = [replace(base, weight_bits=b) for b in range(HIGHEST_BITS, LOWEST_BITS - 1, -1)]
        found = self.descend(weights, "uniform bits")
        self.log(f"uniform bits: lowest weight bits within the budget {found.config.weight_bits if found else 'none'}")
        if self.settings.objective == "bits":
            w = found.config.weight_bits if found else HIGHEST_BITS
            acts = [replace(base, weight_bits=w, act_bits=b) for b in range(base.act_bits, LOWEST_BITS - 1, -1)]
            found_a = self.descend(acts, "uniform bits")
            self.log(
                f"activation bits at W{w}: lowest within the budget {found_a.config.act_bits if found_a else 'none'}"
            )

    def lowest_uniform_weight_bits(self) -> int:
        passing = [p.config.weight_bits for p in self.result.points if self.passes(p) and p.stage == "uniform bits"]
        return min(passing, default=HIGHEST_BITS + 1)

    def edges(self) -> None:
        if len(edge_layers(self.graph)) >= len(self.graph.layers):
            self.log("first and last layers at 8: skipped (they are all the layers)")
            return
        start = self.lowest_uniform_weight_bits() - 1
        configs = [replace(self.base, weight_bits=b, edge_bits=HIGHEST_BITS) for b in range(start, LOWEST_BITS - 1, -1)]
        found = self.descend(configs, "first and last at 8")
        if self.settings.objective == "bits" and found is not None:
            add = HIGHEST_BITS if self.has_adds else 0
            acts = [
                replace(found.config, act_bits=b, add_bits=add)
                for b in range(found.config.act_bits - 1, LOWEST_BITS - 1, -1)
            ]
            self.descend(acts, "first and last at 8")
        self.log(
            f"first and last layers at 8: lowest other weight bits {found.config.weight_bits if found else 'none'}"
        )

    def mixed(self) -> None:
        if len(self.graph.layers) < 2:
            return
        top = min(self.lowest_uniform_weight_bits(), HIGHEST_BITS)
        budgets = []
        budget = top - BUDGET_STEP
        while budget >= LOWEST_BITS:
            budgets.append(budget)
            budget -= BUDGET_STEP
        configs = [replace(self.base, weight_bits=math.ceil(b), weight_bits_budget=b) for b in budgets]
        found = self.descend(configs, "mixed precision")
        self.log(f"mixed precision: lowest average budget {found.config.weight_bits_budget if found else 'none'}")

    def next_smaller(self, config: QuantConfig) -> QuantConfig | None:
        """The same recipe one step smaller (one weight bit, or half a bit of mixed budget)."""
        if config.weight_bits_budget:
            lower = config.weight_bits_budget - BUDGET_STEP
            return (
                replace(config, weight_bits_budget=lower, weight_bits=math.ceil(lower))
                if lower >= LOWEST_BITS
                else None
            )
        if config.weight_bits > LOWEST_BITS:
            return replace(config, weight_bits=config.weight_bits - 1)
        return None

    def rescue(self, stage: str, variants: Callable[[QuantConfig], list[QuantConfig]], count: int) -> None:
        """Try `variants` of the `count` closest near misses; a rescue is carried down while it holds."""
        rescued = []
        for miss in self.near_misses(count):
            for config in variants(miss.config):
                point = self.measure(config, stage)
                if self.passes(point):
                    rescued.append(point)
                    smaller = self.next_smaller(config)
                    while smaller is not None:
                        lower = self.measure(smaller, stage)
                        if not self.passes(lower):
                            break
                        smaller = self.next_smaller(smaller)
                    break  # this near miss is rescued: its other variants are no smaller
        self.log(f"{stage}: rescued {', '.join(p.label for p in rescued) or 'none of the near misses'}")

    def range_variants(self, config: QuantConfig) -> list[QuantConfig]:
        found = [replace(config, weight_range=rule) for rule in WEIGHT_RANGES if rule != config.weight_range]
        found += [replace(config, observer=name) for name in OBSERVERS if name != config.observer]
        if config.granularity != Granularity.PER_CHANNEL.value:
            found.append(replace(config, granularity=Granularity.PER_CHANNEL.value))
        return found

    def cheap_method_variants(self, config: QuantConfig) -> list[QuantConfig]:
        recipes: list[tuple[str, ...]] = [("bias-correction",)]
        if equalization_pairs(self.graph):
            recipes += [("equalization",), ("equalization", "bias-correction")]
        return [replace(config, methods=recipe) for recipe in recipes]

    def adaround_variants(self, config: QuantConfig) -> list[QuantConfig]:
        return [replace(config, methods=("adaround",)), replace(config, methods=("adaround", "bias-correction"))]

    def float_fallback(self) -> None:
        """NNCF's accuracy control: rank the layers of the closest near miss by the accuracy its quantization
        costs (each layer float alone, on a ranking subset), then keep the worst float, one more at a time."""
        misses = self.near_misses(1)
        if not misses:
            self.log("float layers: no near miss to rescue")
            return
        config = misses[0].config
        ranking = self.validation.subset(RANKING_IMAGES)
        with cancel.until(self.deadline):
            try:
                qnet = quantize_model(self.model, config, self.batches)
                names = list(self.graph.layers)
                gains = {}
                for name in names:
                    others = [n for n in names if n != name]
                    gains[name] = evaluate(variant(qnet, others, others), ranking).accuracy
            except cancel.DeadlinePassed:
                self.result.stopped_by = "time budget"
                raise _Stop from None
        ranked = sorted(names, key=lambda n: -gains[n])
        counts = parameter_counts(self.graph)
        kept: list[str] = []
        for name in ranked:
            if len(kept) == FLOAT_LAYERS_MAX:
                break
            bits = qnet.layers[name].weight_bits or 32
            # a layer whose float weights alone would make the model no smaller than the best is skipped
            added = counts[name] * (32 - bits) / 8
            if self.settings.objective == "bytes" and misses[0].weight_bytes + added >= self.best_size():
                continue
            kept.append(name)
            point = self.measure(replace(config, float_layers=tuple(kept)), "float layers")
            if self.passes(point):
                break
        tried = ", ".join(kept) or "none (each would make the model larger than the best)"
        self.log(f"float layers: ranked {', '.join(ranked)} by harm; kept float in turn: {tried}")

    def run(self) -> SearchResult:
        try:
            self.uniform()
            self.edges()
            self.mixed()
            self.rescue("range rules", self.range_variants, NEAR_MISSES)
            self.rescue("bias correction, equalization", self.cheap_method_variants, NEAR_MISSES)
            self.rescue("AdaRound", self.adaround_variants, 1)
            if not self.settings.integer_only:
                self.float_fallback()
        except _Stop:
            self.log(f"stopped: {self.result.stopped_by}")
        self.result.seconds = time.monotonic() - self.started
        return self.result


def auto_search(
    model: nn.Module,
    data: Dataset,
    config: QuantConfig | None = None,
    settings: SearchSettings | None = None,
    on_point: Progress | None = None,
) -> SearchResult:
    """Search for the smallest config whose validation accuracy is within `settings.max_drop` points of the
    float model's. `config` gives the calibration and range settings (the defaults when None); `on_point`
    is called after each measured config with it and the result so far."""
    return _Search(model, data, config or QuantConfig(), settings or SearchSettings(), on_point).run()


def measure_on_test(model: nn.Module, data: Dataset, points: Sequence[SearchPoint]) -> dict[str, float]:
    """The test-set accuracy of each point's config (by its JSON), calibrated as `evaluate` calibrates it.
    Called only after the search: the test set never steers it."""
    found: dict[str, float] = {}
    for point in points:
        key = point.config.to_json()
        if key not in found:
            qnet = quantize_model(model, point.config, calibration_data(data.train, point.config))
            found[key] = evaluate(qnet, data.test).accuracy
    return found
