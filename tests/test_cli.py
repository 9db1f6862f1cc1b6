"""`python -m qcore` as a user runs it: JSON output, tables, and one-line errors with exit code 2."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from qcore.analysis.tables import quantize_for
from qcore.inference.evaluate import evaluate
from qcore.quantize.config import QuantConfig
from tests.conftest import run_cli


@pytest.mark.slow
def test_evaluate_json(pretrained, mnist, float_eval):
    done = run_cli("evaluate", "--weight-bits", "4", "--act-bits", "5", "--observer", "percentile", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    expected = evaluate(quantize_for(pretrained, mnist, QuantConfig(4, 5, observer="percentile")), mnist.test)
    assert result["float_accuracy"] == float_eval.accuracy
    assert result["quant_accuracy"] == expected.accuracy
    assert result["config"]["weight_bits"] == 4 and result["config"]["observer"] == "percentile"
    layer = result["layers"][0]
    assert layer["layer"] == "conv1" and len(layer["weight_scale"]) == 20
    for key in (
        "weight_zero_point",
        "act_observed_min",
        "act_observed_max",
        "act_clip_min",
        "act_clip_max",
        "weight_sqnr_db",
        "act_sqnr_db",
    ):
        assert key in layer


@pytest.mark.slow
def test_evaluate_prints_a_table():
    """`python -m qcore` itself, as a user runs it (the other tests call its main in-process)."""
    done = run_cli("evaluate", "--float-layers", "fc2", "--calib-batches", "2", process=True)
    assert done.returncode == 0, done.stderr
    assert "float accuracy" in done.stdout and "fc1" in done.stdout


@pytest.mark.slow
def test_sweep_json():
    done = run_cli("sweep", "--bits", "6,8", "--target", "activations", "--json")
    assert done.returncode == 0, done.stderr
    points = json.loads(done.stdout)["points"]
    assert [(p["weight_bits"], p["act_bits"]) for p in points] == [(8, 6), (8, 8)]


@pytest.mark.slow
def test_train_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "tiny.pt"
    done = run_cli("train", "--epochs", "1", "--train-samples", "256", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["checkpoint"] == str(out)
    assert "epoch 1/1" in done.stderr  # progress
    assert run_cli("evaluate", "--checkpoint", str(out), "--calib-batches", "1").returncode == 0


@pytest.mark.parametrize(
    "args,needle",
    [
        (["evaluate", "--weight-bits", "1"], "between 2 and 16"),
        (["evaluate", "--observer", "magic"], "invalid choice"),
        (["evaluate", "--float-layers", "fc9"], "unknown layer"),
        (["evaluate", "--checkpoint", "/nonexistent.pt"], "no such checkpoint"),
        (["evaluate", "--data-dir", "/nonexistent-dir"], "no such folder"),
        (["train", "--epochs", "0"], "epochs"),
        (["sweep", "--bits", "x-y"], "expected a range"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(args, needle):
    done = run_cli(*args)
    assert done.returncode == 2
    assert needle in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def assert_one_line_error(done: subprocess.CompletedProcess[str], needle: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcore: error: ") and needle in lines[0], done.stderr


def test_evaluate_reads_a_safetensors_state_dict(tmp_path, pretrained, float_eval):
    from safetensors.torch import save_file

    weights = tmp_path / "net.safetensors"
    save_file(dict(pretrained.state_dict()), weights)
    done = run_cli("evaluate", "--checkpoint", str(weights), "--calib-batches", "1", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["float_accuracy"] == float_eval.accuracy  # the bundled .pt's


@pytest.mark.parametrize(
    "case",
    ["one byte a", "text file", "raw pickle", "None value", "sparse tensor", "overflowing weights", "safetensors"],
)
def test_hostile_checkpoints_are_one_line(tmp_path, case):
    from tests.test_checkpoint import HOSTILE

    make, reason = HOSTILE[case]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(make())
    assert_one_line_error(run_cli("evaluate", "--checkpoint", str(bad)), reason)  # raw pickle: no torch warnings


@pytest.mark.slow
def test_zip_bomb_checkpoint_is_one_line(tmp_path):
    from tests.test_checkpoint import zip_bomb

    bomb = tmp_path / "bomb.pt"
    bomb.write_bytes(zip_bomb())
    assert_one_line_error(run_cli("evaluate", "--checkpoint", str(bomb)), "would inflate to 1073.7 MB")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["evaluate", "--seed", "99999999999999999999999"], "seed must be between 0 and 2147483647"),
        (["train", "--seed", "99999999999999999999999"], "seed must be between 0 and 2147483647"),
        (["sweep", "--bits", "2-99999999999"], "bits 2 to 16"),
        (["sweep", "--bits", "8-2"], "expected a range"),
        (["train", "--lr", "inf"], "learning rate"),
        (["train", "--out", "nodir/x.pt"], "the folder nodir does not exist"),
        (["export", "--format", "onnx", "--out", "nodir/x.onnx"], "the folder nodir does not exist"),
        (["evaluate", "--engine", "integer", "--float-layers", "fc2"], "every layer must be quantized (float: fc2)"),
        (["export", "--format", "qtensors", "--out", "x.pt", "--float-input"], "the input must be quantized"),
    ],
)
def test_arguments_are_checked_before_any_work(args, needle):
    done = run_cli(*args)
    assert_one_line_error(done, needle)
    assert "epoch" not in done.stderr  # refused before training (or calibration) started


@pytest.mark.slow
def test_existing_files_are_replaced_only_with_force(tmp_path):
    out = tmp_path / "net.onnx"
    out.write_bytes(b"precious")
    assert_one_line_error(run_cli("export", "--format", "onnx", "--out", str(out)), "exists; pass --force")
    assert_one_line_error(run_cli("train", "--epochs", "1", "--out", str(out)), "exists; pass --force")
    assert out.read_bytes() == b"precious"
    done = run_cli("export", "--format", "onnx", "--out", str(out), "--force")
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:2] != b"pr" and len(out.read_bytes()) > 100_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx"]  # no temporary left behind


def test_full_disk_leaves_the_existing_file_untouched(tmp_path, monkeypatch, capsys):
    from qcore import cli, files

    out = tmp_path / "net_q.pt"
    out.write_bytes(b"precious")

    def half_then_full(descriptor: int, data: bytes) -> None:
        os.write(descriptor, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files, "_write_all", half_then_full)
    code = cli.main(["export", "--format", "qtensors", "--out", str(out), "--force", "--calib-batches", "1"])
    stderr = capsys.readouterr().err
    assert code == 2 and "No space left on device; nothing was written" in stderr
    assert out.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["net_q.pt"]


@pytest.mark.slow
def test_ctrl_c_exits_130_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "net.pt"
    # a shell's background job starts with SIGINT ignored, and Python then installs no KeyboardInterrupt
    # handler: give the child the default disposition, as a terminal would
    process = subprocess.Popen(
        [sys.executable, "-m", "qcore", "train", "--out", str(out)],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert process.stderr is not None
    first = process.stderr.readline()  # the first progress line: training is under way
    assert first.startswith("epoch 1/3"), first
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=60) == 130
    assert rest.strip().splitlines()[-1:] == ["qcore: interrupted; nothing was written"]
    assert "Traceback" not in rest
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def data_copy(tmp_path_factory):
    """A private copy of MNIST's four files, to damage one at a time."""
    from qcore.data import data_dir

    source = data_dir() / "MNIST" / "raw"
    copy = tmp_path_factory.mktemp("mnist")
    (copy / "MNIST" / "raw").mkdir(parents=True)
    for path in source.iterdir():
        if path.name.endswith("-ubyte"):
            shutil.copyfile(path, copy / "MNIST" / "raw" / path.name)
    return copy


@pytest.mark.parametrize(
    "damage,needle",
    [
        (lambda data: data[:-1], "t10k-images-idx3-ubyte: 7840015 bytes, expected 7840016"),
        (lambda data: b"\x00\x00\x08\x02" + data[4:], "t10k-images-idx3-ubyte: magic number 0x00000802"),
    ],
)
@pytest.mark.slow
def test_damaged_data_file_is_one_line(data_copy, damage, needle):
    path = data_copy / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    original = path.read_bytes()
    path.write_bytes(damage(original))
    try:
        assert_one_line_error(run_cli("evaluate", "--data-dir", str(data_copy)), needle)
    finally:
        path.write_bytes(original)


def test_label_out_of_range_is_one_line(data_copy):
    path = data_copy / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    original = path.read_bytes()
    path.write_bytes(original[:8] + bytes([200]) + original[9:])  # the first test label becomes 200
    try:
        assert_one_line_error(run_cli("evaluate", "--data-dir", str(data_copy)), "1 label(s) outside 0..9")
    finally:
        path.write_bytes(original)


@pytest.mark.parametrize("engine", ["integer", "onnxruntime"])
@pytest.mark.slow
def test_evaluate_with_an_integer_engine(engine, pretrained, mnist):
    done = run_cli("evaluate", "--engine", engine, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    simulated = evaluate(quantize_for(pretrained, mnist, QuantConfig()), mnist.test).accuracy
    assert result["engine"] == engine and result["simulated_accuracy"] == simulated
    assert result["agreement_with_simulation"] >= 0.999
    assert abs(result["quant_accuracy"] - simulated) <= 0.0005


@pytest.mark.slow
def test_export_writes_files_that_load(tmp_path, pretrained, mnist):
    import onnx

    from qcore.export.formats import load_qtensors

    qtensors, onnx_file = tmp_path / "net_q.pt", tmp_path / "net.onnx"
    assert run_cli("export", "--format", "qtensors", "--out", str(qtensors), "--weight-bits", "4").returncode == 0
    assert run_cli("export", "--format", "onnx", "--out", str(onnx_file)).returncode == 0
    assert load_qtensors(str(qtensors)).config.weight_bits == 4
    onnx.checker.check_model(str(onnx_file))
    bad = run_cli("export", "--format", "onnx", "--out", str(tmp_path / "x.onnx"), "--act-bits", "12")
    assert bad.returncode == 2 and "at most 8" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_data_command_checks_the_folder(data_copy, tmp_path):
    done = run_cli("data", "--data-dir", str(data_copy), "--json")
    assert done.returncode == 0, done.stderr
    expected = {"dataset": "mnist", "folder": "", "train_images": 60000, "test_images": 10000}
    assert json.loads(done.stdout) | {"folder": ""} == expected
    assert_one_line_error(run_cli("data", "--data-dir", str(tmp_path)), "MNIST not found")
    assert list(tmp_path.iterdir()) == []  # looking created nothing


@pytest.mark.parametrize(
    "args,needle",
    [
        (["evaluate", "--batch-size", "1000000000", "--calib-batches", "1"], "batch_size must be between 1 and 1024"),
        (["evaluate", "--calib-batches", "1000000000"], "calib_batches must be <= 938"),
        (["sweep", "--batch-size", "2048"], "batch_size must be between 1 and 1024"),
        (["evaluate", "--weight-bits-budget", "1e9"], "weight_bits_budget must be 0 (off) or between 2 and 8"),
        (["train", "--batch-size", "1000000000"], "batch size must be between 1 and 4096"),
        (["train", "--epochs", "21"], "epochs must be between 1 and 20"),
        (["train", "--train-samples", "1000000000"], "train samples must be between 1 and 60000"),
        (["train", "--momentum", "5"], "momentum must be in [0, 1)"),
        (["qat", "--out", "q.pt", "--epochs", "6"], "epochs must be between 1 and 5"),
        (["qat", "--out", "q.pt", "--batch-size", "1000000000"], "batch size must be between 1 and 4096"),
        (["qat", "--out", "q.pt", "--train-samples", "1000000000"], "train samples must be between 1 and 58000"),
        (["qat", "--out", "q.pt", "--lr", "nan"], "learning rate"),
        (["explain", "--image", "1000000000"], "--image must be between 0 and 9999"),
    ],
)
@pytest.mark.slow
def test_every_numeric_flag_has_the_apps_bounds(args, needle):
    """Issue 16: `evaluate --batch-size 1000000000 --calib-batches 1` was accepted and took 8 GB."""
    done = run_cli(*args)
    assert_one_line_error(done, needle)
    assert "epoch 1/" not in done.stderr  # refused before training started


@pytest.mark.parametrize("target_exists", [False, True], ids=["dangling", "to-a-file"])
@pytest.mark.slow
def test_a_symbolic_link_at_out_is_replaced_only_with_force(tmp_path, target_exists):
    target = tmp_path / "elsewhere.pt"
    if target_exists:
        target.write_bytes(b"precious")
    link = tmp_path / "out.pt"
    link.symlink_to(target)
    done = run_cli("export", "--format", "qtensors", "--out", str(link), "--calib-batches", "1")
    assert_one_line_error(done, "is a symbolic link; pass --force")
    assert link.is_symlink() and os.readlink(link) == str(target)  # the link itself untouched
    assert target.exists() == target_exists and (not target_exists or target.read_bytes() == b"precious")


@pytest.fixture(scope="module")
def qat_state_from_ptq(pretrained, mnist):
    """A well-formed QAT checkpoint's contents without training: W2A2 PTQ is a QatCheckpoint's shape
    (the default config at those bits, per-channel weight scales), and load_qat accepts it as is."""
    from qcore.training.qat import QatCheckpoint, qat_state

    config = QuantConfig(weight_bits=2, act_bits=2)
    return qat_state(QatCheckpoint(pretrained, quantize_for(pretrained, mnist, config), config, {}))


@pytest.mark.parametrize(
    "case,change,needle",
    [
        ("deep-config", lambda s: s.update(config="[" * 1900 + "]" * 1900), "config nests 1900 deep"),
        ("long-int", lambda s: s.update(meta='{"seconds": ' + "9" * 5000 + "}"), "a number of 5000 digits"),
        ("float-bits", lambda s: s.update(config=s["config"].replace('"act_bits": 2', '"act_bits": 2.0')), "act_bits"),
        ("huge-scale", lambda s: s["layers"]["fc1"]["weight_scale"].fill_(1e30), "does not fit the integer engine"),
    ],
)
@pytest.mark.slow
def test_a_tampered_qat_checkpoint_is_one_line_in_every_command_and_nothing_is_written(
    tmp_path, qat_state_from_ptq, case, change, needle
):
    import copy

    import torch

    state = copy.deepcopy(qat_state_from_ptq)
    change(state)
    bad = tmp_path / f"{case}.pt"
    torch.save(state, bad)
    assert_one_line_error(run_cli("evaluate", "--checkpoint", str(bad)), needle)
    for fmt in ("qtensors", "onnx"):
        out = tmp_path / f"out.{fmt}"
        assert_one_line_error(run_cli("export", "--format", fmt, "--checkpoint", str(bad), "--out", str(out)), needle)
        assert not out.exists()


def test_the_untampered_qat_state_loads(qat_state_from_ptq, tmp_path):
    """The tampering test above starts from a checkpoint the loader accepts (its refusals are the changes')."""
    import torch

    from qcore.training.qat import load_qat

    good = tmp_path / "good.pt"
    torch.save(qat_state_from_ptq, good)
    assert load_qat(str(good)).config == QuantConfig(weight_bits=2, act_bits=2)
