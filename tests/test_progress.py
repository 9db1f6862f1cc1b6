"""qcore.progress: nested parts map their fraction onto their share of the whole; AdaRound's and block
reconstruction's loops report through it; the app draws it as a bar with the time left."""

from __future__ import annotations

import pytest
import torch

from qcore import progress
from qcore.data import calibration_batches
from qcore.quantize import qmodel
from qcore.quantize.calibrate import Memo
from qcore.quantize.config import QuantConfig
from qcore.quantize.methods import ADAROUND_ITERATIONS, PROGRESS_STEPS
from qcore.quantize.qmodel import quantize_model
from qcore.quantize.reconstruction import ReconstructionSettings, reconstruct_blocks
from tests.test_reconstruction import SmallResidual


def test_parts_map_their_fraction_onto_their_share_and_nothing_reports_without_a_callback():
    progress.report(0.5)  # no callback installed: nothing happens
    seen: list[tuple[float, str]] = []
    with progress.reporting(lambda fraction, what: seen.append((fraction, what))):
        progress.report(0.5)
        with progress.part(1, 4, "the second of four"):  # [0.25, 0.5]
            progress.report(0.0)
            progress.report(0.5)
            progress.report(2.0)  # clamped
            with progress.part(1, 2, "its second half"):  # [0.375, 0.5]
                progress.report(0.5)
        progress.report(1.0)
    progress.report(0.5)  # the callback is gone again
    assert seen == [
        (0.5, ""),
        (0.25, "the second of four"),
        (0.375, "the second of four"),
        (0.5, "the second of four"),
        (0.4375, "its second half"),
        (1.0, ""),
    ]


@pytest.fixture(scope="module")
def small(mnist):
    images = torch.cat(calibration_batches(mnist.train, 2, 64, 0))
    return SmallResidual().eval(), images


def test_block_reconstruction_reports_each_blocks_steps_in_order(small):
    model, images = small
    qnet = quantize_model(model, QuantConfig(weight_bits=2, act_bits=4), [images])
    seen: list[tuple[float, str]] = []
    with progress.reporting(lambda fraction, what: seen.append((fraction, what))):
        reconstruct_blocks(qnet, images, ReconstructionSettings(iterations=50), seed=0)
    # three blocks (stem, the residual block, fc), each reporting at steps 0 and 25 of 50
    assert [what for _, what in seen] == [f"block reconstruction, block {b} of 3" for b in (1, 2, 3) for _ in (0, 25)]
    assert [fraction for fraction, _ in seen] == pytest.approx([0, 1 / 6, 1 / 3, 1 / 2, 2 / 3, 5 / 6])


@pytest.mark.slow
def test_adaround_reports_each_layers_steps_through_quantization(small, monkeypatch):
    model, images = small
    monkeypatch.setattr(qmodel, "ADAROUNDS", Memo(entries=8))  # learned here, not remembered from another test
    seen: list[tuple[float, str]] = []
    with progress.reporting(lambda fraction, what: seen.append((fraction, what))):
        quantize_model(model, QuantConfig(weight_bits=2, act_bits=4, methods=("adaround",)), [images])
    fractions = [fraction for fraction, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0 and fractions[-1] < 1
    steps = ADAROUND_ITERATIONS // PROGRESS_STEPS
    for layer in range(4):  # stem, conv1, conv2, fc: each reports from its own quarter of the work
        assert seen[layer * steps] == (pytest.approx(layer / 4), f"AdaRound, layer {layer + 1} of 4")
    assert len(seen) == 4 * steps


class Recorded:
    """A stand-in for a Streamlit container: the bar drawn in it, and whether it was removed."""

    def __init__(self) -> None:
        self.drawn: list[tuple[float, str]] = []
        self.placed = 0
        self.removed = False

    def empty(self) -> Recorded:
        if self.placed:  # the bar's own empty(): removed
            self.removed = True
        self.placed += 1
        return self

    def progress(self, fraction: float, text: str) -> None:
        self.drawn.append((fraction, text))


def test_the_app_draws_the_fraction_and_the_time_left_then_removes_the_bar(monkeypatch):
    from ui import cache

    clock = iter([100.0, 110.0, 110.2, 120.0])  # seconds at each report
    monkeypatch.setattr(cache.time, "monotonic", lambda: next(clock))
    where = Recorded()
    with cache.progress_shown(where):  # type: ignore[arg-type]
        progress.report(0.0)  # no rate yet: no estimate
        with progress.part(0, 2, "AdaRound, layer 1 of 2"):
            progress.report(0.5)  # 0.25 of the whole in 10 s: the 0.75 left takes 30 s
            progress.report(0.6)  # 0.2 s later: not redrawn
        progress.report(0.75)  # 0.75 in 20 s: the 0.25 left takes about 7 s
        assert not where.removed
    assert where.drawn == [
        (0.0, "0% done"),
        (0.25, "AdaRound, layer 1 of 2: 25% done, about 30 s left"),
        (0.75, "75% done, about 7 s left"),
    ]
    assert where.placed == 2 and where.removed  # one bar, placed at the first report and removed at the end


def test_the_time_left_is_the_rate_so_far_extrapolated_once_five_percent_more_is_done():
    from ui.cache import time_left

    assert time_left((100.0, 0.1), 101.0, 0.14) == ""  # 4% since: too little to tell
    assert time_left((100.0, 0.1), 110.0, 0.3) == ", about 35 s left"  # 0.2 in 10 s: 0.7 takes 35 s
    assert time_left((100.0, 0.0), 103.0, 0.5) == ", about 3 s left"
