"""Each observer on hand-made tensors, and calibration through hooks."""

from __future__ import annotations

import pytest
import torch

from qcore.data import calibration_batches, calibration_indices
from qcore.models.net import Net
from qcore.quantize.calibrate import (
    OBSERVERS,
    MovingAverageMinMaxObserver,
    calibrate,
    make_observer,
    mse_optimal_weight_range,
    snapshot_points,
)
from qcore.quantize.quant import Scheme


def observe_all(name: str, batches: list[list[float]], **kwargs) -> tuple[float, float]:
    observer = make_observer(name, **kwargs)
    for batch in batches:
        observer.observe(torch.tensor(batch))
    return observer.clipping_range()


def test_minmax_is_the_range_of_everything_seen():
    assert observe_all("minmax", [[1.0, 2.0, 3.0], [-1.0, 5.0]]) == (-1.0, 5.0)


def test_moving_average_by_hand():
    observer = MovingAverageMinMaxObserver(averaging_constant=0.5)
    observer.observe(torch.tensor([0.0, 4.0]))
    observer.observe(torch.tensor([-2.0, 8.0]))
    # min: 0 + 0.5 * (-2 - 0) = -1; max: 4 + 0.5 * (8 - 4) = 6
    assert observer.clipping_range() == (-1.0, 6.0)
    assert (observer.observed_min, observer.observed_max) == (-2.0, 8.0)


def test_moving_average_default_constant_is_torch_aos():
    observer = make_observer("moving-average")
    observer.observe(torch.tensor([0.0, 100.0]))
    observer.observe(torch.tensor([0.0, 200.0]))
    assert observer.clipping_range() == (0.0, pytest.approx(101.0))  # 100 + 0.01 * 100


def test_percentile_by_nearest_rank():
    values = torch.arange(10001, dtype=torch.float32)  # 0..10000
    observer = make_observer("percentile")
    observer.observe(values[:5000])
    observer.observe(values[5000:])
    # 99.99th percentile of 0..10000 by nearest rank: rank round(10000 * 0.9999) = 9999; mirror rank 1
    assert observer.clipping_range() == (1.0, 9999.0)


def brute_force_error(values: torch.Tensor, lo: float, hi: float, bits: int) -> float:
    """Quantization MSE with an independent affine quantizer in float64."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmax = 2**bits - 1
    scale = (hi - lo) / qmax
    zero = min(max(round(-lo / scale), 0), qmax)
    v = values.double()
    q = torch.clamp(torch.round(v / scale) + zero, 0, qmax)
    return float(((q - zero) * scale - v).pow(2).mean())


def gaussian_quantiles(count: int) -> torch.Tensor:
    """A deterministic standard-normal sample: the normal quantiles of evenly spaced probabilities."""
    p = (torch.arange(count, dtype=torch.float64) + 0.5) / count
    return (2**0.5 * torch.erfinv(2 * p - 1)).float()


def test_mse_clips_gaussian_tails_and_is_optimal_on_its_grid():
    values = gaussian_quantiles(20000)  # max |x| about 3.9
    lo, hi = observe_all("mse", [values.tolist()], bits=4)
    assert hi < 0.8 * float(values.max())  # low bits: clipping the tails wins
    chosen = brute_force_error(values, lo, hi, 4)
    full = (float(values.min()), float(values.max()))
    assert chosen < brute_force_error(values, *full, 4)
    for step in range(1, 101):  # no other factor on the searched grid does better
        f = step / 100
        assert chosen <= brute_force_error(values, f * full[0], f * full[1], 4) * (1 + 1e-6)


def test_mse_keeps_the_range_of_uniform_data():
    values = torch.linspace(0, 1, 4001)
    lo, hi = observe_all("mse", [values.tolist()], bits=8)
    assert 0.95 <= hi <= 1.0


def test_mse_weight_range_is_chosen_per_channel():
    weight = torch.stack([torch.linspace(-1, 1, 5000), gaussian_quantiles(5000)])
    low, high = mse_optimal_weight_range(weight, 3, Scheme.SYMMETRIC, per_channel=True)
    kept_uniform = float(high[0]) / float(weight[0].max())
    kept_gaussian = float(high[1]) / float(weight[1].max())
    assert kept_gaussian < 0.8  # the gaussian channel clips its tails ...
    assert kept_uniform > kept_gaussian + 0.05  # ... far more than the uniform one does
    whole_low, whole_high = mse_optimal_weight_range(weight, 3, Scheme.SYMMETRIC, per_channel=False)
    assert whole_low.ndim == 0 and whole_high.ndim == 0


def test_notebook_rule_sums_per_sample_extremes_and_averages_batches():
    batches = [[[1.0, 2.0], [3.0, 4.0]], [[0.0, 10.0]]]
    # batch 1: sum of per-sample max 2 + 4 = 6, of min 1 + 3 = 4; batch 2: 10 and 0 -> mean 8 and 2
    assert observe_all("notebook", batches) == (2.0, 8.0)


def test_notebook_rule_is_batch_size_times_too_wide():
    batch = torch.rand(64, 100, generator=torch.Generator().manual_seed(0))
    observer = make_observer("notebook")
    observer.observe(batch)
    assert observer.clipping_range()[1] > 60 * float(batch.max()) * 0.9


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_every_observer_refuses_to_choose_before_data(name):
    with pytest.raises(RuntimeError, match="no data"):
        make_observer(name).clipping_range()


def test_unknown_observer_names_the_choices():
    with pytest.raises(ValueError, match="minmax"):
        make_observer("bogus")


def test_calibration_indices_are_seeded_and_within_training_split():
    first = calibration_indices(60000, 4, 64, seed=3)
    assert torch.equal(first, calibration_indices(60000, 4, 64, seed=3))
    assert not torch.equal(first, calibration_indices(60000, 4, 64, seed=4))
    assert len(first) == 256 and len(set(first.tolist())) == 256 and int(first.max()) < 60000


def test_calibrate_sees_each_layers_input():
    torch.manual_seed(0)
    model = Net().eval()
    images = [torch.randn(8, 1, 28, 28) for _ in range(3)]
    stats = calibrate(model, images, "minmax", bits=8)
    every = torch.cat(images)
    assert stats["conv1"].observed_min == float(every.min())
    assert stats["conv1"].observed_max == float(every.max())
    assert stats["fc2"].observed_min >= 0.0  # fc2's input follows a ReLU
    assert [s.batches for s in stats["conv2"].history] == [1, 2, 3]
    assert [s.clip_max is not None for s in stats["conv2"].history] == [True, True, True]
    # the running max never shrinks as batches are added
    maxima = [s.observed_max for s in stats["fc1"].history]
    assert maxima == sorted(maxima)
    assert sum(stats["conv1"].histogram_counts) == every.numel()


def test_snapshot_points():
    assert snapshot_points(3) == [1, 2, 3]
    assert snapshot_points(16) == [1, 2, 4, 8, 16]
    assert snapshot_points(100) == [1, 2, 4, 8, 16, 32, 64, 100]


def test_calibration_batches_come_from_the_given_split():
    class FakeSplit:
        images = torch.arange(1000, dtype=torch.float32).reshape(1000, 1)

        def __len__(self):
            return 1000

    batches = calibration_batches(FakeSplit(), 3, 10, seed=0)
    assert [len(b) for b in batches] == [10, 10, 10]
    expected = calibration_indices(1000, 3, 10, 0)[:10].float()
    assert torch.equal(batches[0].flatten(), expected)


def test_a_calibration_is_remembered_by_content_and_never_shared_by_reference():
    """The same graph, images and settings: the float pass runs once (counted at its per-batch
    checkpoint), and a caller that changes its stats changes nobody else's. Another weight, another
    op setting or other images: computed afresh, with other ranges."""
    from dataclasses import replace

    from qcore import cancel
    from qcore.graph import model_graph
    from qcore.quantize.calibrate import CALIBRATIONS, calibrate_points

    torch.manual_seed(0)
    graph = model_graph(Net().eval())
    batches = [torch.randn(8, 1, 28, 28) for _ in range(2)]
    passes = []

    def count() -> bool:
        passes.append(1)
        return False

    CALIBRATIONS.clear()
    with cancel.stop_when(count):
        first = calibrate_points(graph, batches, "minmax", 8, ["conv2"])
        first["conv2"].clip_max = 1e9  # the caller's copy only
        again = calibrate_points(graph, batches, "minmax", 8, ["conv2"])
        assert len(passes) == 2  # one checkpoint per batch, for the first call only
        weight, bias = graph.parameters["conv1"]
        heavier = graph.with_parameters({**graph.parameters, "conv1": (weight * 2, bias)})
        other_weights = calibrate_points(heavier, batches, "minmax", 8, ["conv2"])
        pool = next(op for op in graph.ops if op.kind.value == "maxpool")
        ops = tuple(replace(op, attrs={**op.attrs, "stride": (1, 1)}) if op is pool else op for op in graph.ops)
        other_stride = replace(graph, ops=ops)
        assert other_stride.digest() != graph.digest() and heavier.digest() != graph.digest()
        other_images = calibrate_points(graph, [batch + 1 for batch in batches], "minmax", 8, ["conv2"])
        assert len(passes) == 6
    assert again["conv2"].clip_max != 1e9 and again["conv2"].clip_max == first["conv2"].observed_max
    assert other_weights["conv2"].observed_max != again["conv2"].observed_max
    assert other_images["conv2"].observed_max != again["conv2"].observed_max
    assert len(CALIBRATIONS._values) == 3


def test_the_weight_range_search_is_remembered_by_the_weights_content():
    from qcore.quantize.calibrate import WEIGHT_RANGES, mse_optimal_weight_range, mse_optimal_weight_range_search

    weight = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    WEIGHT_RANGES.clear()
    low, high = mse_optimal_weight_range(weight, 4, Scheme.SYMMETRIC, True)
    low.fill_(0.0)  # the caller's copy only
    again = mse_optimal_weight_range(weight, 4, Scheme.SYMMETRIC, True)
    expected = mse_optimal_weight_range_search(weight, 4, Scheme.SYMMETRIC, True)
    assert torch.equal(again[0], expected[0]) and torch.equal(again[1], expected[1])
    changed = weight.clone()
    changed[0, 0, 0, 0] = 9.0
    assert not torch.equal(mse_optimal_weight_range(changed, 4, Scheme.SYMMETRIC, True)[1], expected[1])
    assert len(WEIGHT_RANGES._values) == 2
