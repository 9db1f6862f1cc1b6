"""qcore's long computations stop at their next checkpoint once the installed check says so."""

from __future__ import annotations

import pytest

from qcore import cancel
from qcore.analysis.tables import quantize_for
from qcore.cancel import Cancelled
from qcore.inference.evaluate import evaluate
from qcore.quantize.config import QuantConfig


def test_without_a_check_nothing_is_ever_cancelled():
    assert not cancel.stop_requested()
    cancel.checkpoint()  # returns: the CLI and tests install no check


@pytest.mark.parametrize("after", [1, 3])
def test_evaluation_stops_at_the_batch_after_the_check_says_so(pretrained, mnist, after):
    asked = []

    def stop_after_some_batches() -> bool:
        asked.append(1)
        return len(asked) > after

    with cancel.stop_when(stop_after_some_batches), pytest.raises(Cancelled):
        evaluate(pretrained, mnist.test, batch_size=500)  # 20 batches if it ran to the end
    assert len(asked) == after + 1  # one check per batch, and none after the stop
    assert not cancel.stop_requested()  # the check is gone with the block


def test_calibration_and_adaround_stop_too(pretrained, mnist):
    from qcore.quantize.calibrate import CALIBRATIONS, WEIGHT_RANGES
    from qcore.quantize.qmodel import ADAROUNDS, SENSITIVITIES

    CALIBRATIONS.clear()  # a calibration remembered from another test would never reach a checkpoint
    WEIGHT_RANGES.clear()
    SENSITIVITIES.clear()
    ADAROUNDS.clear()
    for config in (QuantConfig(calib_batches=8), QuantConfig(weight_bits=3, methods=("adaround",))):
        with cancel.stop_when(lambda: True), pytest.raises(Cancelled):
            quantize_for(pretrained, mnist, config)


def test_a_deadline_stops_work_at_its_checkpoint_and_is_told_apart_from_a_session_that_left():
    import time

    with cancel.until(time.monotonic() + 60):
        cancel.checkpoint()  # time left: nothing happens
        with cancel.until(time.monotonic() - 1), pytest.raises(cancel.DeadlinePassed):
            cancel.checkpoint()  # the earlier deadline holds inside
        cancel.checkpoint()  # and the outer one again after it
    with cancel.stop_when(lambda: True), cancel.until(time.monotonic() + 60):
        with pytest.raises(Cancelled) as stopped:
            cancel.checkpoint()
        assert not isinstance(stopped.value, cancel.DeadlinePassed)  # nobody left to want the result
    cancel.checkpoint()  # no deadline outside the blocks
