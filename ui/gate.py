"""A bounded number of computations at once for the whole server, first come first served.

Every session's script runs in its own thread of one process. Without a bound, six sessions asking
for six new configs start six calibrations at once and each finishes late; with it, they run a few at
a time and each waiting session is told its place in the line instead of showing a frozen page.
Identical work asked for while it is running is not queued again: the asker waits for that run and
then reads the shared cache.

Abandoned work stops: each computation knows who asked for it (a session id) and, through
`is_present`, whether they are still there. A waiting asker who has left leaves the line at the next
poll; a running computation whose every asker has left raises qcore.cancel.Cancelled at its next
checkpoint (qcore calls one per batch or optimizer step), which frees its slot within a batch.

No Streamlit here (the caller passes a callback that shows the wait), so the rules are testable.
"""

from __future__ import annotations

import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

import torch

from qcore import cancel
from qcore.files import parse_whole_number

SLOTS_VARIABLE = "QCORE_MAX_COMPUTATIONS"
MAX_SLOTS = 64
DONE_MEMORY = 4096  # keys remembered as computed (the caches behind them hold far fewer)
POLL_SECONDS = 0.25  # how often a waiting session's message is refreshed


class GateConfigError(ValueError):
    """QCORE_MAX_COMPUTATIONS is not a whole number from 1 to MAX_SLOTS."""


CORES_VARIABLE = "QCORE_CORES"  # the cores this process may use; deploy/serve gives each replica its share


def process_cores() -> int:
    """QCORE_CORES when it is a whole number from 1 to 1024, else every core the machine has."""
    share = parse_whole_number(os.environ.get(CORES_VARIABLE, "").strip(), 1, 1024)
    return share or os.cpu_count() or 1


def default_slots(cores: int | None = None) -> int:
    """Half the cores, and at least two. Measured by bench/bench_gate.py on the 2-core reference
    machine, six sessions asking for six new reports at once, in multiples of one report alone
    (1.18 s): unbounded, the mean wait was 5.8x and the last 5.9x; two at a time, mean 3.7x and last
    5.5x; one at a time, mean 3.8x but last 6.4x, and a long sweep would block everyone."""
    return max(2, (cores or process_cores()) // 2)


def slots_from_environment(environ: dict[str, str] | None = None) -> int:
    raw = (os.environ if environ is None else environ).get(SLOTS_VARIABLE, "").strip()
    if not raw:
        return default_slots()
    slots = parse_whole_number(raw, 1, MAX_SLOTS)
    if slots is None:
        raise GateConfigError(
            f"{SLOTS_VARIABLE} must be a whole number from 1 to {MAX_SLOTS} in ASCII digits (got {raw[:20]!r})"
        )
    return slots


def threads_per_computation(slots: int, cores: int | None = None) -> int:
    """The cores shared among the slots, but at least two (capped at the cores): a report alone runs
    at its fastest on two threads, and two slots of two threads each on two cores measured the same
    as two slots of one thread (last of six at 5.52x vs 5.50x)."""
    cores = cores or process_cores()
    return min(cores, max(2, cores // slots))


Wait = Callable[[str], None]
Presence = Callable[[Hashable], bool]
_ANONYMOUS = object()  # an asker who did not say who they are (tests, scripts): always present


class Gate:
    """At most `slots` computations run at once; others wait in arrival order."""

    def __init__(self, slots: int, is_present: Presence | None = None) -> None:
        if slots < 1:
            raise ValueError(f"a gate needs at least one slot (got {slots})")
        self.slots = slots
        self._is_present = is_present or (lambda _requester: True)
        self._requesters: dict[Hashable, Counter[Hashable]] = {}  # key -> who asked for it, how often
        self._lock = threading.Condition()
        self._running = 0
        self._line: list[object] = []  # tickets of waiting computations, oldest first
        self._in_flight: dict[Hashable, threading.Event] = {}
        self._done: OrderedDict[Hashable, None] = OrderedDict()
        self._held = threading.local()  # a thread inside a slot does not queue again (nested calls)

    def waiting(self) -> int:
        with self._lock:
            return len(self._line)

    def running(self) -> int:
        with self._lock:
            return self._running

    def is_done(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._done

    def abandoned(self, key: Hashable) -> bool:
        """Whether everyone who asked for `key` has left (never while an anonymous asker waits for it)."""
        with self._lock:
            requesters = list(self._requesters.get(key, ()))
        return bool(requesters) and not any(r is _ANONYMOUS or self._is_present(r) for r in requesters)

    @contextmanager
    def interest(self, key: Hashable, requester: Hashable | None) -> Iterator[None]:
        """`requester` wants `key`'s result for the block (None: an anonymous asker, who never leaves)."""
        requester = _ANONYMOUS if requester is None else requester
        with self._lock:
            self._requesters.setdefault(key, Counter())[requester] += 1
        try:
            yield
        finally:
            with self._lock:
                counts = self._requesters[key]
                counts[requester] -= 1
                if counts[requester] <= 0:
                    del counts[requester]
                if not counts:
                    del self._requesters[key]

    @contextmanager
    def slot(self, on_wait: Wait | None = None) -> Iterator[None]:
        """Hold one of the slots for the block; `on_wait` is told the place in line while waiting."""
        if getattr(self._held, "depth", 0):
            self._held.depth += 1
            try:
                yield
            finally:
                self._held.depth -= 1
            return
        ticket = object()
        shown_place = None
        with self._lock:
            self._line.append(ticket)
        try:
            while True:
                cancel.checkpoint()  # outside the lock, every poll: an asker who has left leaves the line
                with self._lock:
                    if self._running < self.slots and self._line[0] is ticket:
                        self._line.pop(0)
                        self._running += 1
                        self._lock.notify_all()  # the next in line may start too when slots remain
                        break
                    place, running = self._line.index(ticket) + 1, self._running
                    if place == shown_place or on_wait is None:
                        self._lock.wait(POLL_SECONDS)
                        continue
                shown_place = place
                # outside the lock: showing may raise (Streamlit stops a run whose user moved on)
                on_wait(f"The server is busy: yours is number {place} in line ({running} running now).")
        except BaseException:
            with self._lock:
                if ticket in self._line:
                    self._line.remove(ticket)
                    self._lock.notify_all()
            raise
        self._held.depth = 1
        try:
            yield
        finally:
            self._held.depth = 0
            with self._lock:
                self._running -= 1
                self._lock.notify_all()

    @contextmanager
    def turn(self, key: Hashable, on_wait: Wait | None = None, requester: Hashable | None = None) -> Iterator[None]:
        """Run the block for `key`: at once when `key` was computed before (the cache answers) or when
        this thread already holds a slot; after the same key's run in another session finishes; else
        in a slot, in line. Inside it, qcore's checkpoints stop the work once everyone who asked for
        `key` (`requester` and any session waiting for the same run) has left."""
        if getattr(self._held, "depth", 0):
            yield
            return
        with self.interest(key, requester), cancel.stop_when(lambda: self.abandoned(key)):
            with self._turn(key, on_wait):
                yield

    @contextmanager
    def _turn(self, key: Hashable, on_wait: Wait | None) -> Iterator[None]:
        while True:
            cancel.checkpoint()  # a run abandoned by all is not started again by one who left too
            with self._lock:
                if key in self._done:
                    finished = None
                    break
                running_elsewhere = self._in_flight.get(key)
                if running_elsewhere is None:  # this session computes it (or retries a failed run)
                    finished = self._in_flight[key] = threading.Event()
                    break
            if on_wait is not None and not running_elsewhere.wait(POLL_SECONDS):
                on_wait("Another session is computing these same results; they will be shared.")
            while not running_elsewhere.wait(POLL_SECONDS):
                cancel.checkpoint()  # everyone who asked has left: stop waiting for it
        if finished is None:
            yield  # computed before: the cache answers
            return
        try:
            with self.slot(on_wait):
                yield
            with self._lock:
                self._done[key] = None
                while len(self._done) > DONE_MEMORY:
                    self._done.popitem(last=False)
        finally:
            with self._lock:
                self._in_flight.pop(key, None)
            finished.set()


def configure_torch_threads(slots: int) -> int:
    """Share the cores among the slots, so concurrent computations do not oversubscribe them."""
    threads = threads_per_computation(slots)
    torch.set_num_threads(threads)
    return threads
