"""The shared result store: every computed result on disk, keyed by what it is computed from, so that
the server's replicas share each computation, a restart keeps them, and new code never serves an old one.

A key is the kind of result, the model's fingerprint (its weights), the data's content id (dataset,
scaling and the hash of its pixels and labels: never the server's path), the config JSON, anything else
the result depends on, and qcore's code version. The store is `diskcache` (SQLite and files, made for
several processes at once), bounded in size, least recently stored evicted first. Two replicas asking
for the same new result at once: the first computes it under a cross-process lock, the second waits
for it and reads it.

QCORE_RESULT_STORE names its folder (deploy/serve sets one for its replicas); unset, each process has
only its in-process caches. The folder must be the server's own: diskcache unpickles what it reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import diskcache

import qcore
from qcore.files import parse_whole_number

STORE_ENV = "QCORE_RESULT_STORE"
STORE_SIZE_ENV = "QCORE_RESULT_STORE_MB"
DEFAULT_SIZE_MB = 2048
LOCK_SECONDS = 900  # a lock left by a replica that died mid-computation frees itself after this
Result = TypeVar("Result")
log = logging.getLogger("qlab")


class StoreConfigError(ValueError):
    """The store's setting is wrong: the server refuses to serve and names it."""


class ResultStore:
    def __init__(self, directory: str | os.PathLike[str], size_limit_bytes: int) -> None:
        self.directory = Path(directory)
        self.cache = diskcache.Cache(
            str(directory), size_limit=size_limit_bytes, eviction_policy="least-recently-stored"
        )

    @staticmethod
    def key(kind: str, fingerprint: str, data_id: str, config_json: str, *extra: object) -> str:
        """One string for everything a result depends on, qcore's code version included."""
        parts = [kind, fingerprint, data_id, config_json, *map(str, extra), qcore.code_version()]
        return f"{kind}:" + hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def get(self, key: str) -> object | None:
        return self.cache.get(key, default=None, retry=True)

    def put(self, key: str, value: object) -> None:
        self.cache.set(key, value, retry=True)

    def compute(self, key: str, compute: Callable[[], Result]) -> Result:
        """The stored result, or `compute()` stored: one process computes a key at a time, and a process
        that waited for another reads its result instead of computing it again."""
        found = self.get(key)
        if found is not None:
            return found  # type: ignore[return-value]
        # add() stores only when the key is absent, atomically across processes: the one that adds computes
        while not self.cache.add(f"lock|{key}", os.getpid(), expire=LOCK_SECONDS, retry=True):
            time.sleep(0.1)  # another process computes it: wait, then read what it stored
            found = self.get(key)
            if found is not None:
                return found  # type: ignore[return-value]
        try:
            found = self.get(key)  # stored between our first look and taking the lock
            if found is not None:
                return found  # type: ignore[return-value]
            result = compute()
            self.put(key, result)
            return result
        finally:
            self.cache.delete(f"lock|{key}", retry=True)

    def close(self) -> None:
        self.cache.close()


def store_from_environment() -> ResultStore | None:
    """The store QCORE_RESULT_STORE names (created if missing), sized by QCORE_RESULT_STORE_MB; None
    when unset. A bad size stops the server with the setting's name, like the gate's setting."""
    folder = os.environ.get(STORE_ENV, "").strip()
    if not folder:
        return None
    size = os.environ.get(STORE_SIZE_ENV, "").strip()
    megabytes = DEFAULT_SIZE_MB if not size else parse_whole_number(size, 16, 1_000_000)
    if megabytes is None:
        raise StoreConfigError(f"{STORE_SIZE_ENV} must be a whole number of megabytes, 16 to 1000000 (got {size!r})")
    Path(folder).mkdir(parents=True, exist_ok=True)
    log.info("result store at %s, at most %d MB", folder, megabytes)
    return ResultStore(folder, megabytes * 1024 * 1024)
