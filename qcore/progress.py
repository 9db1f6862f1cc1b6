"""How far a long computation has got: the loops that take minutes (AdaRound's steps, block
reconstruction's) report the fraction of their work done, so that a page can show progress and an
estimate of the time left instead of a spinner.

qcore knows nothing of pages. A caller that shows progress installs, for the thread that runs a
computation, a callback `(fraction done, what is being done)` with `reporting`; the work is split into
nested `part`s (a layer of four, then the steps within it), each mapping its own [0, 1] onto its share of
the whole. Without a callback installed (the CLI, tests, benches), `report` and `part` cost one
thread-local lookup.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_local = threading.local()


@contextmanager
def reporting(callback: Callable[[float, str], None]) -> Iterator[None]:
    """Within the block, report() in this thread calls `callback(fraction of the whole, what)`."""
    previous = getattr(_local, "callback", None), getattr(_local, "parts", None)
    _local.callback, _local.parts = callback, [(0.0, 1.0, "")]
    try:
        yield
    finally:
        _local.callback, _local.parts = previous


@contextmanager
def part(index: int, count: int, what: str) -> Iterator[None]:
    """Within the block, report()'s fraction is of the `index`-th of `count` equal parts of the
    enclosing work, described as `what`."""
    parts: list[tuple[float, float, str]] | None = getattr(_local, "parts", None)
    if parts is None:
        yield
        return
    start, width, _what = parts[-1]
    parts.append((start + width * index / count, width / count, what))
    try:
        yield
    finally:
        parts.pop()


def report(fraction: float) -> None:
    """The innermost part is `fraction` done (clamped to [0, 1])."""
    callback: Callable[[float, str], None] | None = getattr(_local, "callback", None)
    if callback is None:
        return
    start, width, what = _local.parts[-1]
    callback(start + width * min(max(fraction, 0.0), 1.0), what)
