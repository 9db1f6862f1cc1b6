"""The shared result store (issue 20): keyed by content, shared by processes, bounded in size."""

from __future__ import annotations

import multiprocessing
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import qcore
import qcore.data
from qcore.data import Dataset, Split, with_input_scale
from qcore.store import ResultStore, StoreConfigError, store_from_environment
from tests.store_worker import compute_once


def _dataset(seed: int, folder_note: str = "") -> Dataset:
    """A tiny dataset whose content hash is the hash of its own pixels (as load_split computes it)."""
    import hashlib

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.arange(4)
    digest = hashlib.sha256(pixels.numpy().tobytes())
    digest.update(labels.numpy().tobytes())
    split = Split(pixels.float().unsqueeze(1), labels, digest.hexdigest()[:16])
    return Dataset(split, split)


def test_a_key_changes_with_the_data_the_model_the_config_and_the_code(monkeypatch):
    data, other = _dataset(0), _dataset(1)
    key = ResultStore.key("report", "mnist-net-abc", data.content_id, '{"weight_bits": 4}')
    assert key == ResultStore.key("report", "mnist-net-abc", _dataset(0).content_id, '{"weight_bits": 4}')
    assert key != ResultStore.key("report", "mnist-net-abc", other.content_id, '{"weight_bits": 4}')
    assert key != ResultStore.key("report", "mnist-net-abd", data.content_id, '{"weight_bits": 4}')
    assert key != ResultStore.key("report", "mnist-net-abc", data.content_id, '{"weight_bits": 3}')
    assert key != ResultStore.key("sweep", "mnist-net-abc", data.content_id, '{"weight_bits": 4}')
    raw = with_input_scale(data, "raw")
    assert key != ResultStore.key("report", "mnist-net-abc", raw.content_id, '{"weight_bits": 4}')
    other_spec = replace(data, spec=replace(data.spec, name="fashion-mnist"))
    assert key != ResultStore.key("report", "mnist-net-abc", other_spec.content_id, '{"weight_bits": 4}')
    monkeypatch.setattr(qcore, "code_version", lambda: "9.9.9+elsewhere")
    assert key != ResultStore.key("report", "mnist-net-abc", data.content_id, '{"weight_bits": 4}')


def test_the_data_id_holds_no_path_and_follows_the_files_content(mnist, tmp_path):
    """The same MNIST files read from another folder give the same id; the id never names a folder."""
    import shutil

    from qcore.data import load_dataset

    copy = tmp_path / "MNIST" / "raw"
    copy.mkdir(parents=True)
    for path in (Path(qcore.data.data_dir()) / "MNIST" / "raw").glob("*-ubyte"):
        shutil.copy(path, copy / path.name)
    again = load_dataset("mnist", tmp_path, download=False)
    assert again is not mnist and again.content_id == mnist.content_id
    assert str(tmp_path) not in again.content_id and "/" not in again.content_id
    assert again.test.content_hash != again.train.content_hash


@pytest.mark.slow
def test_two_processes_asking_for_one_new_result_compute_it_once(tmp_path):
    log = tmp_path / "log"
    context = multiprocessing.get_context("spawn")  # fresh interpreters, as two replicas are
    results = context.Queue()
    workers = [
        context.Process(target=compute_once, args=(str(tmp_path / "store"), str(log), "report:k", results), name=n)
        for n in ("a", "b")
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert [results.get(timeout=5), results.get(timeout=5)] == ["the result", "the result"]
    assert log.read_text() == "computed\n"  # one computation; the other process read it
    store = ResultStore(tmp_path / "store", 64 * 1024 * 1024)
    assert store.get("report:k-49-a") == list(range(49)) and store.get("report:k-49-b") == list(range(49))
    assert store.get("lock|report:k") is None  # the lock is gone once the result is stored


def test_the_store_keeps_to_its_size(tmp_path):
    store = ResultStore(tmp_path, 1024 * 1024)
    for index in range(40):
        store.put(f"key{index}", bytes(100_000))  # 4 MB in all into 1 MB
    assert store.cache.volume() < 1.5 * 1024 * 1024
    assert store.get("key0") is None and store.get("key39") == bytes(100_000)  # the oldest went first


def test_the_store_is_configured_by_its_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("QCORE_RESULT_STORE", raising=False)
    assert store_from_environment() is None
    monkeypatch.setenv("QCORE_RESULT_STORE", str(tmp_path / "results"))
    monkeypatch.setenv("QCORE_RESULT_STORE_MB", "64")
    store = store_from_environment()
    assert store is not None and (tmp_path / "results").is_dir() and store.cache.size_limit == 64 * 1024 * 1024
    monkeypatch.setenv("QCORE_RESULT_STORE_MB", "²")
    with pytest.raises(StoreConfigError, match="QCORE_RESULT_STORE_MB must be a whole number"):
        store_from_environment()


# --- faults (issue 35): the store is a cache, never a single point of failure ------------------------


def test_a_lock_whose_owner_was_killed_delays_nobody(tmp_path):
    """kill -9 of a process computing a key under the store's lock: another process asking for the same
    key computes it at once (the owner is gone from this host), not after the lock's expiry."""
    import os
    import signal
    import time

    from tests.store_worker import hold_lock_and_die

    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    holder = context.Process(target=hold_lock_and_die, args=(str(tmp_path), "report:k", ready))
    holder.start()
    assert ready.wait(60)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    store = ResultStore(tmp_path, 64 * 1024 * 1024)
    assert store.get("lock|report:k") is not None  # the dead process's lock is still there
    started = time.monotonic()
    assert store.compute("report:k", lambda: "computed here") == "computed here"
    assert time.monotonic() - started < 2


def test_a_lock_is_a_lease_its_owner_renews(tmp_path, monkeypatch):
    """A lock of a process that cannot be checked (another host's) expires unless renewed: a computation
    longer than the lease keeps its lock, and a lock nobody renews is gone after the lease."""
    import threading
    import time

    import qcore.store

    monkeypatch.setattr(qcore.store, "LEASE_SECONDS", 0.6)
    store = ResultStore(tmp_path, 64 * 1024 * 1024)
    seen: list[object] = []

    def slow() -> str:
        time.sleep(1.5)  # more than twice the lease
        seen.append(store.get("lock|report:k"))
        return "done"

    assert store.compute("report:k", slow) == "done" and seen[0] is not None
    store.cache.add("lock|report:other", "elsewhere|1|1", expire=0.6)
    time.sleep(0.8)
    assert store.get("lock|report:other") is None
    assert threading.active_count() < 50


def test_waiting_for_another_process_stops_when_the_asker_has_left(tmp_path):
    from qcore.cancel import Cancelled, stop_when

    store = ResultStore(tmp_path, 64 * 1024 * 1024)
    store.cache.add("lock|report:k", "elsewhere|1|1", expire=60)  # computed by a live replica elsewhere
    with stop_when(lambda: True), pytest.raises(Cancelled):
        store.compute("report:k", lambda: "never")


@pytest.mark.parametrize(
    "error",
    ["database or disk is full", "attempt to write a readonly database", "disk I/O error"],
)
def test_a_store_that_cannot_be_written_is_left_out_and_logged_once(tmp_path, monkeypatch, caplog, error):
    """SQLite's own errors for a full disk, a read-only database and a failing disk (injected where SQLite
    raises them: these tests run as root, whom permissions do not stop): the result is computed and
    returned, the problem is kept for the page, and the log says why once; later calls skip the store."""
    import sqlite3

    import diskcache

    store = ResultStore(tmp_path, 64 * 1024 * 1024)
    calls = []

    def failing(*args, **kwargs):
        calls.append(args)
        raise sqlite3.OperationalError(error)

    monkeypatch.setattr(diskcache.Cache, "set", failing)
    monkeypatch.setattr(diskcache.Cache, "add", failing)
    with caplog.at_level("WARNING", logger="qlab"):
        assert store.compute("report:a", lambda: "first") == "first"
        assert store.compute("report:b", lambda: "second") == "second"
        store.put("report:c", "third")
    assert error in store.problem
    assert [r.getMessage() for r in caplog.records if error in r.getMessage()] == [
        f"the result store cannot be written (OperationalError: {error}); computing without it until it works again"
    ]
    assert len(calls) == 1  # the store was left out after its first failure


def test_a_store_that_works_again_is_used_again(tmp_path, monkeypatch):
    import sqlite3

    import diskcache

    import qcore.store

    store = ResultStore(tmp_path, 64 * 1024 * 1024)
    real = diskcache.Cache.set
    monkeypatch.setattr(diskcache.Cache, "set", lambda *a, **k: (_ for _ in ()).throw(sqlite3.OperationalError("full")))
    store.put("k", 1)
    assert store.problem
    monkeypatch.setattr(diskcache.Cache, "set", real)
    monkeypatch.setattr(qcore.store, "RETRY_SECONDS", 0)
    store.put("k", 2)
    assert store.problem == "" and store.get("k") == 2


def test_a_corrupted_store_is_left_out_and_everything_is_computed(tmp_path):
    (tmp_path / "cache.db").write_bytes(b"this is not a database" * 100)
    store = ResultStore(tmp_path, 64 * 1024 * 1024)
    assert "cannot be opened" in store.problem and "DatabaseError" in store.problem
    assert store.get("report:k") is None
    assert store.compute("report:k", lambda: "computed") == "computed"


@pytest.mark.parametrize("kind", ["a file", "/dev/null", "/proc", "a symbolic link loop", "a file's child"])
def test_a_store_setting_that_can_never_work_stops_the_server_naming_it(tmp_path, monkeypatch, kind):
    import os

    (tmp_path / "file").write_text("x")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    folder = {
        "a file": tmp_path / "file",
        "/dev/null": "/dev/null",
        "/proc": "/proc",
        "a symbolic link loop": tmp_path / "loop",
        "a file's child": tmp_path / "file" / "results",
    }[kind]
    monkeypatch.setenv("QCORE_RESULT_STORE", str(folder))
    monkeypatch.delenv("QCORE_RESULT_STORE_MB", raising=False)
    with pytest.raises(StoreConfigError, match="^QCORE_RESULT_STORE="):
        store_from_environment()


def test_has_says_whether_a_key_is_stored_without_reading_it(tmp_path):
    store = ResultStore(tmp_path, 64 * 1024 * 1024)
    store.put("report:a", {"accuracy": 0.98})
    assert store.has("report:a") and not store.has("report:b")
    (tmp_path / "broken").write_bytes(b"")
    broken = ResultStore(tmp_path / "broken", 64 * 1024 * 1024)  # a file where a folder should be
    assert not broken.has("report:a") and broken.problem
