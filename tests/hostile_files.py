"""Files an adversary would upload (issue 34), built with onnx.helper and struct, shared by the tests and
bench/bench_hostile.py: names that are Python keywords, builtins or compatibility characters; work the
parameter bound does not see (wide 1x1 convolutions, a padded giant kernel, deep chains); tensors stored in
segments or as strings; safetensors headers nested deep or holding a huge integer. Each builder returns the
file's bytes. LEGITIMATE names the files with odd names that are otherwise ordinary models: they import."""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _model(nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto], output: str = "scores") -> bytes:
    graph = helper.make_graph(
        nodes,
        "hostile",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", 10])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model.SerializeToString()


def _weights(name: str, shape: tuple[int, ...], seed: int = 0) -> onnx.TensorProto:
    values = np.random.default_rng(seed).normal(0, 0.1, shape).astype(np.float32)
    return numpy_helper.from_array(values, name)


def _classifier(conv_names: list[str], weight_names: list[str] | None = None, channels: int = 4) -> bytes:
    """Conv (one per name, 3x3, `channels` wide) and ReLU, then flatten and one Gemm to 10 scores: an ordinary
    small model whose node and tensor names come from the caller."""
    weight_names = weight_names or [f"w{i}" for i in range(len(conv_names))]
    nodes, inits, source, inputs = [], [], "image", 1
    for i, (node_name, weight_name) in enumerate(zip(conv_names, weight_names, strict=True)):
        inits.append(_weights(weight_name, (channels, inputs, 3, 3), i))
        nodes.append(helper.make_node("Conv", [source, weight_name], [f"c{i}"], name=node_name, pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"{node_name}_relu"))
        source, inputs = f"r{i}", channels
    nodes.append(helper.make_node("Flatten", [source], ["flat"], name="flatten", axis=1))
    inits += [_weights("fc_w", (10, channels * 28 * 28), 9), _weights("fc_b", (10,), 10)]
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["scores"], name="/fc/Gemm", transB=1))
    return _model(nodes, inits)


def keyword_node() -> bytes:
    return _classifier(["/class/Conv", "/lambda/Conv"])


def keyword_initializer() -> bytes:
    return _classifier(["conv_a", "conv_b"], ["lambda.weight", "def.weight"])


def builtin_names() -> bytes:
    return _classifier(["/print/Conv", "/self/Conv", "/torch/Conv", "/training/Conv", "/forward/Conv"])


def compatibility_characters() -> bytes:
    # 'ﬁ' (U+FB01) and Fraktur letters are identifiers that NFKC folds into 'fi' and 'conv'
    return _classifier(["/\ufb01/Conv", "/\U0001d520\U0001d52c\U0001d52b\U0001d533/Conv", "/fi/Conv"])


def colliding_names() -> bytes:
    return _classifier(["/a-b/Conv", "/a_b/Conv", "/a.b/Conv", "/a b/Conv"])


def wide_pointwise(channels: int) -> Callable[[], bytes]:
    """A 1x1 convolution from the image to `channels`, then a grouped 1x1 convolution down to the 10 scores
    (10 groups) and global pooling: 2 x `channels` weights in all."""

    def build() -> bytes:
        nodes = [
            helper.make_node("Conv", ["image", "w"], ["wide"], name="/wide/Conv"),
            helper.make_node("Conv", ["wide", "head_w"], ["head"], name="/head/Conv", group=10),
            helper.make_node("GlobalAveragePool", ["head"], ["pooled"], name="pool"),
            helper.make_node("Flatten", ["pooled"], ["scores"], name="flatten"),
        ]
        inits = [_weights("w", (channels, 1, 1, 1)), _weights("head_w", (10, channels // 10, 1, 1))]
        return _model(nodes, inits)

    return build


def giant_kernel(size: int) -> Callable[[], bytes]:
    """A size x size kernel with size/2 padding: 1M parameters at 1000, under the bound, and 0.84 G
    multiply-adds per image (690: 1.9 MB, under the app's upload limit, 0.40 G)."""

    def build() -> bytes:
        pad, out = size // 2, 28 + 2 * (size // 2) - size + 1
        nodes = [
            helper.make_node("Conv", ["image", "w"], ["big"], name="/big/Conv", pads=[pad] * 4),
            helper.make_node("Flatten", ["big"], ["flat"], name="flatten"),
            helper.make_node("Gemm", ["flat", "fc_w"], ["scores"], name="fc", transB=1),
        ]
        return _model(nodes, [_weights("w", (1, 1, size, size)), _weights("fc_w", (10, out * out))])

    return build


def _chain(op: str, length: int) -> bytes:
    """`length` nodes of `op`, each reading the one before twice (Add, Mul) or the one before and the image
    (Concat, which widens by one channel each time), then global pooling and a Gemm."""
    nodes, source, channels = [], "image", 1
    for i in range(length):
        second = "image" if op == "Concat" else source
        attributes = {"axis": 1} if op == "Concat" else {}
        nodes.append(helper.make_node(op, [source, second], [f"v{i}"], name=f"/{op.lower()}{i}/{op}", **attributes))
        source = f"v{i}"
        channels += op == "Concat"
    nodes += [
        helper.make_node("GlobalAveragePool", [source], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w"], ["scores"], name="fc", transB=1),
    ]
    return _model(nodes, [_weights("fc_w", (10, channels))])


def segmented_tensor() -> bytes:
    model = onnx.load_from_string(_classifier(["conv"]))
    model.graph.initializer[0].segment.begin = 0
    model.graph.initializer[0].segment.end = 4
    return model.SerializeToString()


def string_tensor() -> bytes:
    model = onnx.load_from_string(_classifier(["conv"]))
    model.graph.initializer.append(helper.make_tensor("labels", TensorProto.STRING, [2], [b"a", b"b"]))
    return model.SerializeToString()


def string_constant() -> bytes:
    model = onnx.load_from_string(_classifier(["conv"]))
    constant = helper.make_node(
        "Constant", [], ["text"], name="text", value=helper.make_tensor("t", TensorProto.STRING, [1], [b"x"])
    )
    model.graph.node.insert(0, constant)
    return model.SerializeToString()


def _safetensors(header: bytes, payload: bytes = b"\0" * 4) -> bytes:
    return struct.pack("<Q", len(header)) + header + payload


def nested_safetensors_header() -> bytes:
    return _safetensors(b'{"a": ' + b"[" * 20_000 + b"]" * 20_000 + b"}")


def huge_integer_safetensors_header() -> bytes:
    return _safetensors(b'{"a": {"dtype": "F32", "shape": [' + b"9" * 50_000 + b'], "data_offsets": [0, 4]}}')


LEGITIMATE: dict[str, Callable[[], bytes]] = {
    "keyword-named nodes": keyword_node,
    "keyword-named initializers": keyword_initializer,
    "builtin- and attribute-named nodes": builtin_names,
    "compatibility characters in names": compatibility_characters,
    "names that collide once sanitized": colliding_names,
}

# name -> (builder, file suffix, what its one-line refusal says)
REFUSED: dict[str, tuple[Callable[[], bytes], str, str]] = {
    "1x1 convolution to 512 channels": (wide_pointwise(512), ".onnx", "401,408 values per image"),
    "1x1 convolution to 2,048 channels": (wide_pointwise(2048), ".onnx", "1,605,632 values per image"),
    "1x1 convolution to 100,000 channels": (wide_pointwise(100_000), ".onnx", "78,400,000 values per image"),
    "padded 1000x1000 kernel": (giant_kernel(1000), ".onnx", "100,000,000 multiply-adds per image"),
    "padded 690x690 kernel": (giant_kernel(690), ".onnx", "100,000,000 multiply-adds per image"),
    "chain of 1,990 Add": (lambda: _chain("Add", 1990), ".onnx", "at most 256 operations"),
    "chain of 300 Add": (lambda: _chain("Add", 300), ".onnx", "at most 256 operations"),
    "chain of 1,990 Mul": (lambda: _chain("Mul", 1990), ".onnx", "unsupported operation Mul"),
    "chain of 1,990 Concat": (lambda: _chain("Concat", 1990), ".onnx", "activations reach"),
    "segmented tensor": (segmented_tensor, ".onnx", "stored in segments"),
    "string tensor": (string_tensor, ".onnx", "data type 8"),
    "string constant": (string_constant, ".onnx", "data type 8"),
    "safetensors header nested 20,000 deep": (nested_safetensors_header, ".safetensors", "nests 20001 deep"),
    "safetensors header with a 50,000-digit integer": (
        huge_integer_safetensors_header,
        ".safetensors",
        "a number of 50000 digits",
    ),
}


def own_peak_rss_bytes() -> int:
    """This process's own peak RSS (VmHWM). getrusage's ru_maxrss, and os.wait4's for a child, start from the
    forking process's peak, since Linux carries the old memory's high-water mark across exec: a child of 1 GB
    started by a 3 GB test process read 3.4 GB."""
    with open("/proc/self/status") as status:
        kib = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    return int(kib) * 1024


def refuse_each(folder: str) -> dict[str, dict[str, object]]:
    """`qcore evaluate --checkpoint FILE --json` for every file in `folder`, one after another in this process,
    as a server imports uploads: each file's exit code, seconds and what it wrote to stderr."""
    import contextlib
    import io
    import time
    from pathlib import Path

    from qcore.cli import main

    results: dict[str, dict[str, object]] = {}
    for path in sorted(Path(folder).iterdir()):
        started = time.perf_counter()
        stderr = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
            code = main(["evaluate", "--checkpoint", str(path), "--json"])
        seconds = round(time.perf_counter() - started, 3)
        results[path.name] = {"exit": code, "seconds": seconds, "stderr": stderr.getvalue().strip()}
    return results


if __name__ == "__main__":  # python -m tests.hostile_files FOLDER: JSON of each file's result and the peak RSS
    import json
    import sys

    print(json.dumps({"files": refuse_each(sys.argv[1]), "peak_rss_bytes": own_peak_rss_bytes()}))
