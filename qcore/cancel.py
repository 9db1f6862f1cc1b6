"""Stopping abandoned work: long computations call `checkpoint()` once per batch or step.

qcore knows nothing of sessions. A caller that serves people (the dashboard) installs, for the
thread that runs a computation, a check that says whether anyone still wants the result; when it
says no, the next checkpoint raises `Cancelled`, so a computation whose every requester has left
stops within one batch instead of running to the end. Without a check installed (the CLI, tests,
benches) `checkpoint()` costs one thread-local lookup and never raises.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_local = threading.local()


class Cancelled(Exception):
    """Nobody wants this computation's result any more; it stopped at a checkpoint."""


class DeadlinePassed(Cancelled):
    """The computation ran past the time it was given (`until`): whoever asked may still want the work
    finished before it, unlike a plain Cancelled, whose requesters have all left."""


def stop_requested() -> bool:
    """Whether the check installed for this thread (if any) says to stop."""
    check: Callable[[], bool] | None = getattr(_local, "check", None)
    return check is not None and check()


def checkpoint() -> None:
    """Raise Cancelled when this thread's computation is no longer wanted, DeadlinePassed when it has
    run past the deadline set for it (`until`)."""
    if stop_requested():
        raise Cancelled("the computation was stopped: every session that asked for it has left")
    deadline: float | None = getattr(_local, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlinePassed("the computation ran past its time budget")


@contextmanager
def stop_when(check: Callable[[], bool]) -> Iterator[None]:
    """Within the block, checkpoint() in this thread raises Cancelled once `check()` is true."""
    previous = getattr(_local, "check", None)
    _local.check = check
    try:
        yield
    finally:
        _local.check = previous


@contextmanager
def until(deadline: float) -> Iterator[None]:
    """Within the block, checkpoint() in this thread also raises DeadlinePassed once time.monotonic()
    passes `deadline` (an earlier deadline set outside still holds)."""
    previous: float | None = getattr(_local, "deadline", None)
    _local.deadline = deadline if previous is None else min(previous, deadline)
    try:
        yield
    finally:
        _local.deadline = previous
