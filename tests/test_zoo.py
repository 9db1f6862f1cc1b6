"""The model zoo and Fashion-MNIST: the dataset against its documented sizes, classes and statistics,
each bundled checkpoint against its recorded accuracy, the CLI's `models` and `--model`, strict
checkpoint validation per architecture, the ONNX export's metadata, the integer engine per model."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from qcore.data import (
    FASHION_MNIST,
    MNIST,
    DataFileError,
    load_dataset,
    load_split,
)
from qcore.graph import model_graph
from qcore.models.checkpoint import CheckpointError, checkpoint_bytes, load_model, load_state_dict
from qcore.models.net import Net
from qcore.models.zoo import ZOO, DepthwiseNet, ResNet, zoo_model
from qcore.quantize.config import QuantConfig
from tests.conftest import run_cli

# Fashion-MNIST's README (zalandoresearch/fashion-mnist): 60,000 training and 10,000 test images,
# 10 classes, 6,000 and 1,000 of each; its label table names the classes in this order.
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@pytest.fixture(scope="module")
def fashion():
    return load_dataset("fashion-mnist", download=False)


def test_fashion_mnist_has_its_documented_sizes_classes_and_names(fashion):
    assert (len(fashion.train), len(fashion.test)) == (60000, 10000)
    assert fashion.train.images.shape == (60000, 1, 28, 28)
    assert torch.bincount(fashion.train.labels).tolist() == [6000] * 10
    assert torch.bincount(fashion.test.labels).tolist() == [1000] * 10
    assert fashion.spec.class_names == FASHION_CLASSES


@pytest.mark.parametrize("spec", [MNIST, FASHION_MNIST], ids=lambda spec: spec.name)
def test_normalization_constants_are_the_training_sets_own(spec):
    """Recomputed here from the raw training pixels (numpy, float64), to the 4 decimals stored."""
    data = load_dataset(spec.name, download=False)
    pixels = (data.train.images.double() * spec.std + spec.mean).numpy()  # back to [0, 1]
    assert round(float(np.mean(pixels)), 4) == spec.mean
    assert round(float(np.std(pixels)), 4) == spec.std


def _fashion_folder(tmp_path, image_bytes: bytes):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(image_bytes)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / f"{name}.gz").write_bytes((FASHION_MNIST.system_dir / f"{name}.gz").read_bytes())
    return tmp_path


def test_a_damaged_gzip_is_refused_in_one_line(tmp_path):
    original = (FASHION_MNIST.system_dir / "t10k-images-idx3-ubyte.gz").read_bytes()
    folder = _fashion_folder(tmp_path, original[: len(original) // 2])  # cut short
    with pytest.raises(DataFileError, match="t10k-images-idx3-ubyte"):
        load_split(False, folder, download=False, spec=FASHION_MNIST)


def test_a_gzip_that_inflates_past_its_declared_size_is_refused_without_inflating_it(tmp_path):
    header = np.array([0x803, 10000, 28, 28], dtype=">u4").tobytes()
    bomb = gzip.compress(header + bytes(10000 * 784 + 50_000_000))  # 50 MB more than declared
    folder = _fashion_folder(tmp_path, bomb)
    with pytest.raises(DataFileError, match="more than 7840016 bytes, expected 7840016"):
        load_split(False, folder, download=False, spec=FASHION_MNIST)


def test_unknown_dataset_and_model_names_are_one_line_errors():
    result = run_cli("data", "--dataset", "cifar")
    assert result.returncode == 2 and "invalid choice: 'cifar'" in result.stderr
    result = run_cli("evaluate", "--model", "resnet50")
    assert result.returncode == 2 and "invalid choice: 'resnet50'" in result.stderr


def test_models_json_lists_every_model_with_its_ops_and_parameter_count():
    result = run_cli("models", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)["models"]}
    assert list(rows) == list(ZOO)
    # the notebook's net by hand: conv 20x1x5x5+20, conv 50x20x5x5+50, fc 500x800+500, fc 10x500+10
    assert rows["mnist-net"]["parameters"] == 520 + 25050 + 400500 + 5010
    assert rows["mnist-net"]["ops"] == ["conv", "linear", "relu", "maxpool", "flatten"]
    assert rows["fashion-resnet"]["ops"] == ["conv", "linear", "batchnorm", "relu", "global_avgpool", "add", "flatten"]
    assert rows["fashion-mobilenet"]["ops"] == [
        "conv",
        "depthwise_conv",
        "linear",
        "batchnorm",
        "relu6",
        "global_avgpool",
        "flatten",
    ]
    assert {row["dataset"] for row in rows.values()} == {"mnist", "fashion-mnist"}
    for name, row in rows.items():
        assert row["float_accuracy"] == zoo_model(name).float_accuracy


@pytest.mark.parametrize("name", list(ZOO))
def test_each_bundled_checkpoint_reproduces_its_recorded_accuracy(name):
    from qcore.inference.evaluate import evaluate

    spec = zoo_model(name)
    assert spec.checkpoint.stat().st_size <= 2 * 1024 * 1024
    data = load_dataset(spec.dataset, download=False)
    accuracy = evaluate(load_model(None, name), data.test).accuracy
    assert round(accuracy, 4) == spec.float_accuracy  # docs/models.md's number, recorded when it was trained


def test_float_accuracy_goals_of_the_issue():
    assert zoo_model("fashion-resnet").float_accuracy >= 0.92
    assert zoo_model("fashion-mobilenet").float_accuracy >= 0.90


def test_a_state_dict_is_validated_against_the_named_architecture():
    resnet_bytes = checkpoint_bytes(ResNet())
    with pytest.raises(CheckpointError, match="missing keys: conv1.weight"):
        load_state_dict(resnet_bytes)  # the notebook's net by default
    assert set(load_state_dict(resnet_bytes, "fashion-resnet")) == set(ResNet().state_dict())
    with pytest.raises(CheckpointError, match="missing keys: stem.weight"):
        load_state_dict(checkpoint_bytes(Net()), "fashion-mobilenet")


def test_a_negative_batchnorm_variance_is_refused():
    state = DepthwiseNet().state_dict()
    state["blocks.1.bn1.running_var"][3] = -1.0
    with pytest.raises(CheckpointError, match="blocks.1.bn1.running_var: 1 negative BatchNorm variance"):
        load_state_dict(checkpoint_bytes_of(state), "fashion-mobilenet")


def checkpoint_bytes_of(state: dict[str, torch.Tensor]) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_cli_checkpoint_of_another_architecture_exits_2(tmp_path):
    path = tmp_path / "net.pt"
    path.write_bytes(checkpoint_bytes(Net()))
    result = run_cli("evaluate", "--model", "fashion-resnet", "--checkpoint", str(path))
    assert result.returncode == 2
    assert "missing keys: stem.weight" in result.stderr and "Traceback" not in result.stderr


def test_float_layers_are_checked_against_the_models_own_layers():
    result = run_cli("evaluate", "--model", "fashion-resnet", "--float-layers", "conv1")
    assert result.returncode == 2
    assert "unknown layer(s) conv1; layers are stem, layer1.conv1" in result.stderr


def test_onnx_export_writes_the_normalization_and_the_class_names(tmp_path):
    out = tmp_path / "mobilenet.onnx"
    result = run_cli("export", "--model", "fashion-mobilenet", "--format", "onnx", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    props = {prop.key: prop.value for prop in onnx.load(str(out)).metadata_props}
    assert float(props["normalize_mean"]) == FASHION_MNIST.mean
    assert float(props["normalize_std"]) == FASHION_MNIST.std
    assert props["dataset"] == "fashion-mnist"
    assert json.loads(props["class_names"]) == list(FASHION_CLASSES)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_every_figure_of_each_zoo_model_is_the_one_recorded_before_evaluation_got_faster(name):
    """Issue 33: evaluation got faster (batches sized to the model, max-pooling by strided slices, the
    engine's products on centred float kernels) and no number moved. Against figures recorded at commit
    1280539 (bench/record_zoo_figures.py): accuracy, accuracy per class and the predictions themselves
    of the float model, the simulation at W8A8, W6A6 and W4A4 and the integer engine at W8A8 and W4A4,
    on the full test set. The engine also predicts at least 99.5% of the images as the simulation does."""
    from bench.record_zoo_figures import model_figures

    recorded = json.loads((Path(__file__).parent / "reference" / "zoo_figures.json").read_text())[name]
    predictions: dict[str, torch.Tensor] = {}
    assert model_figures(name, predictions) == recorded
    assert recorded["float"]["correct"] == round(zoo_model(name).float_accuracy * 10_000)  # docs/models.md's
    for bits in (8, 4):
        agreement = float((predictions[f"engine W{bits}A{bits}"] == predictions[f"W{bits}A{bits}"]).float().mean())
        assert agreement >= 0.995, (bits, agreement)


def test_edge_and_add_bits_give_each_point_and_layer_the_bits_of_its_role():
    """W2A2 with the first and last layers and the residual adds at 8 bits: each point is calibrated as
    in the plain W8A8 or W2A2 config of its role, each layer's weights too, and the integer engine runs it."""
    from qcore.analysis.tables import quantize_for
    from qcore.inference.integer import IntegerNet

    data = load_dataset("fashion-mnist", download=False)
    model = load_model(None, "fashion-resnet")
    mixed = quantize_for(model, data, QuantConfig(weight_bits=2, act_bits=2, edge_bits=8, add_bits=8, calib_batches=2))
    wide = quantize_for(model, data, QuantConfig(calib_batches=2))
    narrow = quantize_for(model, data, QuantConfig(weight_bits=2, act_bits=2, calib_batches=2))
    edges = {mixed.plan.layer_input["stem"], mixed.plan.layer_input["fc"]}
    adds = set(mixed.plan.points) - set(mixed.plan.layer_input.values())
    assert edges == {"input", "relu_6"}  # the image, and the last block's output before the pooling
    # the convs whose outputs meet at an add (layer1's identity shortcut is its input, a layer input)
    assert adds == {"layer1.conv2", "layer2.conv2", "layer2.shortcut.0", "layer3.conv2", "layer3.shortcut.0"}
    for point, quant_point in mixed.points.items():
        ours, theirs = quant_point.qparams, (wide if point in edges | adds else narrow).points[point].qparams
        assert (ours.qmin, ours.qmax, float(ours.scale), int(ours.zero_point)) == (
            theirs.qmin,
            theirs.qmax,
            float(theirs.scale),
            int(theirs.zero_point),
        ), point
    for name, quant in mixed.layers.items():
        reference = (wide if name in ("stem", "fc") else narrow).layers[name]
        assert quant.weight_bits == reference.weight_bits and torch.equal(quant.weight_int, reference.weight_int)
    images = data.test.images[:300]
    with torch.no_grad():
        simulated = mixed(images).argmax(dim=1)
    assert float((IntegerNet(mixed).predict(images) == simulated).float().mean()) >= 0.99


def test_graph_of_each_zoo_model_folds_every_batchnorm():
    for name, build in (("fashion-resnet", ResNet), ("fashion-mobilenet", DepthwiseNet)):
        model = build().eval()
        graph = model_graph(model)
        batchnorms = [module for module in model.modules() if isinstance(module, torch.nn.BatchNorm2d)]
        assert len(graph.folded_batchnorm) == len(batchnorms), name


def test_folding_spreads_match_the_batchnorm_factors_by_hand():
    """After folding, channel c's max |w| is its conv's max |w| times |gamma_c| / sqrt(var_c + eps)."""
    from qcore.lessons.failures import folded_spreads

    torch.manual_seed(0)
    model = DepthwiseNet().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.05, 3.0)
                module.running_var.uniform_(0.01, 4.0)
    spreads = {row.layer: row for row in folded_spreads(model)}
    conv, bn = model.blocks[1].depthwise, model.blocks[1].bn1
    before = conv.weight.detach().flatten(1).abs().max(dim=1).values
    after = before * bn.weight.detach().abs() / torch.sqrt(bn.running_var + bn.eps)
    row = spreads["blocks.1.depthwise"]
    assert row.depthwise and row.batchnorm == "blocks.1.bn1"
    assert row.spread_before == pytest.approx(float(before.max() / before.min()), rel=1e-5)
    assert row.spread_after == pytest.approx(float(after.max() / after.min()), rel=1e-5)
    assert not spreads["blocks.1.pointwise"].depthwise


def test_equalization_pairs_cross_relu6_into_depthwise_layers_and_keep_the_function_below_six():
    """Every separable block gives depthwise->pointwise and pointwise->next depthwise, then the last
    pointwise reaches fc through the global pool. With activations below 6, ReLU6 and the ReLU that
    replaces it agree, so equalization keeps the network's function (a positive per-channel rescale)."""
    from qcore.graph import OpKind, run_float
    from qcore.quantize.methods import equalization_pairs, equalize

    torch.manual_seed(1)
    model = DepthwiseNet().eval()
    graph = model_graph(model)
    layers = ["stem"] + [f"blocks.{i}.{kind}" for i in range(4) for kind in ("depthwise", "pointwise")] + ["fc"]
    assert [pair[:2] for pair in equalization_pairs(graph)] == list(zip(layers, layers[1:], strict=False))
    equalized, report = equalize(graph)
    assert all(op.kind is not OpKind.RELU6 for op in equalized.ops)
    assert sum(len(pair["relu6_replaced_by_relu"]) for pair in report.values()) == 9
    x = 0.3 * torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert float(model.blocks(model.stem(x)).max()) < 6  # the regime where the replacement is exact
        assert torch.allclose(run_float(equalized, x), run_float(graph, x), atol=1e-4)


def test_the_residual_walkthrough_lists_each_add_with_a_shared_grid_no_finer_than_its_own(tmp_path):
    result = run_cli("walkthrough", "residual", "--model", "fashion-resnet", "--act-bits", "4", "--json")
    assert result.returncode == 0, result.stderr
    adds = json.loads(result.stdout)["adds"]
    assert [row["add"] for row in adds] == ["add", "add_1", "add_2"]  # one per residual block
    for row in adds:
        # one grid covering both inputs and the output is at least as coarse as each of theirs
        assert row["shared_scale"] >= max(*row["input_scales"], row["output_scale"]) * (1 - 1e-6)
        assert row["scale_ratio"] >= 1


def test_the_residual_walkthrough_refuses_a_model_without_adds():
    result = run_cli("walkthrough", "residual", "--model", "mnist-net")
    assert result.returncode == 2 and "has no residual add" in result.stderr


def test_the_qat_control_starts_as_the_float_model():
    """Before any step, the control (QAT's net with its quantizers off) computes the folded float graph."""
    from qcore.analysis.tables import quantize_for
    from qcore.graph import run_float
    from qcore.training.qat import QatNet

    data = load_dataset("fashion-mnist", download=False)
    model = load_model(None, "fashion-resnet")
    start = quantize_for(model, data, QuantConfig(weight_bits=4, act_bits=4))
    control = QatNet(start, "lsq", model, quantize=False).eval()
    quantized = QatNet(start, "lsq", model).eval()
    x = data.test.images[:64]
    with torch.no_grad():
        expected = run_float(model_graph(model), x)
        assert torch.allclose(control(x), expected, atol=1e-4)
        assert not torch.allclose(quantized(x), expected, atol=1e-2)  # the quantizers are what it leaves out


@pytest.mark.slow
def test_the_zoo_bench_reports_qat_beside_its_control():
    import importlib

    from qcore.training.qat import QatConfig

    bench = importlib.import_module("bench.bench_zoo")
    data = load_dataset("mnist", download=False)
    rows = bench.qat_rows(
        "mnist-net", load_model(), data, QatConfig(weight_bits=4, act_bits=4, epochs=1, train_samples=512)
    )
    assert set(rows) == {
        "QAT W4A4",
        "QAT control",
        "QAT W4A4 seconds per epoch",
        "QAT control seconds per epoch",
        "QAT W4A4 integer agreement",
        "QAT W4A4 drop vs control (points)",
    }
    assert 0.5 < rows["QAT control"] <= 1 and 0.5 < rows["QAT W4A4"] <= 1
    assert rows["QAT W4A4 drop vs control (points)"] == pytest.approx(100 * (rows["QAT control"] - rows["QAT W4A4"]))
    assert rows["QAT W4A4 integer agreement"] >= 0.995


def test_the_zoo_bench_reads_qat_specs_and_refuses_bad_ones():
    import importlib

    bench = importlib.import_module("bench.bench_zoo")
    config = bench.qat_config("W2A2:edges8:adds8", 128, 1e-3)
    assert (config.weight_bits, config.act_bits, config.edge_bits, config.add_bits) == (2, 2, 8, 8)
    assert (config.epochs, config.batch_size, config.method) == (2, 128, "lsq")
    assert config.quant_config().bits_label == "W2A2, first and last layers at 8, adds at 8"
    for spec in ("W2A2:wide8", "W2", "W2A2:edges9", "W1A2"):
        with pytest.raises(SystemExit, match="--qat-bits"):
            bench.qat_config(spec, 128, 1e-3)
