"""Stopping abandoned work: long computations call `checkpoint()` once per batch or step.

qcore knows nothing of sessions. A caller that serves people (the dashboard) installs, for the
thread that runs a computation, a check that says whether anyone still wants the result; when it
says no, the next checkpoint raises `Cancelled`, so a computation whose every requester has left
stops within one batch instead of running to the end. Without a check installed (the CLI, tests,
benches) `checkpoint()` costs one thread-local lookup and never raises.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_local = threading.local()


class Cancelled(Exception):
    """Nobody wants this computation's result any more; it stopped at a checkpoint."""


def stop_requested() -> bool:
    """Whether the check installed for this thread (if any) says to stop."""
    check: Callable[[], bool] | None = getattr(_local, "check", None)
    return check is not None and check()


def checkpoint() -> None:
    """Raise Cancelled when this thread's computation is no longer wanted."""
    if stop_requested():
        raise Cancelled("the computation was stopped: every session that asked for it has left")


@contextmanager
def stop_when(check: Callable[[], bool]) -> Iterator[None]:
    """Within the block, checkpoint() in this thread raises Cancelled once `check()` is true."""
    previous = getattr(_local, "check", None)
    _local.check = check
    try:
        yield
    finally:
        _local.check = previous
