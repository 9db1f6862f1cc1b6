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

The store is a cache, never a single point of failure (issue 35): when it cannot be opened, read or
written (a full disk, a read-only or corrupted database), the process computes without it, logs why once
and says so on the page (`problem`), and tries the store again a little later. A setting that can never
work (a file, /proc, a symbolic link loop, /dev/null) stops the server at start with the setting's name.
A computation's lock is a lease its owner renews while it computes: a process that died mid-computation
(kill -9) leaves a lock that expires within LEASE_SECONDS, and one on this host is released at once
when its process no longer exists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import diskcache

import qcore
from qcore.cancel import checkpoint
from qcore.files import parse_whole_number, shorten

STORE_ENV = "QCORE_RESULT_STORE"
STORE_SIZE_ENV = "QCORE_RESULT_STORE_MB"
DEFAULT_SIZE_MB = 2048
LEASE_SECONDS = 10  # a computation's lock expires this long after its owner last renewed it
RETRY_SECONDS = 30  # a store that failed is tried again after this long
# what a store that cannot be used raises: SQLite's errors (full, read-only, corrupted, locked), the
# file system's, and diskcache's own timeout
STORE_ERRORS = (sqlite3.Error, OSError, diskcache.Timeout)
Result = TypeVar("Result")
log = logging.getLogger("qlab")
_HOST = socket.gethostname()


class StoreConfigError(ValueError):
    """The store's setting is wrong: the server refuses to serve and names it."""


def _owner() -> str:
    return f"{_HOST}|{os.getpid()}|{threading.get_ident()}"


def _owner_is_gone(owner: object) -> bool:
    """Whether a lock's owner is a process of this host that no longer exists (another host's: unknown)."""
    if not isinstance(owner, str) or owner.count("|") != 2:
        return False
    host, pid, _thread = owner.split("|")
    if host != _HOST or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, as another user's process
        return False
    return False


class ResultStore:
    def __init__(self, directory: str | os.PathLike[str], size_limit_bytes: int) -> None:
        self.directory = Path(directory)
        self.size_limit = size_limit_bytes
        self.cache: diskcache.Cache | None = None
        self.problem = ""  # why the store is not used right now ('' while it works)
        self.failed_at = 0.0
        self._lock = threading.Lock()
        self._open()

    def _open(self) -> bool:
        try:
            self.cache = diskcache.Cache(
                str(self.directory), size_limit=self.size_limit, eviction_policy="least-recently-stored"
            )
        except STORE_ERRORS as error:
            self._failed("cannot be opened", error)
            return False
        return True

    def _failed(self, what: str, error: BaseException) -> None:
        problem = f"the result store {what} ({type(error).__name__}: {shorten(error, 120)})"
        with self._lock:
            first = not self.problem
            self.problem, self.failed_at = problem, time.monotonic()
        if first:  # the operator's log says why, once per outage
            log.warning("%s; computing without it until it works again", problem)

    def _usable(self) -> diskcache.Cache | None:
        """The cache when it works or is due another try; None while it failed recently."""
        with self._lock:
            if self.problem and time.monotonic() - self.failed_at < RETRY_SECONDS:
                return None
        if self.cache is None and not self._open():
            return None
        return self.cache

    def _worked(self) -> None:
        if self.problem:
            with self._lock:
                self.problem = ""
            log.warning("the result store works again")

    def _call(self, what: str, action: Callable[[diskcache.Cache], Result], default: Result) -> Result:
        cache = self._usable()
        if cache is None:
            return default
        try:
            result = action(cache)
        except STORE_ERRORS as error:
            self._failed(what, error)
            return default
        self._worked()
        return result

    @staticmethod
    def key(kind: str, fingerprint: str, data_id: str, config_json: str, *extra: object) -> str:
        """One string for everything a result depends on, qcore's code version included."""
        parts = [kind, fingerprint, data_id, config_json, *map(str, extra), qcore.code_version()]
        return f"{kind}:" + hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def get(self, key: str) -> object | None:
        return self._call("cannot be read", lambda cache: cache.get(key, default=None, retry=True), None)

    def has(self, key: str) -> bool:
        """Whether a result is stored under `key`, without reading it (False while the store fails)."""
        return self._call("cannot be read", lambda cache: key in cache, False)

    def put(self, key: str, value: object) -> None:
        self._call("cannot be written", lambda cache: cache.set(key, value, retry=True), None)

    def _take(self, lock: str, owner: str) -> bool | None:
        """Take the lock (True), or see it held by a live owner (False); None when the store failed."""

        def take(cache: diskcache.Cache) -> bool:
            if cache.add(lock, owner, expire=LEASE_SECONDS, retry=True):
                return True
            holder = cache.get(lock, default=None, retry=True)
            if _owner_is_gone(holder):  # its process died mid-computation: nobody will release it
                log.warning("released a lock of a process that no longer exists (%s)", shorten(holder, 60))
                cache.delete(lock, retry=True)
                return bool(cache.add(lock, owner, expire=LEASE_SECONDS, retry=True))
            return False

        return self._call("cannot be written", take, None)

    def compute(self, key: str, compute: Callable[[], Result]) -> Result:
        """The stored result, or `compute()` stored: one process computes a key at a time, and a process
        that waited for another reads its result instead of computing it again. While waiting, the
        caller's cancellation check stops the wait (qcore.cancel); a store that fails is left out."""
        found = self.get(key)
        if found is not None:
            return found  # type: ignore[return-value]
        lock, owner = f"lock|{key}", _owner()
        while True:
            taken = self._take(lock, owner)
            if taken is None:  # no store: compute here
                return compute()
            if taken:
                break
            checkpoint()  # everyone who asked has left: stop waiting
            time.sleep(0.1)  # another process computes it: wait, then read what it stored
            found = self.get(key)
            if found is not None:
                return found  # type: ignore[return-value]
        renewing = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(lock, renewing), daemon=True)
        renewer.start()
        try:
            found = self.get(key)  # stored between our first look and taking the lock
            if found is not None:
                return found  # type: ignore[return-value]
            result = compute()
            self.put(key, result)
            return result
        finally:
            renewing.set()
            renewer.join()
            self._call("cannot be written", lambda cache: cache.delete(lock, retry=True), None)

    def _renew(self, lock: str, done: threading.Event) -> None:
        """Keep the lease while the computation runs (a third of the lease between renewals)."""
        while not done.wait(LEASE_SECONDS / 3):
            self._call("cannot be written", lambda cache: cache.touch(lock, expire=LEASE_SECONDS, retry=True), None)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


def result_key(kind: str, fingerprint: str, data_id: str, *rest: object) -> str:
    """The store's key of a result: its kind, the model, the data's content id and what else it depends
    on (the config JSON first), as every replica (ui.cache) and `python -m qcore prepare` compute it."""
    return ResultStore.key(kind, fingerprint, data_id, json.dumps(list(rest), default=str))


def checked_store_folder(folder: str, setting: str = STORE_ENV) -> Path:
    """The store's folder (or another a server writes files in, named by `setting`), or StoreConfigError
    naming the setting when no file could ever live there: a symbolic link loop, a file (/dev/null
    included), a folder where no file can be created (/proc)."""
    where = f"{setting}={shorten(folder, 80)!r}"
    try:
        path = Path(folder).resolve()
    except (OSError, RuntimeError) as error:  # RuntimeError: a symbolic link loop (Python 3.11)
        raise StoreConfigError(f"{where} cannot be resolved ({shorten(error, 80)})") from None
    if path.exists() and not path.is_dir():
        raise StoreConfigError(f"{where} is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(prefix=".qlab-probe-", dir=path)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        raise StoreConfigError(f"{where}: no file can be created there ({shorten(error.strerror, 60)})") from None
    return path


def store_from_environment() -> ResultStore | None:
    """The store QCORE_RESULT_STORE names (created if missing), sized by QCORE_RESULT_STORE_MB; None
    when unset. A bad size or a folder where no store can ever live stops the server with the setting's
    name, like the gate's setting; a store that exists but fails (corrupted) is left out and logged."""
    folder = os.environ.get(STORE_ENV, "").strip()
    if not folder:
        return None
    size = store_size_bytes()
    path = checked_store_folder(folder)
    log.info("result store at %s, at most %d MB", path, size // 2**20)
    return ResultStore(path, size)


def store_size_bytes() -> int:
    """The store's bound, QCORE_RESULT_STORE_MB megabytes (DEFAULT_SIZE_MB unset); StoreConfigError
    naming the setting when it is not a whole number from 16 to 1,000,000."""
    size = os.environ.get(STORE_SIZE_ENV, "").strip()
    megabytes = DEFAULT_SIZE_MB if not size else parse_whole_number(size, 16, 1_000_000)
    if megabytes is None:
        raise StoreConfigError(f"{STORE_SIZE_ENV} must be a whole number of megabytes, 16 to 1000000 (got {size!r})")
    return megabytes * 2**20
