"""The server's computation gate: a bound on concurrent work, first come first served, shared runs for
the same key, and no ticket left behind by a failed or stopped session."""

from __future__ import annotations

import threading
import time

import pytest

from qcore import cancel
from qcore.cancel import Cancelled
from ui.gate import (
    Gate,
    GateConfigError,
    default_slots,
    slots_from_environment,
    threads_per_computation,
)

TIMEOUT = 10.0


def wait_until(condition, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def start(target, *args) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def finish(*threads: threading.Thread) -> None:
    for thread in threads:
        thread.join(TIMEOUT)
        assert not thread.is_alive()


def test_no_more_than_the_slots_run_at_once_and_every_one_finishes():
    gate = Gate(2)
    lock, running, peak, finished = threading.Lock(), [0], [0], []

    def work(index: int) -> None:
        with gate.turn(("report", index)):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(0.05)
            with lock:
                running[0] -= 1
                finished.append(index)

    finish(*[start(work, i) for i in range(6)])
    assert peak[0] == 2
    assert sorted(finished) == list(range(6))
    assert gate.running() == 0 and gate.waiting() == 0


def test_waiting_sessions_are_served_in_arrival_order_and_told_their_place():
    gate = Gate(1)
    release, order = threading.Event(), []
    places: dict[str, list[str]] = {"b": [], "c": []}

    def hold() -> None:
        with gate.turn("a"):
            release.wait(TIMEOUT)
            order.append("a")

    release_b = threading.Event()

    def queued(name: str) -> None:
        with gate.turn(name, places[name].append):
            order.append(name)
            if name == "b":
                release_b.wait(TIMEOUT)

    first = start(hold)
    wait_until(lambda: gate.running() == 1)
    second = start(queued, "b")
    wait_until(lambda: gate.waiting() == 1)
    third = start(queued, "c")
    wait_until(lambda: gate.waiting() == 2)
    release.set()
    wait_until(lambda: len(places["c"]) == 2)  # b started, so c moved up
    assert order == ["a", "b"]
    release_b.set()
    finish(first, second, third)
    assert order == ["a", "b", "c"]
    assert places["b"] == ["The server is busy: yours is number 1 in line (1 running now)."]
    assert places["c"] == [
        "The server is busy: yours is number 2 in line (1 running now).",
        "The server is busy: yours is number 1 in line (1 running now).",
    ]


def test_the_same_key_asked_while_running_waits_for_that_run_without_queueing():
    gate = Gate(1)
    release, computed, messages = threading.Event(), [], []

    def compute(name: str) -> None:
        with gate.turn("same"):
            computed.append(name)
            release.wait(TIMEOUT)

    def ask_again() -> None:
        with gate.turn("same", messages.append):
            # the first run is over and the key is known as computed: this block would read the cache
            assert gate.is_done("same") and gate.running() == 0
            computed.append("second, from the cache")

    first = start(compute, "first")
    wait_until(lambda: gate.running() == 1)
    second = start(ask_again)
    wait_until(lambda: bool(messages))
    assert gate.waiting() == 0  # it is not in the line: it waits for the run already going
    release.set()
    finish(first, second)
    assert computed == ["first", "second, from the cache"]
    assert messages == ["Another session is computing these same results; they will be shared."]


def test_a_failed_run_is_not_remembered_and_the_next_asker_computes():
    gate = Gate(1)
    with pytest.raises(RuntimeError), gate.turn("key"):
        raise RuntimeError("calibration failed")
    assert not gate.is_done("key") and gate.running() == 0
    ran = []
    with gate.turn("key"):
        ran.append(gate.running())
    assert ran == [1] and gate.is_done("key")  # this time it held a slot, and it is remembered


class Stopped(Exception):
    """Stands for Streamlit stopping a run whose user moved on (raised when the page is written to)."""


def test_a_session_stopped_while_waiting_leaves_the_line():
    gate = Gate(1)
    release = threading.Event()

    def hold() -> None:
        with gate.turn("a"):
            release.wait(TIMEOUT)

    def stop_while_waiting(_message: str) -> None:
        raise Stopped

    holder = start(hold)
    wait_until(lambda: gate.running() == 1)
    with pytest.raises(Stopped), gate.turn("b", stop_while_waiting):
        pass
    assert gate.waiting() == 0
    release.set()
    finish(holder)
    with gate.turn("b"):  # the stopped request did not leave a ticket that blocks the line
        assert gate.running() == 1


def test_nested_computations_in_one_session_do_not_wait_for_themselves():
    gate = Gate(1)
    inner = []
    with gate.turn("report"), gate.turn("float"), gate.slot():  # a report asks for the float eval
        inner.append(gate.running())
    assert inner == [1] and gate.running() == 0


@pytest.mark.parametrize(
    ("raw", "slots"), [("", default_slots()), ("1", 1), (" 3 ", 3), ("64", 64)], ids=["unset", "1", "3", "64"]
)
def test_slots_come_from_the_environment(raw, slots):
    assert slots_from_environment({"QCORE_MAX_COMPUTATIONS": raw}) == slots


@pytest.mark.parametrize("raw", ["0", "65", "-1", "two", "1.5", "9" * 30, "²", "٣", "+2", "1_0", "３"])
def test_a_bad_slot_setting_is_an_error_not_a_guess(raw):
    with pytest.raises(GateConfigError, match="QCORE_MAX_COMPUTATIONS must be a whole number from 1 to 64"):
        slots_from_environment({"QCORE_MAX_COMPUTATIONS": raw})


def test_slots_and_threads_share_the_cores():
    assert default_slots(1) == 2 and default_slots(2) == 2 and default_slots(16) == 8
    assert threads_per_computation(2, cores=2) == 2  # two slots of two threads each on two cores
    assert threads_per_computation(8, cores=16) == 2
    assert threads_per_computation(2, cores=16) == 8
    assert threads_per_computation(4, cores=1) == 1  # never more threads than cores


class Sessions:
    """Who is still connected, as Streamlit's runtime would say (a closed tab leaves at once)."""

    def __init__(self, *names: str) -> None:
        self.present = set(names)

    def __call__(self, name: object) -> bool:
        return name in self.present


def _work_until_cancelled(gate: Gate, key, requester, steps: list[int], outcome: list[str]) -> None:
    """A computation with a checkpoint per step, as qcore's evaluation loops have."""
    try:
        with gate.turn(key, requester=requester):
            for step in range(400):
                cancel.checkpoint()
                steps.append(step)
                time.sleep(0.005)
        outcome.append("finished")
    except Cancelled:
        outcome.append("cancelled")


def test_work_whose_only_asker_left_stops_at_its_next_checkpoint_and_frees_its_slot():
    sessions = Sessions("alice")
    gate = Gate(1, sessions)
    steps: list[int] = []
    outcome: list[str] = []
    worker = start(_work_until_cancelled, gate, ("diagnosis", 1), "alice", steps, outcome)
    wait_until(lambda: len(steps) >= 5)
    sessions.present.discard("alice")  # the tab closed
    left_at = len(steps)
    finish(worker)
    assert outcome == ["cancelled"]
    assert len(steps) <= left_at + 2  # stopped within a step or two, not after 400
    assert gate.running() == 0 and gate.waiting() == 0
    sessions.present.add("bob")
    with gate.turn(("diagnosis", 1), requester="bob"):  # nothing was remembered as done: a new asker computes
        assert gate.running() == 1
    assert gate.is_done(("diagnosis", 1))


def test_work_goes_on_while_another_session_waits_for_the_same_result():
    sessions = Sessions("alice", "bob")
    gate = Gate(1, sessions)
    steps: list[int] = []
    outcome: list[str] = []
    worker = start(_work_until_cancelled, gate, ("diagnosis", 2), "alice", steps, outcome)
    wait_until(lambda: len(steps) >= 3)
    waited: list[str] = []

    def second_asker() -> None:
        with gate.turn(("diagnosis", 2), requester="bob"):
            waited.append("read the shared result")

    waiter = start(second_asker)
    time.sleep(0.1)
    sessions.present.discard("alice")  # the first asker leaves; bob still wants the result
    time.sleep(0.2)
    assert outcome == [] and not gate.abandoned(("diagnosis", 2))
    finish(worker, waiter)
    assert outcome == ["finished"] and len(steps) == 400
    assert waited == ["read the shared result"]


def test_a_waiting_session_that_left_leaves_the_line_and_anonymous_work_is_never_stopped():
    sessions = Sessions("alice", "carol")
    gate = Gate(1, sessions)
    release = threading.Event()
    outcome: list[str] = []

    def holder() -> None:  # anonymous (a script or test): never cancelled
        with gate.turn(("report", "held")):
            release.wait(TIMEOUT)
            cancel.checkpoint()
        outcome.append("holder finished")

    def queued() -> None:
        try:
            with gate.turn(("report", "queued"), requester="carol"):
                outcome.append("carol ran")
        except Cancelled:
            outcome.append("carol left the line")

    first = start(holder)
    wait_until(lambda: gate.running() == 1)
    second = start(queued)
    wait_until(lambda: gate.waiting() == 1)
    sessions.present.clear()  # everyone named has gone
    finish(second)
    assert outcome == ["carol left the line"] and gate.waiting() == 0
    release.set()
    finish(first)
    assert outcome == ["carol left the line", "holder finished"]


def test_a_training_run_waits_its_turn_in_the_gate_and_holds_a_slot(monkeypatch):
    """Issue 20: training and QAT go through the gate like every other computation: with the one slot
    taken, a training run waits, is told its place in line, then runs holding the slot."""
    from ui import cache

    gate = Gate(1)
    monkeypatch.setattr(cache, "GATE", gate)
    shown: list[str] = []

    class Notice:  # what the page's placeholder does with the message
        def empty(self):
            return self

        def info(self, message, icon=None):
            shown.append(message)

    holding, release = threading.Event(), threading.Event()

    def someone_else() -> None:
        with gate.slot():
            holding.set()
            release.wait(10)

    other = threading.Thread(target=someone_else)
    other.start()
    holding.wait(5)
    result: list[int] = []
    trainer = threading.Thread(target=lambda: result.append(cache.own_run("training", gate.running, Notice())))
    trainer.start()
    time.sleep(0.8)
    assert result == [] and gate.waiting() == 1
    assert any("number 1 in line (1 running now)" in message for message in shown)
    release.set()
    trainer.join(10)
    other.join(10)
    assert result == [1] and gate.running() == 0  # it ran in the one slot, then gave it back
