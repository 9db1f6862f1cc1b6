"""Quantization-aware training: the STE and LSQ gradients against hand computations, the forward pass
against the simulation's quantizer, a short run on real MNIST, and the QAT checkpoint: reproducible,
strict on load, and the same model in a new process through the integer engine and ONNX Runtime."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from qcore.analysis.tables import quantize_for
from qcore.data import Split
from qcore.inference.evaluate import evaluate
from qcore.inference.integer import IntegerNet
from qcore.models.checkpoint import CheckpointError, load_state_dict, save_checkpoint
from qcore.quantize.config import QuantConfig
from qcore.quantize.quant import QParams, fake_quantize
from qcore.training.qat import QatConfig, fake_quantize_ste, load_qat, qat, qat_bytes, qat_state
from tests.conftest import run_cli

SMALL = QatConfig(epochs=1, train_samples=1024, eval_every=2)


def test_ste_passes_the_gradient_inside_the_clipping_range_and_nothing_outside():
    # s = 0.5, z = 0, levels -1..1: v = x / s = -2, -1.2, -0.4, 0.6, 1, 1.6, 2.4; inside iff -1 <= v <= 1
    x = torch.tensor([-1.0, -0.6, -0.2, 0.3, 0.5, 0.8, 1.2], requires_grad=True)
    out = fake_quantize_ste(x, torch.tensor(0.5), torch.tensor(0), -1, 1)
    out.sum().backward()
    assert out.tolist() == [-0.5, -0.5, -0.0, 0.5, 0.5, 0.5, 0.5]
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_lsq_step_size_gradient_matches_its_formula():
    """d x'/ds = round(v) - v inside, Qn below, Qp above (Esser et al. 2019, eq. 3), times g."""
    x = torch.tensor([-1.0, -0.6, -0.2, 0.3, 0.5, 0.8, 1.2])
    scale = torch.tensor(0.5, requires_grad=True)
    g = 1 / math.sqrt(7 * 1)
    fake_quantize_ste(x, scale, torch.tensor(0), -1, 1, g).sum().backward()
    # per value: below -1 -> -1, -1; inside: round(-0.4) + 0.4 = 0.4, round(0.6) - 0.6 = 0.4, 1 - 1 = 0;
    # above -> 1, 1: sum 0.8
    assert scale.grad.item() == pytest.approx(0.8 * g, rel=1e-6)

    # affine (z = 1 on [0, 3]: Qn = -1, Qp = 2) and per channel (one scale per row), upstream gradient 2
    x = torch.tensor([[-0.9, 0.26, 0.9], [3.0, -0.05, 0.4]])
    scales = torch.tensor([[0.5], [0.25]], requires_grad=True)
    fake_quantize_ste(x, scales, torch.tensor(1), 0, 3).mul(2).sum().backward()
    # row 0, s 0.5: v = -1.8 (below: -1), 0.52 (1 - 0.52), 1.8 (2 - 1.8); row 1, s 0.25: v = 12 (above: 2),
    # -0.2 (0 + 0.2), 1.6 (2 - 1.6)
    expected = [2 * (-1 + 0.48 + 0.2), 2 * (2 + 0.2 + 0.4)]
    assert scales.grad.flatten().tolist() == pytest.approx(expected, rel=1e-5)


def test_forward_is_the_simulations_quantizer_ties_included():
    generator = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(1000, generator=generator) * 3, torch.tensor([0.25, 0.75, -0.25, 1.25])])
    for zero, (qmin, qmax) in ((0, (-7, 7)), (3, (0, 15))):
        qparams = QParams(torch.tensor(0.5), torch.tensor(zero), qmin, qmax)
        ste = fake_quantize_ste(x, qparams.scale, qparams.zero_point, qmin, qmax)
        assert torch.equal(ste, fake_quantize(x, qparams))  # 0.25 / 0.5 = 0.5 rounds to 0, 1.5 to 2


@pytest.fixture(scope="module")
def short_run(pretrained, mnist):
    return qat(pretrained, mnist, SMALL)


@pytest.mark.slow
def test_a_short_qat_run_lowers_the_quantized_loss(short_run, pretrained, mnist):
    held_out = Split(mnist.train.images[-2000:], mnist.train.labels[-2000:])
    before = evaluate(quantize_for(pretrained, mnist, SMALL.quant_config()), held_out)
    after = evaluate(short_run.qnet, held_out)
    assert after.loss < before.loss
    assert short_run.held_out[-1]["accuracy"] > short_run.held_out[0]["accuracy"]
    assert short_run.losses[-1] < short_run.losses[0]


def test_the_same_seed_trains_the_same_model(short_run, pretrained, mnist):
    again = qat(pretrained, mnist, SMALL)
    trained, retrained = short_run.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(trained[key], retrained[key]) for key in trained)
    assert all(torch.equal(again.qnet.layers[n].weight_int, q.weight_int) for n, q in short_run.qnet.layers.items())


def test_the_checkpoint_loads_weights_only_and_rebuilds_the_same_model(short_run, mnist):
    raw = torch.load(io.BytesIO(qat_bytes(short_run, "mnist-net")), weights_only=True)
    assert raw["format"] == "qlab-qat/2" and json.loads(raw["model"]) == {"zoo": "mnist-net"}
    loaded = load_qat(qat_bytes(short_run, "mnist-net"))
    for name, quant in short_run.qnet.layers.items():
        assert torch.equal(loaded.qnet.layers[name].weight_int, quant.weight_int)
        assert torch.equal(loaded.qnet.layers[name].bias_int, quant.bias_int)
    images = mnist.test.images[:500]
    assert torch.equal(loaded.qnet(images), short_run.qnet(images))


def test_qat_with_edge_bits_trains_and_reloads_the_first_and_last_layers_at_8_bits(pretrained, mnist):
    config = QatConfig(weight_bits=2, act_bits=2, edge_bits=8, epochs=1, train_samples=512, eval_every=2)
    result = qat(pretrained, mnist, config)
    ranges = {n: (q.weight_bits, q.weight_qparams.qmax, q.input_qparams.qmax) for n, q in result.qnet.layers.items()}
    assert ranges == {"conv1": (8, 127, 255), "conv2": (2, 1, 3), "fc1": (2, 1, 3), "fc2": (8, 127, 255)}
    assert int(result.qnet.layers["conv1"].weight_int.abs().max()) > 1  # more levels than 2 bits have
    loaded = load_qat(qat_bytes(result, "mnist-net"))
    assert loaded.config == QuantConfig(weight_bits=2, act_bits=2, edge_bits=8)
    images = mnist.test.images[:500]
    assert torch.equal(loaded.qnet(images), result.qnet(images))
    simulated = result.qnet(images).argmax(dim=1)
    assert float((IntegerNet(loaded.qnet).predict(images) == simulated).float().mean()) >= 0.99


def test_a_collapsing_channel_step_is_held_where_the_integer_engine_can_run_it(pretrained, mnist):
    """LSQ once drove one fc1 channel's step to ~1e-10 of the rest (W2A2, batch 128, lr 2e-3): its
    requantization multiplier left TFLite's range and the trained model could not run on integers."""
    from qcore.training.qat import CHANNEL_STEP_SPAN_BITS, QatNet
    from qcore.training.qat.training import _keep_scales_deployable

    config = QatConfig(weight_bits=2, act_bits=2).quant_config()
    net = QatNet(quantize_for(pretrained, mnist, config), "lsq", pretrained)
    with torch.no_grad():
        net.weight_scales["fc1"][0] = 1e-14
        net.biases["fc1"][0] = 0.0
        _keep_scales_deployable(net)
    steps = net.weight_scales["fc1"].detach()
    assert float(steps[0]) == pytest.approx(float(steps.max()) * 2.0**-CHANNEL_STEP_SPAN_BITS)
    IntegerNet(net.quantized_net(config))  # raised IntegerEngineError (multiplier 1e-10) before the floor


def _config_with(**changes):
    return lambda state: state.update(config=json.dumps({**json.loads(state["config"]), **changes}))


def _tampered(short_run, change) -> bytes:
    state = qat_state(short_run, "mnist-net")
    change(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda s: s.update(format="qlab-qat/9"), "not a QAT checkpoint"),
        (lambda s: s.update(extra=torch.zeros(1)), "holds exactly"),
        (lambda s: s["layers"]["fc1"].update(weight_scale=-s["layers"]["fc1"]["weight_scale"]), "finite and above"),
        (lambda s: s["points"]["relu"].update(zero_point=torch.tensor(7)), "outside the 2-bit range"),  # conv2's input
        (lambda s: s["points"]["relu_2"].update(scale=torch.tensor([1.0])), "expected torch.float32 "),
        (lambda s: s["layers"].pop("conv1"), "layers must hold exactly the model's 4 layers"),
        (lambda s: s.update(config=json.dumps({**json.loads(s["config"]), "methods": ["adaround"]})), "as trained"),
        (lambda s: s.update(config='{"weight_bits": "2"'), "config"),
        (lambda s: s.update(meta="not json"), "meta is not valid JSON"),
        (lambda s: s["layers"]["fc1"]["weight"].fill_(float("nan")), "layers.fc1.weight: not finite"),
        # JSON from the file, bounded before parsing (issue 16: these gave a 31-line traceback)
        (lambda s: s.update(config="[" * 1900 + "]" * 1900), "config nests 1900 deep"),
        (lambda s: s.update(meta='{"a": ' * 1900 + "1" + "}" * 1900), "meta nests 1900 deep"),
        (lambda s: s.update(meta='{"seconds": ' + "9" * 5000 + "}"), "a number of 5000 digits"),
        (lambda s: s.update(meta='{"loss": NaN}'), "NaN is not a JSON number"),
        (lambda s: s.update(meta='{"loss": 1e999}'), "beyond float range"),
        (lambda s: s.update(meta='{"a": 1, "a": 2}'), "appears twice"),
        (lambda s: s.update(meta=b"{}"), "meta must be a JSON string"),
        # settings of the wrong type that compare equal (2.0 == 2, True == 1)
        (_config_with(weight_bits=2.0), "weight_bits must be a whole number"),
        (_config_with(batch_size=64.0), "batch_size must be a whole number"),
        (_config_with(calib_batches=16.0), "calib_batches must be"),
        (_config_with(seed=False), "seed must be a whole number"),
        (_config_with(quantize_input=1), "quantize_input must be bool"),
        # finite scales the integer engine cannot represent (issue 16: accepted, then exported)
        (lambda s: s["layers"]["conv2"]["weight_scale"].fill_(1e30), "conv2's requantization multiplier"),
        (lambda s: s["points"]["input"].update(scale=torch.tensor(3e38)), "conv1's requantization multiplier"),
        # the model it names, and the names of its layers and points, come from the file too
        (lambda s: s.update(model='{"zoo": "resnet-1000"}'), "'resnet-1000' is not a model of the zoo"),
        (lambda s: s.update(model='{"onnx": {"dataset": "imagenet", "input_scale": "raw"}}'), "model must be"),
        (lambda s: s.update(model='{"zoo": "mnist-net", "onnx": 1}'), "model must be"),
        (lambda s: s.update(onnx=torch.zeros(3, dtype=torch.uint8)), "a zoo model's checkpoint holds an empty"),
        (lambda s: s["layers"].update({7: s["layers"].pop("fc2")}), "layers must hold exactly"),
        (lambda s: s["points"].update(extra=s["points"]["input"]), "points must hold exactly the model's 4"),
        (lambda s: s["points"]["input"].pop("zero_point"), "points.input must hold exactly scale, zero_point"),
        (
            lambda s: s["layers"]["fc1"].update(bias=torch.zeros(3)),
            r"layers.fc1.bias: torch.float32 of shape \[3\], expected torch.float32 \[500\]",
        ),
    ],
    ids=[
        "format",
        "extra-key",
        "negative-scale",
        "zero-point",
        "scale-shape",
        "missing-layer",
        "config-methods",
        "config-json",
        "meta",
        "nan-weight",
        "config-deep",
        "meta-deep",
        "meta-long-int",
        "meta-nan",
        "meta-overflow",
        "meta-duplicate-key",
        "meta-bytes",
        "config-float-bits",
        "config-float-batch",
        "config-float-calib",
        "config-bool-seed",
        "config-int-bool",
        "huge-weight-scale",
        "huge-input-scale",
        "unknown-zoo-model",
        "unknown-dataset",
        "two-models",
        "zoo-with-onnx-bytes",
        "non-text-layer-name",
        "extra-point",
        "point-keys",
        "bias-shape",
    ],
)
def test_a_tampered_checkpoint_is_refused_with_its_reason(short_run, change, reason):
    with pytest.raises(CheckpointError, match=reason):
        load_qat(_tampered(short_run, change))


def test_the_two_loaders_refuse_each_others_files(short_run, pretrained):
    with pytest.raises(CheckpointError, match="QAT"):
        load_state_dict(qat_bytes(short_run, "mnist-net"))
    buffer = io.BytesIO()
    save_checkpoint(pretrained, buffer)
    with pytest.raises(CheckpointError, match="not a QAT checkpoint"):
        load_qat(buffer.getvalue())


@pytest.mark.slow
def test_cli_qat_checkpoint_evaluates_identically_in_new_processes(tmp_path, mnist):
    """`qat` trains and measures in one process; `evaluate --checkpoint` in a fresh one reports the same
    simulated and integer accuracies, and ONNX Runtime on the export agrees with the simulation."""
    out = tmp_path / "w2a2.pt"
    trained = run_cli("qat", "--epochs", "1", "--train-samples", "2048", "--out", str(out), "--json")
    assert trained.returncode == 0, trained.stderr
    made = json.loads(trained.stdout)
    integer = run_cli("evaluate", "--checkpoint", str(out), "--engine", "integer", "--json")
    assert integer.returncode == 0, integer.stderr
    measured = json.loads(integer.stdout)
    assert measured["qat"] is True and measured["config"]["weight_bits"] == 2
    assert measured["simulated_accuracy"] == made["qat_accuracy"]
    assert measured["quant_accuracy"] == made["integer_accuracy"]
    assert measured["agreement_with_simulation"] == made["integer_agreement"] >= 0.995
    # and here, in this process, from the file alone; ONNX Runtime on its export agrees with the simulation
    # (in this process: a third fresh one, for --engine onnxruntime, proved nothing more for its 10 s)
    from qcore.export.formats import OnnxRunner, export_onnx

    loaded = load_qat(out)
    assert evaluate(loaded.qnet, mnist.test).accuracy == made["qat_accuracy"]
    here = IntegerNet(loaded.qnet).predict(mnist.test.images)
    assert float((here == mnist.test.labels).float().mean()) == made["integer_accuracy"]
    simulated = evaluate(loaded.qnet, mnist.test).predictions
    onnx = OnnxRunner(export_onnx(loaded.qnet)).predict(mnist.test.images)
    assert float((onnx == simulated).float().mean()) >= 0.995


@pytest.mark.slow
def test_cli_refuses_to_recalibrate_a_qat_checkpoint(short_run, tmp_path):
    path = tmp_path / "qat.pt"
    path.write_bytes(qat_bytes(short_run, "mnist-net"))
    changed = run_cli("evaluate", "--checkpoint", str(path), "--weight-bits", "4")
    assert changed.returncode == 2 and "QAT checkpoint trained at W2A2" in changed.stderr
    assert changed.stderr.count("\n") == 1
    diagnosed = run_cli("diagnose", "--checkpoint", str(path))
    assert diagnosed.returncode == 2 and "would not be the QAT model" in diagnosed.stderr


@pytest.mark.slow
def test_cli_export_and_sweep_take_a_qat_checkpoint_as_trained(short_run, tmp_path, mnist):
    from qcore.export.formats import load_qtensors

    path = tmp_path / "qat.pt"
    path.write_bytes(qat_bytes(short_run, "mnist-net"))
    exported = tmp_path / "qat_int.pt"
    done = run_cli("export", "--checkpoint", str(path), "--format", "qtensors", "--out", str(exported))
    assert done.returncode == 0, done.stderr
    images = mnist.test.images[:1000]
    assert torch.equal(load_qtensors(exported).predict(images), IntegerNet(short_run.qnet).predict(images))
    swept = run_cli("sweep", "--checkpoint", str(path), "--bits", "2,8", "--json")
    assert swept.returncode == 0, swept.stderr
    result = json.loads(swept.stdout)
    assert result["qat"] == {
        "weight_bits": 2,
        "act_bits": 2,
        "accuracy": evaluate(short_run.qnet, mnist.test).accuracy,
    }
    assert result["float_accuracy"] == evaluate(short_run.model, mnist.test).accuracy  # its float weights
    walked = run_cli("explain", "--checkpoint", str(path), "--image", "0", "--json")
    assert walked.returncode == 0, walked.stderr
    engine = IntegerNet(short_run.qnet)
    logits = engine.logits_int(engine.quantize_input(mnist.test.images[:1]))[0]
    assert json.loads(walked.stdout)["logits_int32"] == logits.tolist()  # the trained model, not a recalibration


def _v1_state(result) -> dict[str, object]:
    """A qlab-qat/1 file's contents, laid out by hand as files written before any graph had QAT
    checkpoints (the notebook's net's state_dict and per-layer qparams), independent of today's writer."""
    qparams = {
        name: {
            "weight_scale": quant.weight_qparams.scale.clone(),
            "input_scale": quant.input_qparams.scale.clone().reshape(()),
            "input_zero_point": quant.input_qparams.zero_point.clone().to(torch.int64).reshape(()),
        }
        for name, quant in result.qnet.layers.items()
    }
    return {
        "format": "qlab-qat/1",
        "config": result.qnet.config.to_json(),
        "meta": json.dumps(result.meta()),
        "float_weights": {key: value.clone() for key, value in result.model.state_dict().items()},
        "qparams": qparams,
    }


def _saved(state: dict[str, object]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_a_notebook_nets_checkpoint_of_the_old_format_still_loads_as_it_did(short_run, mnist):
    from qcore.training.qat import load_checkpoint

    old = _saved(_v1_state(short_run))
    loaded = load_qat(old)
    images = mnist.test.images[:500]
    assert torch.equal(loaded.qnet(images), short_run.qnet(images))
    # it names no dataset: the notebook's net on either one, never another architecture
    assert load_checkpoint(old, "fashion-net")[1].zoo == "fashion-net"
    with pytest.raises(CheckpointError, match="a QAT checkpoint of the notebook's net, not of fashion-resnet"):
        load_checkpoint(old, "fashion-resnet")
    # and it is refused as strictly as before
    state = _v1_state(short_run)
    state["qparams"]["conv2"]["input_zero_point"] = torch.tensor(7)
    with pytest.raises(CheckpointError, match="qparams.conv2.input_zero_point: 7 is outside the 2-bit range"):
        load_qat(_saved(state))
    state = _v1_state(short_run)
    state["float_weights"]["fc1.weight"].fill_(float("nan"))
    with pytest.raises(CheckpointError, match="float_weights: fc1.weight"):
        load_qat(_saved(state))


@pytest.mark.slow
def test_qat_checkpoints_of_a_zoo_model_and_an_onnx_model_load_in_evaluate_and_export(tmp_path, mnist):
    """issue 30: QAT checkpoints of fashion-resnet (BatchNorm folded, residual adds) and of an imported ONNX
    model (written by `qat --out`); evaluate gives the accuracy the run measured, the export runs in ONNX
    Runtime on the same predictions, and the file refuses to stand for another model. (fashion-resnet's
    run is in this process: `qat` also runs the integer engine over the test set, 30 s on it, issue 33.)"""
    from qcore.data import load_dataset
    from qcore.export.formats import OnnxRunner
    from qcore.models.checkpoint import load_model
    from tests.test_onnx_import import exported, small_model

    fashion = load_dataset("fashion-mnist", download=False)
    config = QatConfig(weight_bits=4, act_bits=4, epochs=1, train_samples=256)
    resnet = qat(load_model(None, "fashion-resnet"), fashion, config)
    resnet_file = tmp_path / "resnet_qat.pt"
    resnet_file.write_bytes(qat_bytes(resnet, "fashion-resnet"))
    onnx_file, onnx_qat_file = tmp_path / "small.onnx", tmp_path / "small_qat.pt"
    onnx_file.write_bytes(exported(small_model()))
    short = ("--weight-bits", "4", "--act-bits", "4", "--epochs", "1", "--train-samples", "256")
    made = run_cli(
        "qat",
        "--checkpoint",
        str(onnx_file),
        "--input-scale",
        "normalized",
        *short,
        "--out",
        str(onnx_qat_file),
        "--json",
    )
    assert made.returncode == 0, made.stderr
    cases = [
        (("--model", "fashion-resnet"), resnet_file, fashion, evaluate(resnet.qnet, fashion.test).accuracy),
        ((), onnx_qat_file, mnist, json.loads(made.stdout)["qat_accuracy"]),
    ]
    for zoo, path, data, qat_accuracy in cases:
        measured = run_cli("evaluate", *zoo, "--checkpoint", str(path), "--json")
        assert measured.returncode == 0, measured.stderr
        assert json.loads(measured.stdout)["qat"] is True
        assert json.loads(measured.stdout)["quant_accuracy"] == qat_accuracy
        onnx_out = tmp_path / f"{path.stem}_qdq.onnx"
        written = run_cli("export", *zoo, "--checkpoint", str(path), "--format", "onnx", "--out", str(onnx_out))
        assert written.returncode == 0, written.stderr
        loaded = load_qat(path)
        images = data.test.images[:1000]
        simulated = evaluate(loaded.qnet, Split(images, data.test.labels[:1000])).predictions
        assert float((OnnxRunner(onnx_out.read_bytes()).predict(images) == simulated).float().mean()) >= 0.99
    refused = run_cli("evaluate", "--checkpoint", str(onnx_qat_file), "--model", "fashion-net")
    assert refused.returncode == 2 and "a QAT checkpoint of an ONNX model brings its own" in refused.stderr
    refused = run_cli("evaluate", "--checkpoint", str(resnet_file))  # the default model, mnist-net
    assert refused.returncode == 2 and "a QAT checkpoint of fashion-resnet, not of mnist-net" in refused.stderr
    # to the integer: the checkpoint is the trained model, in the simulation and in the integer engine
    loaded, images = load_qat(resnet_file), fashion.test.images[:300]
    assert torch.equal(loaded.qnet(images), resnet.qnet(images))
    assert torch.equal(IntegerNet(loaded.qnet).predict(images), IntegerNet(resnet.qnet).predict(images))
