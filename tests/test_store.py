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
from tests.store_worker import compute_once
from ui.store import ResultStore, StoreConfigError, store_from_environment


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
