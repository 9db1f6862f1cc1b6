"""Users' own models as ONNX files (issue 19): imported into the model graph and checked against ONNX
Runtime, quantized like a zoo model, and refused in one line, before any large allocation, when they
cannot be. Every ONNX file here is built in the test: torch.onnx.export of small modules (both of
torch's exporters), and onnx.helper graphs for what exporters do not write and for each refusal."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from qcore.analysis.tables import quantize_for
from qcore.data import load_dataset, with_input_scale
from qcore.graph import model_graph
from qcore.inference.integer import IntegerNet
from qcore.models.checkpoint import load_model
from qcore.models.net import Net
from qcore.models.onnx_import import OnnxImportError, import_onnx, is_onnx, read_onnx
from qcore.quantize.config import QuantConfig
from tests.conftest import ROOT, run_cli


class Small(nn.Module):
    """BatchNorm after a conv, a depthwise conv with ReLU6, a residual add, global pooling, a linear
    layer: what a user's MobileNet- or ResNet-like model is made of."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pointwise = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn(self.stem(x))), 2)
        y = self.pointwise(F.relu6(self.depthwise(x)))
        x = F.relu(x + y)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class TwinNet(Net):
    """The notebook's net with the same weights and another graph: average instead of max pooling, and no
    ReLU after the second pool (issue 35's twin: 98.32% against 92.83% float)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(F.avg_pool2d(self.conv1(x), 2, 2))
        x = F.avg_pool2d(self.conv2(x), 2, 2).flatten(1)
        return torch.log_softmax(self.fc2(torch.relu(self.fc1(x))), dim=1)


def small_model() -> Small:
    torch.manual_seed(0)
    model = Small()
    with torch.no_grad():  # BatchNorm statistics of its own, so folding has something to fold
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def exported(model: nn.Module, dynamo: bool = False, dynamic: bool = True) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
            torch.onnx.export(
                model, (torch.zeros(2, 1, 28, 28),), buffer, dynamo=True, dynamic_shapes=shapes, verbose=False
            )
        else:
            axes = {"image": {0: "batch"}, "scores": {0: "batch"}} if dynamic else None
            torch.onnx.export(
                model, (torch.zeros(1, 1, 28, 28),), buffer, dynamo=False, input_names=["image"],
                output_names=["scores"], dynamic_axes=axes,
            )  # fmt: skip
    return buffer.getvalue()


@pytest.fixture(scope="module")
def fashion():
    return load_dataset("fashion-mnist", download=False)


@pytest.mark.parametrize("dynamo,dynamic", [(False, True), (False, False), (True, True)])
def test_an_exported_model_imports_and_predicts_what_torch_and_onnxruntime_do(mnist, dynamo, dynamic):
    """torch's TorchScript exporter (dynamic and fixed batch) and its torch.export one (ReduceMean for
    the pool, constant Reshape shapes): the import predicts on every one of 1,000 images what ONNX
    Runtime does (checked on arrival) and what the torch module itself does."""
    model = small_model()
    imported = import_onnx(exported(model, dynamo, dynamic), mnist)
    assert imported.agreement_images == 1000 and imported.largest_difference < 1e-4
    x = mnist.test.images[:1000]
    with torch.inference_mode():
        assert torch.equal(imported.module(x).argmax(1), model(x).argmax(1))
    graph = model_graph(imported.module)
    # torch's exporters fold BatchNorm into the conv themselves in eval mode (the hand-made graph below has one)
    assert graph.op_kinds() == [
        "conv", "depthwise_conv", "linear", "relu", "relu6", "maxpool", "global_avgpool", "add", "flatten",
    ]  # fmt: skip
    assert graph.layers == ("stem", "depthwise", "pointwise", "fc")  # torch's module paths, from either exporter


@pytest.mark.slow
def test_a_zoo_model_through_onnx_quantizes_exactly_as_the_zoo_model(fashion):
    """fashion-resnet exported and imported is the same network: at W8A8 the simulation and the integer
    engine predict what they predict for the zoo model itself (on the first 2,000 and 500 test images), from
    the same calibrated grids and integer weights."""
    zoo = load_model(None, "fashion-resnet")
    imported = import_onnx(exported(zoo), fashion)
    config = QuantConfig()
    ours, theirs = quantize_for(zoo, fashion, config), quantize_for(imported.module, fashion, config)
    assert [q.qparams.scale for q in ours.points.values()] == [q.qparams.scale for q in theirs.points.values()]
    for mine, yours in zip(ours.layers.values(), theirs.layers.values(), strict=True):
        assert torch.equal(mine.weight_int, yours.weight_int) and torch.equal(mine.bias_int, yours.bias_int)
    x = fashion.test.images[:2000]
    with torch.inference_mode():
        assert torch.equal(ours(x).argmax(1), theirs(x).argmax(1))
    assert torch.equal(IntegerNet(ours).predict(x[:500]), IntegerNet(theirs).predict(x[:500]))


def _node(op: str, inputs: list[str], outputs: list[str], name: str = "", **attributes: object) -> onnx.NodeProto:
    return helper.make_node(op, inputs, outputs, name=name or f"/{op}", **attributes)


def _initializer(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array.astype(np.float32) if array.dtype.kind == "f" else array, name)


def hand_made(
    nodes: list[onnx.NodeProto] | None = None,
    initializers: list[onnx.TensorProto] | None = None,
    input_shape: list[object] | None = None,
    output_shape: list[object] | None = None,
    opset: int = 17,
) -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu -> MaxPool -> Reshape to (batch, -1) through a
    Shape-Gather-Unsqueeze-Concat chain -> MatMul + Add -> Softmax: what older exporters and other
    frameworks write, none of which torch's exporters emit for these layers."""
    rng = np.random.default_rng(0)
    if nodes is None:
        nodes = [
            _node("Conv", ["image", "w", "b"], ["c"], "/conv/Conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            _node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"], "/bn/BatchNormalization"),
            _node("Relu", ["n"], ["r"]),
            _node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
            _node("Shape", ["p"], ["shape"]),
            _node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.int64))),
            _node("Gather", ["shape", "zero"], ["batch"]),
            _node("Constant", [], ["axes"], value=numpy_helper.from_array(np.array([0], np.int64))),
            _node("Unsqueeze", ["batch", "axes"], ["batch1"]),
            _node("Constant", [], ["rest"], value=numpy_helper.from_array(np.array([-1], np.int64))),
            _node("Concat", ["batch1", "rest"], ["target"], axis=0),
            _node("Reshape", ["p", "target"], ["flat"]),
            _node("MatMul", ["flat", "fc_w"], ["m"], "/fc/MatMul"),
            _node("Add", ["m", "fc_b"], ["logits"], "/fc/Add"),
            _node("Softmax", ["logits"], ["scores"], axis=1),
        ]
    if initializers is None:
        initializers = [
            _initializer("w", rng.normal(0, 0.3, (4, 1, 3, 3))),
            _initializer("b", rng.normal(0, 0.1, 4)),
            _initializer("gamma", rng.uniform(0.5, 1.5, 4)),
            _initializer("beta", rng.normal(0, 0.1, 4)),
            _initializer("mean", rng.normal(0, 0.1, 4)),
            _initializer("var", rng.uniform(0.5, 1.5, 4)),
            _initializer("fc_w", rng.normal(0, 0.05, (4 * 14 * 14, 10))),
            _initializer("fc_b", rng.normal(0, 0.1, 10)),
        ]
    graph = helper.make_graph(
        nodes,
        "hand-made",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, input_shape or ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, output_shape or ["N", 10])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="qlab-test")


def test_a_hand_made_graph_of_other_writers_operators_imports(mnist):
    """BatchNormalization as a node, a Reshape fed by a Shape chain (the batch as a symbol), MatMul + Add
    as one linear layer, Softmax at the end: ONNX Runtime's reference (onnx's own), BatchNorm folded."""
    data = hand_made().SerializeToString()
    imported = import_onnx(data, mnist, "normalized")  # random weights: no convention is measurably better
    graph = model_graph(imported.module)
    assert graph.layers == ("conv", "fc") and graph.folded_batchnorm == {"conv": "bn"}
    assert imported.agreement_images == 1000 and imported.largest_difference < 1e-5
    assert is_onnx(data) and not is_onnx(b"\x08" + b"junk" * 10) and not is_onnx(b"PK\x03\x04")


def test_raw_pixel_models_see_raw_pixels(mnist):
    """--input-scale raw: the data the model is checked and quantized on are pixels in [0, 1]."""
    raw = with_input_scale(mnist, "raw")
    assert float(raw.test.images.min()) == pytest.approx(0.0, abs=1e-6)
    assert float(raw.test.images.max()) == pytest.approx(1.0, abs=1e-6)
    assert (raw.spec.mean, raw.spec.std, raw.spec.name) == (0.0, 1.0, "mnist")
    assert with_input_scale(mnist, "raw") is raw and with_input_scale(mnist, "normalized") is mnist


def test_a_models_identity_is_its_graph_weights_data_and_input_convention(mnist, fashion):
    """Issue 35: the same file imported twice is one model; the same file read as raw pixels, or evaluated
    on another dataset, is another; the same weights in another graph (no ReLU after the second pool) too."""
    net = load_model()
    twin = TwinNet()
    twin.load_state_dict(net.state_dict())
    data = exported(net)
    first, again = import_onnx(data, mnist, "normalized"), import_onnx(data, mnist, "normalized")
    assert first.identity == again.identity
    others = [
        import_onnx(data, mnist, "raw"),
        import_onnx(data, fashion),
        import_onnx(exported(twin.eval()), mnist),
    ]
    assert len({first.identity, *(other.identity for other in others)}) == 4


# --- refusals: one line each, before any large allocation -------------------------------------------


def _with_initializer(tensor: onnx.TensorProto) -> bytes:
    model = hand_made()
    model.graph.initializer.append(tensor)
    return model.SerializeToString()


def _huge_declared() -> bytes:
    tensor = onnx.TensorProto(name="huge", data_type=TensorProto.FLOAT, dims=[10_000_000_000])  # 40 GB
    tensor.raw_data = b"\x00" * 16
    return _with_initializer(tensor)


def _short_tensor() -> bytes:
    tensor = onnx.TensorProto(name="short", data_type=TensorProto.FLOAT, dims=[1000])
    tensor.raw_data = b"\x00" * 16
    return _with_initializer(tensor)


def _subgraph() -> bytes:
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    branch = helper.make_graph([_node("Identity", ["image"], ["y"])], "branch", [], [output])
    model = hand_made()
    cond = numpy_helper.from_array(np.array(True), "cond")
    model.graph.initializer.append(cond)
    model.graph.node.insert(0, _node("If", ["cond"], ["unused"], "/If", then_branch=branch, else_branch=branch))
    return model.SerializeToString()


def _unsupported() -> bytes:
    model = hand_made()
    model.graph.node.insert(3, _node("Erf", ["r"], ["erf"], "/Erf"))
    return model.SerializeToString()


def _many_nodes() -> bytes:
    model = hand_made()
    for i in range(2001):
        model.graph.node.append(_node("Identity", ["scores"], [f"copy{i}"], f"/copy{i}"))
    return model.SerializeToString()


def _not_finite() -> bytes:
    model = hand_made()
    weights = next(t for t in model.graph.initializer if t.name == "fc_w")
    weights.CopyFrom(_initializer("fc_w", np.full((4 * 14 * 14, 10), 3e38)))
    return model.SerializeToString()


def _markdown_name() -> bytes:
    model = hand_made()
    model.graph.node.insert(3, _node("Sin", ["r"], ["s"], "[click](http://evil.example/" + "x" * 300 + ")"))
    return model.SerializeToString()


def _batchnorm_after_relu() -> bytes:
    """BatchNorm that follows a ReLU, not a conv: the ONNX is fine, the lab's graph cannot fold it."""
    model = hand_made()
    nodes = list(model.graph.node)
    nodes[1] = _node("Relu", ["c"], ["r0"])
    nodes[2] = _node("BatchNormalization", ["r0", "gamma", "beta", "mean", "var"], ["r"], "/bn/BatchNormalization")
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model.SerializeToString()


def _foreign_node() -> bytes:
    model = hand_made()
    model.graph.node.insert(3, helper.make_node("FusedConv", ["r"], ["f"], name="/fused", domain="com.microsoft"))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model.SerializeToString()


def _cycle() -> bytes:
    model = hand_made()
    model.graph.node[2].input[0] = "p"  # the ReLU reads the pool that reads it
    return model.SerializeToString()


def _two_inputs() -> bytes:
    model = hand_made()
    model.graph.input.append(helper.make_tensor_value_info("labels", TensorProto.INT64, ["N"]))
    return model.SerializeToString()


def _two_score_outputs() -> bytes:
    model = hand_made()
    model.graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10]))
    return model.SerializeToString()


REFUSALS = {
    "40 GB declared": (_huge_declared, "declares [10000000000] values, more than the 4,000,000"),
    "size the file lacks": (_short_tensor, "declares 1,000 values (4,000 bytes) but the file holds 16"),
    "subgraph": (_subgraph, "a subgraph in If at node /If"),
    "unsupported op": (_unsupported, "unsupported operation Erf at node /Erf"),
    "too many nodes": (_many_nodes, "2016 nodes; at most 2000"),
    "image of 3 channels": (
        lambda: hand_made(input_shape=["N", 3, 32, 32]).SerializeToString(),
        "the input is ['N', 3, 32, 32]; the lab reads one float image of 28x28 pixels as [N, 1, 28, 28]",
    ),
    "5 scores": (lambda: hand_made(output_shape=["N", 5]).SerializeToString(), "the output is ['N', 5]"),
    "opset 6": (lambda: hand_made(opset=6).SerializeToString(), "opset 6; the lab imports ONNX opsets 7 to 23"),
    # opset 9 is upgraded, but this graph uses opset 13's Unsqueeze: ONNX Runtime itself refuses it
    "opset 9 with a newer operator": (
        lambda: hand_made(opset=9).SerializeToString(),
        "ONNX Runtime cannot run the file ([ONNXRuntimeError] : 10 : INVALID_GRAPH",
    ),
    "a node of another domain": (_foreign_node, "unsupported operation com.microsoft.FusedConv at node /fused"),
    "a cycle": (_cycle, "Relu at node /Relu reads 'p', which no node computes before it (a cycle"),
    "two inputs": (_two_inputs, "the model takes 2 inputs (image, labels); it must take one image tensor"),
    "two outputs of 10": (_two_score_outputs, "the model gives 2 outputs, 2 of them [N, 10]"),
    "not finite": (_not_finite, "not finite on ordinary images"),
    "a name of markdown": (_markdown_name, "unsupported operation Sin at node [click](http://evil.example/xxx"),
    "BatchNorm after a ReLU": (_batchnorm_after_relu, "unsupported operation 'BatchNorm2d' after "),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_are_one_line(mnist, case):
    build, needle = REFUSALS[case]
    with pytest.raises(OnnxImportError) as caught:
        import_onnx(build(), mnist)
    message = str(caught.value)
    assert needle in message and "\n" not in message and len(message) < 400


def test_a_file_over_the_limit_is_refused_before_parsing():
    with pytest.raises(OnnxImportError, match="a file of 5.0 MB; at most 4.2 MB"):
        read_onnx(b"\x08" * 5_000_000)


def test_predictions_that_part_from_onnxruntime_are_refused(mnist, monkeypatch):
    """The arrival check itself: an ONNX Runtime that disagrees (here: classes rolled by one) refuses the
    file, naming how many images parted and the largest score difference."""
    from qcore.models import onnx_import

    real = onnx_import._reference_scores
    monkeypatch.setattr(onnx_import, "_reference_scores", lambda scores: real(scores).roll(1, dims=1))
    with pytest.raises(OnnxImportError, match=r"predict differently on \d+ of 1000 test images \(largest difference"):
        import_onnx(hand_made().SerializeToString(), mnist)


# --- through the command line ------------------------------------------------------------------------


def test_external_data_is_refused_and_never_opened(tmp_path):
    """The initializer's location is a named pipe: opening it for reading would block until a writer came,
    so a command that opened it would hang past the timeout instead of answering at once."""
    pipe = tmp_path / "weights.bin"
    os.mkfifo(pipe)
    tensor = onnx.TensorProto(name="outside", data_type=TensorProto.FLOAT, dims=[4])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", str(pipe)), ("offset", "0"), ("length", "16")):
        tensor.external_data.add(key=key, value=value)
    path = tmp_path / "external.onnx"
    path.write_bytes(_with_initializer(tensor))
    done = run_cli("evaluate", "--checkpoint", str(path), timeout=60, process=True)  # a hang is a timeout
    assert done.returncode == 2
    assert done.stderr.strip().endswith("keeps its values in an external file, which the lab never opens")
    assert len(done.stderr.strip().splitlines()) == 1


# the child's own peak RSS (os.wait4's would start from the forking test process's)
MEMORY_SCRIPT = """
import sys
from qcore.cli import main
from tests.hostile_files import own_peak_rss_bytes
code = main(["evaluate", "--checkpoint", sys.argv[1]])
print("peak_rss_kib", own_peak_rss_bytes() // 1024, "exit", code)
"""


def test_a_declared_40_gb_tensor_costs_little_memory(tmp_path):
    path = tmp_path / "huge.onnx"
    path.write_bytes(_huge_declared())
    assert path.stat().st_size < 100_000
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(path)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    peak, code = done.stdout.split()[1], done.stdout.split()[3]
    assert code == "2" and "declares [10000000000] values" in done.stderr
    assert int(peak) < 1.5 * 1024 * 1024  # KiB: under 1.5 GB, the interpreter, torch and MNIST included


@pytest.mark.slow
def test_the_cli_evaluates_exports_and_refuses_an_onnx_file(tmp_path, mnist):
    path = tmp_path / "small.onnx"
    path.write_bytes(exported(small_model()))
    done = run_cli("evaluate", "--checkpoint", str(path), "--engine", "integer", "--json")
    assert done.returncode == 0, done.stderr
    import json

    result = json.loads(done.stdout)
    assert result["model"] == "onnx" and result["onnx"]["opset"] == 20 and result["onnx"]["agreement_images"] == 1000
    assert result["agreement_with_simulation"] >= 0.995
    # exported back to ONNX (QDQ) with the data it reads: raw pixels here
    out = tmp_path / "small_qdq.onnx"
    done = run_cli("export", "--checkpoint", str(path), "--input-scale", "raw", "--format", "onnx", "--out", str(out))
    assert done.returncode == 0, done.stderr
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert (props["normalize_mean"], props["normalize_std"], props["dataset"]) == ("0.0", "1.0", "mnist")
    # explain, diagnose with its HTML report, the qtensors export and QAT from the imported weights
    done = run_cli("explain", "--checkpoint", str(path), "--image", "3", "--layer", "depthwise", "--position", "2,1,1")
    assert done.returncode == 0 and "depthwise at [2, 1, 1]: 9 terms" in done.stdout, done.stderr
    assert "add at [" in done.stdout  # the residual add, TFLite's steps
    html = tmp_path / "report.html"
    done = run_cli("diagnose", "--checkpoint", str(path), "--weight-bits", "3", "--act-bits", "3", "--html", str(html))
    assert done.returncode == 0, done.stderr
    assert all(f">{name}<" in html.read_text() for name in ("stem", "depthwise", "pointwise", "fc"))
    qtensors = tmp_path / "small_q.pt"
    done = run_cli("export", "--checkpoint", str(path), "--format", "qtensors", "--out", str(qtensors))
    assert done.returncode == 0, done.stderr
    from qcore.export.formats import load_qtensors

    assert load_qtensors(str(qtensors)).graph.layers == ("stem", "depthwise", "pointwise", "fc")
    done = run_cli(
        "qat", "--checkpoint", str(path), "--weight-bits", "4", "--act-bits", "4", "--epochs", "1",
        "--train-samples", "2048", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    trained = json.loads(done.stdout)
    assert trained["integer_agreement"] >= 0.99 and 0.0 <= trained["qat_accuracy"] <= 1.0
    refused = run_cli("evaluate", "--checkpoint", str(path), "--model", "fashion-net")
    assert refused.returncode == 2 and "an ONNX --checkpoint brings its own" in refused.stderr
    refused = run_cli("evaluate", "--dataset", "fashion-mnist")
    assert refused.returncode == 2 and "describe an ONNX --checkpoint" in refused.stderr


def test_a_file_with_several_outputs_uses_its_one_output_of_scores(mnist):
    """An exporter that also returns features: the [N, 10] output is the model's, named on the card, and
    the import predicts what ONNX Runtime gives for it."""
    from qcore.models.onnx_import import describe_input

    model = hand_made()
    model.graph.output.insert(0, helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 4, 14, 14]))
    imported = import_onnx(model.SerializeToString(), mnist, "normalized")
    assert imported.scores_output == "scores" and "scores from output scores" in describe_input(imported)
    assert imported.agreement_images == 1000
