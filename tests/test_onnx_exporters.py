"""Issue 28: ONNX files as exporters other than today's torch.onnx.export write them. Each file is built
here: torch.onnx.export at the old opsets 7 to 10, and onnx.helper graphs written the way tf2onnx writes
Keras models (channels-last input in [0, 255] scaled inside the graph, Transposes around the
convolutions, BatchNorm as Mul and Add, MatMul + Add, Gemm with alpha, Softmax, the ai.onnx.ml import,
nodes out of order). Trained weights (the bundled notebook net, a small perceptron trained here) make the
pixel convention measurable: `auto` must find the one each file was written for, and the import must
predict what the original network predicts, as ONNX Runtime does on the file (the arrival check)."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from qcore.analysis.tables import quantize_for
from qcore.data import with_input_scale
from qcore.export.formats import OnnxRunner, export_onnx
from qcore.graph import model_graph
from qcore.inference.integer import IntegerNet
from qcore.models.checkpoint import load_model
from qcore.models.onnx_import import OnnxImportError, describe_input, import_onnx
from qcore.quantize.config import QuantConfig
from tests.conftest import run_cli


def _export(model: nn.Module, example: torch.Tensor, opset: int = 17, initializers_as_inputs: bool = False) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), buffer, dynamo=False, opset_version=opset, input_names=["input"],
            output_names=["output"], dynamic_axes={"input": {0: "N"}, "output": {0: "N"}},
            do_constant_folding=False, keep_initializers_as_inputs=initializers_as_inputs,
        )  # fmt: skip
    return buffer.getvalue()


@pytest.fixture(scope="module")
def net():
    return load_model().eval()


@pytest.mark.slow
@pytest.mark.parametrize("opset", [7, 8, 9, 10])
def test_old_opsets_are_upgraded_and_predict_what_the_network_does(mnist, net, opset):
    """torch's exporter at opsets 7 to 10 (initializers listed as inputs too, as exporters then did):
    upgraded by onnx's version converter, the convention measured (the net reads standardized images), and
    the same predictions as the network on 1,000 test images."""
    data = _export(net, torch.zeros(1, 1, 28, 28), opset, initializers_as_inputs=opset < 9)
    imported = import_onnx(data, mnist)
    assert imported.opset == opset and imported.input_scale == "normalized" and imported.scale_measured
    accuracies = dict(imported.scale_accuracies)
    assert set(accuracies) == {"normalized", "raw", "raw255", "symmetric"} and accuracies["normalized"] > 0.98
    x = mnist.test.images[:1000]
    with torch.inference_mode():
        assert torch.equal(imported.module(x).argmax(1), net(x).argmax(1))


def _keras_style(net: nn.Module) -> onnx.ModelProto:
    """The notebook net as tf2onnx writes a Keras model: input [N, 28, 28, 1] in [0, 255], Mul by 1/255 and
    standardization inside the graph, Transpose to channels-first, conv1 as Conv, Mul and Add (BatchNorm's
    form), max pooling with auto_pad VALID, a Transpose back to channels-last before the flatten, fc1 as
    MatMul + Add over the channels-last features, fc2 as Gemm with alpha 2, Softmax; ai.onnx.ml declared
    and unused; the nodes listed out of order."""
    rng = np.random.default_rng(0)
    sd = {name: value.detach().numpy().astype(np.float32) for name, value in net.state_dict().items()}
    scale = rng.uniform(0.5, 2.0, 20).astype(np.float32)
    channels_last = np.arange(800).reshape(50, 4, 4).transpose(1, 2, 0).reshape(-1)  # NHWC position -> NCHW index
    pad = {"auto_pad": "VALID"}
    constants = {
        "k255": np.array(1 / 255, np.float32),
        "mean": np.array(0.1307, np.float32),
        "std": np.array(0.3081, np.float32),
        "w1": sd["conv1.weight"] / scale[:, None, None, None],
        "s1": scale.reshape(20, 1, 1),
        "b1": sd["conv1.bias"].reshape(1, 20, 1, 1),
        "w2": sd["conv2.weight"],
        "b2": sd["conv2.bias"],
        "zero": np.array([0], np.int64),
        "one": np.array([1], np.int64),
        "minus_one": np.array([-1], np.int64),
        "m1": np.ascontiguousarray(sd["fc1.weight"][:, channels_last].T),
        "a1": sd["fc1.bias"],
        "w3": sd["fc2.weight"] / 2,
        "b3": sd["fc2.bias"],
    }
    nodes = [
        helper.make_node("Mul", ["input", "k255"], ["scaled"], name="sequential/rescaling/mul"),
        helper.make_node("Sub", ["scaled", "mean"], ["centred"], name="sequential/normalization/sub"),
        helper.make_node("Div", ["centred", "std"], ["standard"], name="sequential/normalization/truediv"),
        helper.make_node("Transpose", ["standard"], ["nchw"], perm=[0, 3, 1, 2], name="sequential/conv2d/Transpose"),
        helper.make_node("Conv", ["nchw", "w1"], ["c1"], kernel_shape=[5, 5], name="sequential/conv2d/Conv2D", **pad),
        helper.make_node("Mul", ["c1", "s1"], ["bn1"], name="sequential/batch_norm/mul"),
        helper.make_node("Add", ["bn1", "b1"], ["c1b"], name="sequential/batch_norm/add"),
        helper.make_node("MaxPool", ["c1b"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], auto_pad="VALID"),
        helper.make_node("Relu", ["p1"], ["r1"], name="sequential/re_lu/Relu"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], kernel_shape=[5, 5], name="sequential/conv2d_1/Conv2D"),
        helper.make_node("MaxPool", ["c2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Relu", ["p2"], ["r2"], name="sequential/re_lu_1/Relu"),
        helper.make_node("Transpose", ["r2"], ["nhwc"], perm=[0, 2, 3, 1], name="sequential/flatten/Transpose"),
        # the target shape computed as tf2onnx writes it: the batch sliced from the input's Shape, -1, a Cast
        helper.make_node("Shape", ["nhwc"], ["nhwc_shape"], name="sequential/flatten/Shape"),
        helper.make_node("Slice", ["nhwc_shape", "zero", "one"], ["batch"], name="sequential/flatten/strided_slice"),
        helper.make_node("Concat", ["batch", "minus_one"], ["target32"], axis=0, name="sequential/flatten/packed"),
        helper.make_node("Cast", ["target32"], ["target"], to=TensorProto.INT64, name="sequential/flatten/Cast"),
        helper.make_node("Reshape", ["nhwc", "target"], ["features"], name="sequential/flatten/Reshape"),
        helper.make_node("MatMul", ["features", "m1"], ["h"], name="sequential/dense/MatMul"),
        helper.make_node("Add", ["h", "a1"], ["hb"], name="sequential/dense/BiasAdd"),
        helper.make_node("Relu", ["hb"], ["hr"], name="sequential/dense/Relu"),
        helper.make_node("Gemm", ["hr", "w3", "b3"], ["logits"], alpha=2.0, transB=1, name="sequential/dense_1/Gemm"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1, name="sequential/dense_1/Softmax"),
    ]
    order = [*nodes[9:], *nodes[:9]]  # out of order, as some writers leave them: the later half first
    graph = helper.make_graph(
        order,
        "tf2onnx",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["unk__6", 28, 28, 1])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["unk__7", 10])],
        [numpy_helper.from_array(value, name) for name, value in constants.items()],
    )
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", 2)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="tf2onnx", producer_version="1.16.1")


@pytest.mark.slow
def test_a_keras_model_as_tf2onnx_writes_it_imports_measures_its_pixels_and_quantizes(mnist, net, tmp_path):
    """The tf2onnx-style notebook net: imported, its convention measured as [0, 255] (its graph scales
    the image itself), its input step shown, the same predictions as the network; then W8A8 (the
    integer engine agreeing with the simulation), the ONNX QDQ export running in ONNX Runtime, and the
    CLI's JSON naming the convention and the four candidates' accuracies."""
    data = _keras_style(net).SerializeToString()
    imported = import_onnx(data, mnist)
    assert imported.input_scale == "raw255" and imported.input_layout == (28, 28, 1)
    assert imported.input_steps[:3] == ("Mul 0.00392157", "Sub 0.1307", "Div 0.3081")
    assert imported.input_affine == pytest.approx((1 / 255 / 0.3081, -0.1307 / 0.3081), rel=1e-6)
    accuracies = dict(imported.scale_accuracies)
    assert accuracies["raw255"] > 0.98 and max(accuracies.values()) == accuracies["raw255"]
    assert any("pixels in [0, 255] (measured best)" in line for line in describe_input(imported))
    graph = model_graph(imported.module)
    assert [op.kind for op in graph.ops if op.kind in ("conv", "linear")] == ["conv", "conv", "linear", "linear"]
    # what the lab's graph reads is the dataset's standardized image: the file's step undoes its [0, 255]
    seen = with_input_scale(mnist, imported.input_scale, imported.input_affine)
    assert torch.allclose(seen.test.images[:100], mnist.test.images[:100], atol=1e-5)
    x = seen.test.images[:1000]
    with torch.inference_mode():
        assert torch.equal(imported.module(x).argmax(1), net(mnist.test.images[:1000]).argmax(1))
    quantized = quantize_for(imported.module, seen, QuantConfig())
    with torch.inference_mode():
        simulated = quantized(x[:500]).argmax(1)
    assert torch.equal(IntegerNet(quantized).predict(x[:500]), simulated)
    assert torch.equal(OnnxRunner(export_onnx(quantized, seen.spec)).predict(x[:500]), simulated)

    path = tmp_path / "keras.onnx"
    path.write_bytes(data)
    done = run_cli("evaluate", "--checkpoint", str(path), "--json")
    assert done.returncode == 0, done.stderr
    onnx_card = json.loads(done.stdout)["onnx"]
    assert onnx_card["input_scale"] == "raw255" and onnx_card["input_scale_chosen_by"] == "measured"
    assert set(onnx_card["input_scale_accuracies"]) == {"normalized", "raw", "raw255", "symmetric"}
    assert onnx_card["input_layout"] == [28, 28, 1]


class Perceptron(nn.Module):
    def __init__(self, flat: bool) -> None:
        super().__init__()
        self.flat = flat
        self.hidden = nn.Linear(784, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1) if not self.flat else x
        return self.out(torch.relu(self.hidden(x)))


@pytest.fixture(scope="module")
def perceptron(mnist):
    """A perceptron trained here for two passes over 10,000 images in [-1, 1] (a common convention)."""
    torch.manual_seed(0)
    model = Perceptron(flat=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    images = (mnist.train.images[:10_000] * 0.3081 + 0.1307) * 2 - 1
    for _ in range(2):
        for start in range(0, 10_000, 100):
            loss = nn.functional.cross_entropy(
                model(images[start : start + 100].flatten(1)), mnist.train.labels[start : start + 100]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.mark.parametrize("layout", ["flat float64", "28x28", "batch of 1"])
def test_a_perceptron_reads_pixels_in_minus_one_to_one(mnist, perceptron, layout):
    """A perceptron on [N, 784] float64 input (cast to float in the graph), on [N, 28, 28] (flattened in
    the graph) and with its batch fixed at 1 (a Reshape to [1, -1]): `auto` finds [-1, 1], and the import
    predicts what the perceptron does."""
    if layout == "flat float64":
        model = onnx.load_from_string(_export(perceptron, torch.zeros(1, 784)))
        model.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE
        model.graph.node.insert(0, helper.make_node("Cast", ["input"], ["as_float"], to=TensorProto.FLOAT))
        for node in model.graph.node[1:]:
            node.input[:] = ["as_float" if name == "input" else name for name in node.input]
        data = model.SerializeToString()
    else:
        wrapped = Perceptron(flat=False)
        wrapped.load_state_dict(perceptron.state_dict())
        example = torch.zeros(1, 28, 28) if layout == "28x28" else torch.zeros(1, 1, 28, 28)
        if layout == "28x28":
            data = _export(wrapped.eval(), example)
        else:
            buffer = io.BytesIO()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(wrapped.eval(), (example,), buffer, dynamo=False, opset_version=13)
            data = buffer.getvalue()
    imported = import_onnx(data, mnist)
    assert imported.input_scale == "symmetric", dict(imported.scale_accuracies)
    seen = with_input_scale(mnist, imported.input_scale, imported.input_affine)
    with torch.inference_mode():
        reference = perceptron(((mnist.test.images[:1000] * 0.3081 + 0.1307) * 2 - 1).flatten(1)).argmax(1)
        assert torch.equal(imported.module(seen.test.images[:1000]).argmax(1), reference)


def test_a_three_channel_input_reads_the_grey_image_in_each_channel(mnist, net):
    """[N, 3, 28, 28]: the first convolution's weights summed over the three channels, exactly."""

    class ThreeChannels(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = type(net)()
            self.net.load_state_dict(net.state_dict())
            self.net.conv1 = nn.Conv2d(3, 20, 5)
            with torch.no_grad():
                self.net.conv1.weight.copy_(net.conv1.weight.repeat(1, 3, 1, 1) / 3)
                self.net.conv1.bias.copy_(net.conv1.bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    imported = import_onnx(_export(ThreeChannels().eval(), torch.zeros(1, 3, 28, 28)), mnist)
    assert imported.input_layout == (3, 28, 28) and imported.input_scale == "normalized"
    x = mnist.test.images[:1000]
    with torch.inference_mode():
        assert torch.equal(imported.module(x).argmax(1), net(x).argmax(1))


def _transposed_image() -> bytes:
    model = _keras_style(load_model())
    node = next(n for n in model.graph.node if n.op_type == "Transpose" and n.output[0] == "nchw")
    node.attribute[0].ints[:] = [0, 3, 2, 1]  # height and width swapped: another image
    return model.SerializeToString()


def _uneven_pads() -> bytes:
    model = _keras_style(load_model())
    node = next(n for n in model.graph.node if n.op_type == "Conv" and n.output[0] == "c1")
    del node.attribute[:]
    node.attribute.extend([helper.make_attribute("kernel_shape", [5, 5]), helper.make_attribute("pads", [0, 0, 2, 2])])
    return model.SerializeToString()


@pytest.mark.parametrize(
    "build,needle",
    [
        (_uneven_pads, "pads 0 before and 2 after; at most one apart"),
        (_transposed_image, "a transpose [0, 3, 2, 1] that reorders the image's pixels"),
    ],
)
def test_what_the_lab_cannot_express_is_refused_in_one_line(mnist, build, needle):
    with pytest.raises(OnnxImportError) as caught:
        import_onnx(build(), mnist)
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_the_kernel_lesson_shows_a_perceptrons_row_as_the_image_it_reads(perceptron):
    """A model without convolutions: the lesson's layers are its linear layers, and a row of 784 weights
    is drawn as 28x28; its integers at 8 bits per-channel symmetric min/max are round(w / (max|w| / 127))."""
    from qcore.lessons.steps import kernel_layers, one_kernel

    model = Perceptron(flat=False)  # the lab's graph reads [N, 1, 28, 28] images
    model.load_state_dict(perceptron.state_dict())
    assert kernel_layers(model) == ["hidden", "out"]
    row = perceptron.hidden.weight.detach()[5]
    kernel = one_kernel(model.eval(), QuantConfig(granularity="per-channel", weight_range="minmax"), 5, "hidden")
    assert torch.tensor(kernel.weights).shape == (28, 28)
    expected = torch.round(row / (row.abs().max() / 127)).reshape(28, 28)
    assert torch.equal(torch.tensor(kernel.per_channel.ints, dtype=torch.float32), expected)


class Activations(nn.Module):
    """Every activation other than ReLU that exporters write, inside the network, and a Sigmoid over the
    scores (which stays float)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc1, self.fc2, self.fc3 = nn.Linear(8 * 7 * 7, 64), nn.Linear(64, 32), nn.Linear(32, 10)
        self.inside = nn.ModuleList([nn.LeakyReLU(0.1), nn.ELU(), nn.Hardswish(), nn.Tanh(), nn.Hardsigmoid()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leaky, elu, hardswish, tanh, hardsigmoid = self.inside
        x = nn.functional.max_pool2d(leaky(self.conv1(x)), 2)
        x = hardswish(elu(self.conv2(x))).flatten(1)
        return torch.sigmoid(self.fc3(hardsigmoid(self.fc2(tanh(self.fc1(x))))))


@pytest.mark.slow
def test_activations_other_than_relu_are_tables_on_integers_and_agree_everywhere(mnist):
    """LeakyRelu, Elu, HardSwish, Tanh and HardSigmoid (as torch exports them) become the lab's lookups:
    the simulation and the integer engine read one table per activation, so at W8A8 and W4A4 they agree
    on every one of 1,000 images, as do the ONNX export (a Gather on that table) under ONNX Runtime and
    the qtensors file; a table's levels are the activation of each input level, rounded, computed here
    in float64 (equal but for rounding ties). The final Sigmoid stays float."""
    from qcore.export.formats import load_qtensors, qtensors_bytes

    torch.manual_seed(0)
    model = Activations().eval()
    imported = import_onnx(_export(model, torch.zeros(1, 1, 28, 28)), mnist, "normalized")
    graph = model_graph(imported.module)
    kinds = [op.attrs["function"] for op in graph.ops if op.kind == "lookup"]
    assert kinds == ["leaky_relu", "elu", "hardswish", "tanh", "hardsigmoid"]
    assert graph.op(graph.output).kind == "linear"  # the sigmoid over the scores is not quantized
    x = mnist.test.images[:1000]
    with torch.inference_mode():
        assert torch.equal(imported.module(x).argmax(1), model(x).argmax(1))
    for bits in (8, 4):
        quantized = quantize_for(imported.module, mnist, QuantConfig(weight_bits=bits, act_bits=bits))
        with torch.inference_mode():
            simulated = quantized(x).argmax(1)
        assert torch.equal(IntegerNet(quantized).predict(x), simulated), bits
        assert torch.equal(load_qtensors(qtensors_bytes(IntegerNet(quantized))).predict(x), simulated), bits
        if bits == 8:
            assert torch.equal(OnnxRunner(export_onnx(quantized, mnist.spec)).predict(x), simulated)
            tanh = next(op.name for op in graph.ops if op.attrs.get("function") == "tanh")
            source = quantized.points[quantized.plan.grid[graph.op(tanh).inputs[0]]].qparams
            target = quantized.points[tanh].qparams
            low, table = quantized.lookup_tables[tanh]
            levels = np.arange(low, low + len(table))
            real = (levels - int(source.zero_point)) * float(source.scale)
            by_hand = np.clip(np.round(np.tanh(real) / float(target.scale)) + int(target.zero_point), 0, 255)
            assert np.abs(table.numpy() - by_hand).max() <= 1 and (table.numpy() == by_hand).mean() > 0.99
    # the One image walk shows a table lookup: the input's level, the real it stands for, the entry
    from qcore.lessons.walk import explain

    quantized = quantize_for(imported.module, mnist, QuantConfig())
    walk = explain(imported.module, mnist, QuantConfig(), 0, qnet=quantized)
    step = next(lookup for lookup in walk.lookups if lookup.function == "tanh")
    assert step.name in walk.order and step.table_size == 256
    assert step.activation_real == pytest.approx(float(np.tanh(step.input_real)), abs=1e-6)
    assert abs(step.output_real - step.activation_real) <= float(quantized.points[step.name].qparams.scale) / 2 + 1e-6
    # torch's own int8 engine runs it too, with its own activation kernels
    from qcore.export.deploy import run_engine

    with torch.inference_mode():
        everything = quantized(mnist.test.images).argmax(1)
    engine = run_engine("torch-int8", imported.module, mnist, quantized, everything)
    assert engine.agreement_with_simulation > 0.9


@pytest.mark.slow
def test_the_qdq_export_of_an_imported_model_reads_the_files_own_input(mnist, net, tmp_path):
    """`export --format onnx` of the tf2onnx-style file: the QDQ model takes [N, 28, 28, 1] pixels in
    [0, 255] like the original, its metadata describe them, and ONNX Runtime on it predicts what the
    simulation does on the lab's images."""
    data = _keras_style(net).SerializeToString()
    path, out = tmp_path / "keras.onnx", tmp_path / "keras_qdq.onnx"
    path.write_bytes(data)
    done = run_cli("export", "--checkpoint", str(path), "--format", "onnx", "--out", str(out))
    assert done.returncode == 0, done.stderr
    exported = onnx.load(str(out))
    dims = [d.dim_value or d.dim_param for d in exported.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 28, 28, 1]
    props = {p.key: p.value for p in exported.metadata_props}
    assert (float(props["normalize_mean"]), float(props["normalize_std"])) == pytest.approx((0.0, 1 / 255))
    imported = import_onnx(data, mnist)
    seen = with_input_scale(mnist, imported.input_scale, imported.input_affine)
    quantized = quantize_for(imported.module, seen, QuantConfig())
    pixels = ((mnist.test.images[:1000] * 0.3081 + 0.1307) * 255).permute(0, 2, 3, 1).contiguous().numpy()
    import onnxruntime

    session = onnxruntime.InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"])
    scores = session.run(None, {"input": pixels})[0]
    with torch.inference_mode():
        simulated = quantized(seen.test.images[:1000]).argmax(1)
    assert float((torch.from_numpy(scores).argmax(1) == simulated).float().mean()) >= 0.999


class Normalized(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.instance = nn.InstanceNorm2d(4, affine=True)
        self.fc1, self.layer, self.fc2 = nn.Linear(4 * 14 * 14, 32), nn.LayerNorm(32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.instance(self.conv(x))), 2).flatten(1)
        return self.fc2(torch.relu(self.layer(self.fc1(x))))


def test_normalizations_by_the_samples_statistics_run_in_float_and_the_engine_names_them(mnist):
    """InstanceNormalization and LayerNormalization (torch's export) and a MeanVarianceNormalization over
    channels, height and width: float between a dequantize and a quantize in the simulation (whose
    W8A8 predictions stay close to the float model's), named on the card and by the integer engine's
    one-line refusal."""
    from qcore.inference.integer import IntegerEngineError

    torch.manual_seed(0)
    model = Normalized().eval()
    with torch.no_grad():
        model.instance.weight.uniform_(0.5, 1.5)
        model.layer.bias.uniform_(-0.2, 0.2)
    file = onnx.load_from_string(_export(model, torch.zeros(1, 1, 28, 28)))
    relu = next(node for node in file.graph.node if node.op_type == "Relu")
    mvn = helper.make_node("MeanVarianceNormalization", [relu.input[0]], ["mvn_out"], axes=[1, 2, 3], name="/mvn")
    relu.input[0] = "mvn_out"
    file.graph.node.insert(list(file.graph.node).index(relu), mvn)
    imported = import_onnx(file.SerializeToString(), mnist, "normalized")
    graph = model_graph(imported.module)
    assert [op.attrs["function"] for op in graph.ops if op.kind == "normalize"] == [
        "instance_norm",
        "mvn",
        "layer_norm",
    ]
    assert any("in float between a dequantize and a quantize" in line for line in describe_input(imported))
    x = mnist.test.images[:1000]
    quantized = quantize_for(imported.module, mnist, QuantConfig())
    with torch.inference_mode():
        agree = float((quantized(x).argmax(1) == imported.module(x).argmax(1)).float().mean())
    assert agree > 0.95
    with pytest.raises(
        IntegerEngineError, match=r"no integer rule for a normalization .*: \w+, \w+, \w+ \(the simulation"
    ):
        IntegerNet(quantized)


def _cntk_style(net: nn.Module) -> bytes:
    """The notebook net as CNTK wrote its MNIST model (the ONNX model zoo's mnist-8): opset 8, IR version 3
    with every initializer also a graph input, a batch fixed at 1, pixels in [0, 255] read by the first
    convolution directly, each bias as a separate Add of a [C, 1, 1] constant, a Reshape to [1, 800], and
    the dense weights reshaped and transposed inside the graph before their MatMul; and a pool padded at
    its end only, as Chainer's cover_all pooling writes it."""
    sd = {name: value.detach().numpy().astype(np.float64) for name, value in net.state_dict().items()}
    mean, std = 0.1307, 0.3081
    w1 = sd["conv1.weight"] / (255 * std)  # conv1 on pixels in [0, 255] computes conv1 on standardized ones
    b1 = sd["conv1.bias"] - sd["conv1.weight"].sum(axis=(1, 2, 3)) * mean / std
    constants = {
        "Parameter5": w1,
        "Parameter6": b1.reshape(20, 1, 1),
        "Parameter87": sd["conv2.weight"],
        "Parameter88": sd["conv2.bias"].reshape(50, 1, 1),
        "Pooling160_reshape": np.array([1, 800], np.int64),
        "Parameter193": sd["fc1.weight"].T.reshape(50, 16, 500),  # stored in another shape, reshaped in the graph
        "Parameter193_shape": np.array([800, 500], np.int64),
        "Parameter194": sd["fc1.bias"].reshape(1, 500),
        "Parameter210": sd["fc2.weight"],  # [10, 500]: transposed in the graph
        "Parameter211": sd["fc2.bias"].reshape(1, 10),
    }
    constants = {
        name: value if value.dtype == np.int64 else value.astype(np.float32) for name, value in constants.items()
    }
    nodes = [
        helper.make_node(
            "Conv", ["Input3", "Parameter5"], ["Convolution28"], kernel_shape=[5, 5], name="Convolution28"
        ),
        helper.make_node("Add", ["Convolution28", "Parameter6"], ["Plus30"], name="Plus30"),
        helper.make_node(
            "MaxPool", ["Plus30"], ["Pooling66"], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1], name="Pool66"
        ),  # Chainer's cover_all pads: one more at the end, never read on 24 pixels
        helper.make_node("Relu", ["Pooling66"], ["ReLU32"], name="ReLU32"),
        helper.make_node("Conv", ["ReLU32", "Parameter87"], ["Convolution110"], kernel_shape=[5, 5], name="Conv110"),
        helper.make_node("Add", ["Convolution110", "Parameter88"], ["Plus112"], name="Plus112"),
        helper.make_node("MaxPool", ["Plus112"], ["Pooling160"], kernel_shape=[2, 2], strides=[2, 2], name="Pool160"),
        helper.make_node("Relu", ["Pooling160"], ["ReLU114"], name="ReLU114"),
        helper.make_node("Reshape", ["ReLU114", "Pooling160_reshape"], ["Flat"], name="Pooling160_Output_0_reshape0"),
        helper.make_node("Reshape", ["Parameter193", "Parameter193_shape"], ["W193"], name="Parameter193_reshape1"),
        helper.make_node("MatMul", ["Flat", "W193"], ["Times212"], name="Times212"),
        helper.make_node("Add", ["Times212", "Parameter194"], ["Plus214a"], name="Plus214a"),
        helper.make_node("Relu", ["Plus214a"], ["Hidden"], name="Relu214"),
        helper.make_node("Transpose", ["Parameter210"], ["W210"], perm=[1, 0], name="Parameter210_transpose"),
        helper.make_node("MatMul", ["Hidden", "W210"], ["Times622"], name="Times622"),
        helper.make_node("Add", ["Times622", "Parameter211"], ["Plus214_Output_0"], name="Plus214"),
    ]
    inputs = [helper.make_tensor_value_info("Input3", TensorProto.FLOAT, [1, 1, 28, 28])]
    inputs += [
        helper.make_tensor_value_info(name, TensorProto.INT64 if v.dtype == np.int64 else TensorProto.FLOAT, v.shape)
        for name, v in constants.items()
    ]
    graph = helper.make_graph(
        nodes,
        "CNTKGraph",
        inputs,
        [helper.make_tensor_value_info("Plus214_Output_0", TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(value, name) for name, value in constants.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], producer_name="CNTK")
    model.ir_version = 3
    return model.SerializeToString()


@pytest.mark.slow
def test_a_cntk_style_file_imports_with_its_weights_prepared_in_the_graph(mnist, net):
    """CNTK's MNIST layout (opset 8, IR 3, batch 1, raw [0, 255] pixels, bias Adds, weights reshaped and
    transposed by the graph): upgraded, the convention measured as [0, 255], the same predictions as the
    notebook net, and the same at W8A8 on the integer engine as in the simulation."""
    imported = import_onnx(_cntk_style(net), mnist)
    assert imported.opset == 8 and imported.input_scale == "raw255", dict(imported.scale_accuracies)
    seen = with_input_scale(mnist, imported.input_scale, imported.input_affine)
    with torch.inference_mode():
        assert torch.equal(imported.module(seen.test.images[:1000]).argmax(1), net(mnist.test.images[:1000]).argmax(1))
    quantized = quantize_for(imported.module, seen, QuantConfig())
    with torch.inference_mode():
        simulated = quantized(seen.test.images[:500]).argmax(1)
    assert torch.equal(IntegerNet(quantized).predict(seen.test.images[:500]), simulated)


def test_batchnorm_on_the_image_and_after_a_dense_layer_global_max_pooling_and_zero_padding(mnist):
    """More of what Keras models hold, written as tf2onnx writes them: a BatchNormalization of the input
    image (an affine input step), ZeroPadding2D as a Pad before the conv (its padding), GlobalMaxPooling2D,
    a Dense layer's BatchNormalization (folded into it). Random weights: the reference is ONNX Runtime on
    the file (the arrival check, every prediction the same on 1,000 images)."""
    rng = np.random.default_rng(1)
    f32 = np.float32
    constants = {
        "bn0": [np.array([v], f32) for v in (1.7, 0.2, 0.1, 0.8)],
        "pads": np.array([0, 0, 2, 2, 0, 0, 2, 2], np.int64),
        "w": rng.normal(0, 0.3, (16, 1, 5, 5)).astype(f32),
        "b": rng.normal(0, 0.1, 16).astype(f32),
        "flat": np.array([-1, 16], np.int64),
        "m": rng.normal(0, 0.3, (16, 32)).astype(f32),
        "a": rng.normal(0, 0.1, 32).astype(f32),
        "bn1": [
            rng.uniform(0.5, 1.5, 32).astype(f32),
            rng.normal(0, 0.1, 32).astype(f32),
            rng.normal(0, 0.1, 32).astype(f32),
            rng.uniform(0.5, 1.5, 32).astype(f32),
        ],  # fmt: skip
        "m2": rng.normal(0, 0.3, (32, 10)).astype(f32),
    }
    initializers = []
    for name, value in constants.items():
        if isinstance(value, list):
            initializers += [numpy_helper.from_array(v, f"{name}_{i}") for i, v in enumerate(value)]
        else:
            initializers.append(numpy_helper.from_array(value, name))
    bn = [f"bn0_{i}" for i in range(4)]
    nodes = [
        helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("BatchNormalization", ["nchw", *bn], ["normalized"], epsilon=1e-3, name="batch_norm"),
        helper.make_node("Pad", ["normalized", "pads"], ["padded"], mode="constant", name="zero_padding2d"),
        helper.make_node("Conv", ["padded", "w", "b"], ["c"], kernel_shape=[5, 5], name="conv2d"),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalMaxPool", ["r"], ["g"], name="global_max_pooling2d"),
        helper.make_node("Reshape", ["g", "flat"], ["f"]),
        helper.make_node("MatMul", ["f", "m"], ["h"], name="dense/MatMul"),
        helper.make_node("Add", ["h", "a"], ["hb"], name="dense/BiasAdd"),
        helper.make_node("BatchNormalization", ["hb", *(f"bn1_{i}" for i in range(4))], ["hn"], name="bn_dense"),
        helper.make_node("Relu", ["hn"], ["hr"]),
        helper.make_node("MatMul", ["hr", "m2"], ["logits"], name="dense_1/MatMul"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "tf2onnx",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 28, 28, 1])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="tf2onnx")
    imported = import_onnx(model.SerializeToString(), mnist, "normalized")
    assert imported.agreement_images == 1000
    assert imported.input_steps[-1].startswith("BatchNormalization x1.")
    graph_ = model_graph(imported.module)
    conv = next(op for op in graph_.ops if op.kind == "conv")
    assert conv.attrs["padding"] == (2, 2) and [op.kind for op in graph_.ops].count("linear") == 2
    assert any(op.kind == "maxpool" and op.attrs["kernel"] == (28, 28) for op in graph_.ops)


def test_a_fully_convolutional_net_giving_scores_as_a_map_imports(mnist):
    """Scores as [N, 10, 1, 1] (a 1x1 convolution to 10 channels, global average pooling, no flatten):
    flattened at the end, the same predictions as ONNX Runtime and torch."""

    class FullyConvolutional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.classes = nn.Conv2d(1, 8, 3, stride=2), nn.Conv2d(8, 10, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.adaptive_avg_pool2d(self.classes(torch.relu(self.conv(x))), 1)

    torch.manual_seed(0)
    model = FullyConvolutional().eval()
    imported = import_onnx(_export(model, torch.zeros(1, 1, 28, 28)), mnist, "normalized")
    x = mnist.test.images[:1000]
    with torch.inference_mode():
        assert torch.equal(imported.module(x).argmax(1), model(x).flatten(1).argmax(1))
    assert model_graph(imported.module).ops[-1].kind == "flatten"


def test_same_padding_that_splits_unevenly_is_a_kernel_one_larger(mnist):
    """Keras's padding='same' with stride 2 on an even size pads one more at the end (SAME_UPPER), and
    SAME_LOWER one more at the start: each is the larger padding on both sides with the kernel grown by
    a zero row and column, which ONNX Runtime's predictions on 1,000 images confirm (the arrival check)."""
    rng = np.random.default_rng(2)
    weights = {
        "w1": rng.normal(0, 0.3, (8, 1, 5, 5)),  # stride 2 on 28: pads 1 before, 2 after
        "w2": rng.normal(0, 0.3, (8, 8, 3, 3)),  # stride 2 on 14: 0 before, 1 after
        "w3": rng.normal(0, 0.3, (8, 8, 4, 4)),  # SAME_LOWER, stride 1, an even kernel: 2 before, 1 after
        "fc": rng.normal(0, 0.1, (8 * 7 * 7, 10)),
    }
    nodes = [
        helper.make_node("Conv", ["image", "w1"], ["c1"], kernel_shape=[5, 5], strides=[2, 2], auto_pad="SAME_UPPER"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], kernel_shape=[4, 4], auto_pad="SAME_LOWER"),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("Flatten", ["r3"], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes,
        "same",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    imported = import_onnx(model.SerializeToString(), mnist, "normalized")
    convs = [op for op in model_graph(imported.module).ops if op.kind == "conv"]
    assert [tuple(imported.module.get_submodule(op.name).kernel_size) for op in convs] == [(6, 6), (4, 4), (5, 5)]
    assert [op.attrs["padding"] for op in convs] == [(2, 2), (1, 1), (2, 2)]
    assert imported.agreement_images == 1000 and imported.largest_difference < 1e-4
