"""`python -m qcore` as a user runs it: JSON output, tables, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qcore.analysis import quantize_for
from qcore.config import QuantConfig
from qcore.evaluate import evaluate


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qcore", *args], capture_output=True, text=True, timeout=300)


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


def test_evaluate_prints_a_table():
    done = run_cli("evaluate", "--float-layers", "fc2", "--calib-batches", "2")
    assert done.returncode == 0, done.stderr
    assert "float accuracy" in done.stdout and "fc1" in done.stdout


def test_sweep_json():
    done = run_cli("sweep", "--bits", "6,8", "--target", "activations", "--json")
    assert done.returncode == 0, done.stderr
    points = json.loads(done.stdout)["points"]
    assert [(p["weight_bits"], p["act_bits"]) for p in points] == [(8, 6), (8, 8)]


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


def test_bad_checkpoint_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    done = run_cli("evaluate", "--checkpoint", str(bad))
    assert done.returncode == 2 and "truncated or corrupt" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("engine", ["integer", "onnxruntime"])
def test_evaluate_with_an_integer_engine(engine, pretrained, mnist):
    done = run_cli("evaluate", "--engine", engine, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    simulated = evaluate(quantize_for(pretrained, mnist, QuantConfig()), mnist.test).accuracy
    assert result["engine"] == engine and result["simulated_accuracy"] == simulated
    assert result["agreement_with_simulation"] >= 0.999
    assert abs(result["quant_accuracy"] - simulated) <= 0.0005


def test_export_writes_files_that_load(tmp_path, pretrained, mnist):
    import onnx

    from qcore.export import load_qtensors

    qtensors, onnx_file = tmp_path / "net_q.pt", tmp_path / "net.onnx"
    assert run_cli("export", "--format", "qtensors", "--out", str(qtensors), "--weight-bits", "4").returncode == 0
    assert run_cli("export", "--format", "onnx", "--out", str(onnx_file)).returncode == 0
    assert load_qtensors(str(qtensors)).config.weight_bits == 4
    onnx.checker.check_model(str(onnx_file))
    bad = run_cli("export", "--format", "onnx", "--out", str(tmp_path / "x.onnx"), "--act-bits", "12")
    assert bad.returncode == 2 and "at most 8" in bad.stderr and "Traceback" not in bad.stderr
