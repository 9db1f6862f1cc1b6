"""A second process of the result store's test: it imports the store alone (not the test module, which
spawn would import again with torch and the data), like a replica asking for the same result."""

from __future__ import annotations

import multiprocessing
import time

from qcore.store import ResultStore


def compute_once(directory: str, log: str, key: str, results: multiprocessing.Queue) -> None:
    store = ResultStore(directory, 64 * 1024 * 1024)

    def slow() -> str:
        with open(log, "a") as handle:
            handle.write("computed\n")
        time.sleep(1.0)
        return "the result"

    results.put(store.compute(key, slow))
    for index in range(50):  # and many writes of their own at once
        store.put(f"{key}-{index}-{multiprocessing.current_process().name}", list(range(index)))


def hold_lock_and_die(directory: str, key: str, ready: multiprocessing.Event) -> None:
    """A replica killed mid-computation: it takes the key's lock, says so, and is killed (-9) by the test
    while it computes, so it never releases the lock."""
    store = ResultStore(directory, 64 * 1024 * 1024)

    def forever() -> str:
        ready.set()
        time.sleep(3600)
        return "never"

    store.compute(key, forever)
