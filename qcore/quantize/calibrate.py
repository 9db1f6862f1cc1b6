"""Observers (one class per range rule, after torch.ao.quantization.observer) and activation
calibration at the quantization points of the model graph.

Each observer records statistics batch by batch in `observe` and turns them into a clipping range
in `clipping_range`. Exact running min and max are always kept; rules that need the distribution
(percentile, MSE) work on a bounded uniform subsample of the values seen (every value while few).
"""

from __future__ import annotations

import copy
import hashlib
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar, TypeVar

import torch
from torch import nn

from qcore import cancel
from qcore.graph import GraphRun, ModelGraph, Op, model_graph
from qcore.graph.ops import hash_tensor
from qcore.quantize.quant import Scheme, choose_qparams, fake_quantize

# Subsample bounds: per batch at most SAMPLES_PER_BATCH values, at most SAMPLE_CAP overall (when the
# store overflows, every stored batch is halved and later batches keep half as many, so each batch
# keeps an equal share).
SAMPLES_PER_BATCH = 8192
SAMPLE_CAP = 2**18
MSE_CHUNK = 2**14  # values scored per step of the MSE search (bounds its memory to grid x chunk)
WEIGHT_MSE_CHUNK = 2**22  # candidate values the weight range search scores at once (16 MB a copy)
_T = TypeVar("_T")


class Memo:
    """A small least-recently-used table of a pure function's results, keyed by content digests, shared
    by a server's sessions (threads). A class exploring one model repeats calibration's work: every
    what-if that keeps the activations' bits, observer and calibration images has the same float pass
    and ranges (calibrate_points), every one that keeps a layer's weight bits and rule the same MSE
    search over its weights (mse_optimal_weight_range). Values are copied in and out, so no caller
    can change what another gets; a computation that raises (a cancelled one) stores nothing."""

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self._values: OrderedDict[tuple[object, ...], object] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_compute(self, key: tuple[object, ...], compute: Callable[[], _T]) -> _T:
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return copy.deepcopy(self._values[key])  # type: ignore[return-value]
        value = compute()
        with self._lock:
            self._values[key] = copy.deepcopy(value)
            while len(self._values) > self.entries:
                self._values.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


def tensors_digest(tensors: Sequence[torch.Tensor]) -> str:
    """A content hash of tensors' dtypes, shapes and bytes, in order."""
    hasher = hashlib.blake2b(digest_size=20)
    for tensor in tensors:
        hash_tensor(hasher, tensor)
    return hasher.hexdigest()


# Calibrations of 8 (graph, images, observer, bits) and 256 weight range searches: kilobytes each
CALIBRATIONS = Memo(entries=8)
WEIGHT_RANGES = Memo(entries=256)


class ValueSample:
    """A deterministic, bounded, per-batch-uniform subsample of the values observed."""

    def __init__(self, seed: int = 0) -> None:
        self._chunks: list[torch.Tensor] = []
        self._per_batch = SAMPLES_PER_BATCH
        self._generator = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).to(torch.float32)
        if flat.numel() > self._per_batch:
            picks = torch.randint(0, flat.numel(), (self._per_batch,), generator=self._generator)
            flat = flat[picks]
        self._chunks.append(flat.clone())
        while sum(chunk.numel() for chunk in self._chunks) > SAMPLE_CAP:
            self._chunks = [chunk[::2] for chunk in self._chunks]
            self._per_batch = max(1, self._per_batch // 2)

    def values(self) -> torch.Tensor:
        return torch.cat(self._chunks) if self._chunks else torch.zeros(0)


class Observer(ABC):
    """Collects statistics of one tensor stream and proposes a clipping range for it."""

    name: ClassVar[str]
    needs_sample: ClassVar[bool] = False

    def __init__(self, bits: int = 8, scheme: Scheme = Scheme.ASYMMETRIC) -> None:
        self.bits = bits
        self.scheme = Scheme(scheme)
        self.observed_min = float("inf")
        self.observed_max = float("-inf")
        self.batches = 0
        self.sample = ValueSample()

    def observe(self, x: torch.Tensor) -> None:
        self.observed_min = min(self.observed_min, float(x.min()))
        self.observed_max = max(self.observed_max, float(x.max()))
        self.batches += 1
        if self.needs_sample:
            self.sample.add(x)
        self._update(x)

    def _update(self, x: torch.Tensor) -> None:  # noqa: B027 - optional hook, deliberately empty
        """Rule-specific per-batch state; most rules need none beyond min, max and the sample."""

    @abstractmethod
    def clipping_range(self) -> tuple[float, float]:
        """The (min, max) the quantizer should cover."""

    def _require_data(self) -> None:
        if self.batches == 0:
            raise RuntimeError(f"{self.name} observer has seen no data")


class MinMaxObserver(Observer):
    """The exact range of everything seen."""

    name = "minmax"

    def clipping_range(self) -> tuple[float, float]:
        self._require_data()
        return self.observed_min, self.observed_max


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of per-batch min and max (torch.ao's averaging constant 0.01)."""

    name = "moving-average"

    def __init__(self, bits: int = 8, scheme: Scheme = Scheme.ASYMMETRIC, averaging_constant: float = 0.01) -> None:
        super().__init__(bits, scheme)
        self.averaging_constant = averaging_constant
        self._min = self._max = 0.0

    def _update(self, x: torch.Tensor) -> None:
        batch_min, batch_max = float(x.min()), float(x.max())
        if self.batches == 1:
            self._min, self._max = batch_min, batch_max
        else:
            self._min += self.averaging_constant * (batch_min - self._min)
            self._max += self.averaging_constant * (batch_max - self._max)

    def clipping_range(self) -> tuple[float, float]:
        self._require_data()
        return self._min, self._max


class PercentileObserver(Observer):
    """Clips to the given percentile at the top (and the mirror percentile at the bottom)."""

    name = "percentile"
    needs_sample = True

    def __init__(self, bits: int = 8, scheme: Scheme = Scheme.ASYMMETRIC, percentile: float = 99.99) -> None:
        super().__init__(bits, scheme)
        self.percentile = percentile

    def clipping_range(self) -> tuple[float, float]:
        self._require_data()
        values = self.sample.values()
        return percentile_range(values, self.percentile)


def percentile_range(values: torch.Tensor, percentile: float) -> tuple[float, float]:
    """(value at 100-p, value at p) by nearest rank on the sorted values."""
    ordered = torch.sort(values).values
    last = ordered.numel() - 1
    high_rank = round(last * percentile / 100.0)
    low_rank = last - high_rank
    return float(ordered[low_rank]), float(ordered[high_rank])


class MseObserver(Observer):
    """The clipping range, shrunk from the observed one by a grid search over factors, that
    minimises the mean squared error between values and their fake-quantized copies."""

    name = "mse"
    needs_sample = True
    GRID = 100  # factors k/GRID for k = 1..GRID

    def clipping_range(self) -> tuple[float, float]:
        self._require_data()
        return mse_optimal_range(self.sample.values(), self.bits, self.scheme, self.GRID)


def mse_optimal_range(values: torch.Tensor, bits: int, scheme: Scheme, grid: int = 100) -> tuple[float, float]:
    """Search (f*min, f*max) for f in {1/grid, ..., 1}; the smallest error wins (ties: wider).
    All candidates are scored at once: one [grid, N] tensor per chunk of values."""
    low, high = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    factors = torch.arange(grid, 0, -1, dtype=torch.float32) / grid  # widest first, so ties keep it
    qparams = choose_qparams(low * factors, high * factors, bits, scheme, axis=0)
    errors = torch.zeros(grid, dtype=torch.float64)
    for chunk in values.split(MSE_CHUNK):
        rows = chunk.unsqueeze(0).expand(grid, -1)
        errors += (fake_quantize(rows, qparams) - rows).pow(2).sum(dim=1, dtype=torch.float64)
    best = int(torch.argmin(errors))  # first minimum = widest among equals
    return low * float(factors[best]), high * float(factors[best])


def mse_optimal_weight_range(
    weight: torch.Tensor, bits: int, scheme: Scheme, per_channel: bool, grid: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """mse_optimal_weight_range_search, remembered (WEIGHT_RANGES) by the weight's content and the settings."""
    key = ("weight range", tensors_digest([weight]), bits, Scheme(scheme).value, per_channel, grid)
    return WEIGHT_RANGES.get_or_compute(
        key, lambda: mse_optimal_weight_range_search(weight.detach(), bits, scheme, per_channel, grid)
    )


def mse_optimal_weight_range_search(
    weight: torch.Tensor, bits: int, scheme: Scheme, per_channel: bool, grid: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like mse_optimal_range, for weights: one search per output channel (axis 0) when
    `per_channel`, else one for the whole tensor. Returns (min, max) tensors.

    The candidates are scored a chunk of factors at a time (a [factors x channels, values] tensor of
    at most WEIGHT_MSE_CHUNK values: one pass instead of `grid` passes of small ops, which were most of
    a BatchNorm net's calibration); per channel the first smallest error wins, widest first."""
    rows = weight.reshape(weight.shape[0], -1) if per_channel else weight.reshape(1, -1)
    channels, values = rows.shape
    low = torch.clamp(rows.min(dim=1).values, max=0.0)
    high = torch.clamp(rows.max(dim=1).values, min=0.0)
    factors = torch.tensor([step / grid for step in range(grid, 0, -1)], dtype=torch.float32)  # widest first
    best_error = torch.full_like(low, float("inf"))
    best_factor = torch.ones_like(low)
    per_chunk = max(1, WEIGHT_MSE_CHUNK // max(1, channels * values))
    for chunk in factors.split(per_chunk):
        lows, highs = (low.unsqueeze(0) * chunk.unsqueeze(1)), (high.unsqueeze(0) * chunk.unsqueeze(1))
        qparams = choose_qparams(lows.reshape(-1), highs.reshape(-1), bits, scheme, axis=0)
        candidates = rows.unsqueeze(0).expand(len(chunk), channels, values).reshape(-1, values)
        errors = (fake_quantize(candidates, qparams) - candidates).pow(2).mean(dim=1).reshape(len(chunk), channels)
        error, index = errors.min(dim=0)  # the first of equal errors: the widest in this chunk
        better = error < best_error  # strictly: an earlier (wider) chunk keeps a tie
        best_error = torch.where(better, error, best_error)
        best_factor = torch.where(better, chunk[index], best_factor)
    best_low, best_high = low * best_factor, high * best_factor
    if per_channel:
        return best_low, best_high
    return best_low[0], best_high[0]


class NotebookObserver(Observer):
    """The original notebook's rule, kept to reproduce it: per batch the SUM over samples of each
    sample's max (and min), averaged over batches, so the range is about batch-size times too wide."""

    name = "notebook"

    def __init__(self, bits: int = 8, scheme: Scheme = Scheme.ASYMMETRIC) -> None:
        super().__init__(bits, scheme)
        self._sum_min = self._sum_max = 0.0

    def _update(self, x: torch.Tensor) -> None:
        per_sample = x.reshape(x.shape[0], -1)
        self._sum_min += float(per_sample.min(dim=1).values.sum())
        self._sum_max += float(per_sample.max(dim=1).values.sum())

    def clipping_range(self) -> tuple[float, float]:
        self._require_data()
        return self._sum_min / self.batches, self._sum_max / self.batches


OBSERVERS: dict[str, type[Observer]] = {
    cls.name: cls
    for cls in (MinMaxObserver, MovingAverageMinMaxObserver, PercentileObserver, MseObserver, NotebookObserver)
}


def make_observer(name: str, bits: int = 8, scheme: Scheme = Scheme.ASYMMETRIC) -> Observer:
    if name not in OBSERVERS:
        raise ValueError(f"unknown observer {name!r}; choose from {', '.join(OBSERVERS)}")
    return OBSERVERS[name](bits, scheme)


@dataclass(frozen=True)
class RangeSnapshot:
    """The ranges after `batches` calibration batches. The clipping range is computed only at
    snapshot_points (powers of two and the last batch), since MSE and percentile rules are costly;
    elsewhere it is None."""

    batches: int
    observed_min: float
    observed_max: float
    clip_min: float | None
    clip_max: float | None


@dataclass
class ActivationStats:
    """What calibration learned about the input of one layer."""

    layer: str
    observer: str
    observed_min: float
    observed_max: float
    clip_min: float
    clip_max: float
    histogram_counts: list[int]
    histogram_edges: list[float]
    history: list[RangeSnapshot] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "layer": self.layer,
            "observer": self.observer,
            "observed_min": self.observed_min,
            "observed_max": self.observed_max,
            "clip_min": self.clip_min,
            "clip_max": self.clip_max,
            "history": [snapshot.__dict__ for snapshot in self.history],
        }


def snapshot_points(num_batches: int) -> list[int]:
    """Batch counts at which the clipping range is recorded: powers of two and the last."""
    points = [2**k for k in range(num_batches.bit_length()) if 2**k <= num_batches]
    return sorted(set(points + [num_batches]))


class _Observing(GraphRun):
    """The float graph, feeding each observed op's output to its observer and histogram sample."""

    def __init__(self, graph: ModelGraph, watch: dict[str, Callable[[torch.Tensor], None]]) -> None:
        super().__init__(graph)
        self.watch = watch

    def after(self, op: Op, value: torch.Tensor) -> torch.Tensor:
        if op.name in self.watch:
            self.watch[op.name](value)
        return value


@torch.inference_mode()
def calibrate_points(
    model: nn.Module | ModelGraph,
    batches: Sequence[torch.Tensor],
    observer: str,
    bits: int | Mapping[str, int],
    points: Sequence[str],
    histogram_bins: int = 64,
) -> dict[str, ActivationStats]:
    """Run the float graph over `batches` and observe the output of each named op (a quantization
    point, qcore.graph.points) at `bits` (one for all, or per point). The model itself is never touched.
    Remembered (CALIBRATIONS) by the graph's and the images' content and the settings."""
    if not batches:
        raise ValueError("calibration needs at least one batch")
    graph = model if isinstance(model, ModelGraph) else model_graph(model)
    point_bits = dict(bits) if isinstance(bits, Mapping) else dict.fromkeys(points, bits)
    key = (
        "calibration",
        graph.digest(),
        tensors_digest(batches),
        observer,
        tuple(sorted(point_bits.items())),
        tuple(points),
        histogram_bins,
    )
    return CALIBRATIONS.get_or_compute(
        key, lambda: _observe_points(graph, batches, observer, point_bits, points, histogram_bins)
    )


def _observe_points(
    graph: ModelGraph,
    batches: Sequence[torch.Tensor],
    observer: str,
    point_bits: dict[str, int],
    points: Sequence[str],
    histogram_bins: int,
) -> dict[str, ActivationStats]:
    observers = {name: make_observer(observer, point_bits[name], Scheme.ASYMMETRIC) for name in points}
    # Histograms always come from a sample, whichever rule chooses the range.
    samples = {name: ValueSample() for name in points}

    def watcher(name: str) -> Callable[[torch.Tensor], None]:
        def watch(value: torch.Tensor) -> None:
            observers[name].observe(value)
            samples[name].add(value)

        return watch

    run = _Observing(graph, {name: watcher(name) for name in points})
    snapshots = set(snapshot_points(len(batches)))
    history: dict[str, list[RangeSnapshot]] = {name: [] for name in points}
    for index, images in enumerate(batches, start=1):
        cancel.checkpoint()  # per batch: abandoned work stops here
        run.run(images)
        if index in snapshots:
            for name, obs in observers.items():
                clip_min, clip_max = obs.clipping_range()
                history[name].append(RangeSnapshot(index, obs.observed_min, obs.observed_max, clip_min, clip_max))
    stats = {}
    for name, obs in observers.items():
        last = history[name][-1]
        assert last.clip_min is not None and last.clip_max is not None  # the last batch is a snapshot point
        values = samples[name].values()
        counts, edges = torch.histogram(values, bins=histogram_bins)
        stats[name] = ActivationStats(
            name,
            observer,
            obs.observed_min,
            obs.observed_max,
            last.clip_min,
            last.clip_max,
            [int(c) for c in counts],
            [float(e) for e in edges],
            history[name],
        )
    return stats


def calibrate(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    observer: str,
    bits: int,
    layers: Sequence[str] | None = None,
    histogram_bins: int = 64,
) -> dict[str, ActivationStats]:
    """The input of each named layer (default: every layer) observed over `batches`, keyed by layer."""
    graph = model_graph(model)
    layers = graph.layers if layers is None else layers
    inputs = {name: graph.op(name).inputs[0] for name in layers}
    stats = calibrate_points(graph, batches, observer, bits, sorted(set(inputs.values())), histogram_bins)
    return {name: replace(stats[point], layer=name) for name, point in inputs.items()}
