"""A user's own model as an ONNX file, imported into the lab's model graph. Every file is hostile.

Reading ONNX runs no code, but a file can point its tensors at other files, declare tensors far larger
than itself, nest subgraphs or use any operator. So, in order, `read_onnx`
1. bounds the file's size and parses the protobuf alone (no external data is ever resolved or opened);
2. refuses, each in one line and before any tensor is allocated: external data (wherever `location`
   points), a tensor whose declared size the file does not hold or that passes the bounds below, more
   nodes or parameters than the bounds, subgraphs (If, Loop, Scan, any graph attribute) and local
   functions, ONNX's operator set at a version outside OLD_OPSETS and ONNX_OPSETS, a node of another
   domain or outside the supported set (named, with its node), a cycle, more than one input, an input
   that is not a 28x28 float image in one of INPUT_LAYOUTS, or no single [N, 10] output (named with
   the shapes found); an operator set that no node uses is dropped and nodes are sorted;
then `onnx_module` turns the nodes into a torch.fx module of torch's own layers (Conv2d, BatchNorm2d,
Linear, ReLU, ReLU6, pools) that `qcore.graph.model_graph` traces like any zoo model, evaluating the
constant computations exporters emit around them (Constant; Shape, Gather, Unsqueeze and Concat
feeding a Reshape) with the batch size as a symbol, and following the image through its own input step
(layout, scaling) to the first layer; and `import_onnx` upgrades opsets 7 to 10 and runs ONNX Runtime in
a bounded child process (onnx_sandbox), which also measures the pixel convention, and checks the result
on probe images (finite) and against ONNX Runtime on 1,000 test images (the same prediction on every one).
Names from the file (nodes, operators, producer) only ever appear shortened, as plain text.
"""

from __future__ import annotations

import builtins
import keyword
import math
import operator
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import fx, nn

from qcore.cancel import checkpoint
from qcore.files import shorten
from qcore.models.checkpoint import MAX_FILE_BYTES, CheckpointError, probe_images
from qcore.models.onnx_sandbox import UPGRADE_OPSET

if TYPE_CHECKING:
    import onnx

    from qcore.data import Dataset, DatasetSpec

ONNX_OPSETS = range(11, 24)  # ONNX's own operator set the converter reads: 11 (Clip's bounds as inputs) to 23
OLD_OPSETS = range(7, 11)  # older files (ONNX Runtime runs opset 7 and up), upgraded to UPGRADE_OPSET
MAX_NODES = 2000
MAX_PARAMETERS = 4_000_000  # float32 values across all tensors (the upload limit holds about 1M anyway)
MAX_TENSOR_DIMS = 8
CHECK_IMAGES = 1000  # test images run through ONNX Runtime and the imported graph on arrival
SCALE_IMAGES = 1000  # training images on which each pixel convention's float accuracy is measured
# The work a graph asks for, which the parameter bound does not see (a 1x1 convolution to 2,048 channels
# has 2 kB of weights and 1.6M values per image), bounded from the shapes before anything runs. The zoo's
# largest: one tensor of 25,088 values per image, 182,948 in all, 9.3M multiply-adds, 24 operations.
MAX_TENSOR_VALUES = 131_072  # one activation per image: 128 channels at 32x32, 512 kB
MAX_ACTIVATION_VALUES = 1_048_576  # all activations of one image together: 4 MB
MAX_MULTIPLY_ADDS = 100_000_000  # per image, every convolution and linear layer together
MAX_OPERATIONS = 256  # operations of the lab's graph (layers, activations, pools, adds, ...)
CHECK_MEMORY_BYTES = 256 * 2**20  # the arrival check's batches hold at most this much activation
INPUT_SHAPE = (1, 28, 28)
# the image's layouts a file may read, each the same 784 pixels in the same order (but the grey image
# copied into 3 channels): PyTorch's, Keras's channels-last, without channels, flat (a perceptron)
INPUT_LAYOUTS = {(1, 28, 28), (28, 28, 1), (28, 28), (784,), (3, 28, 28)}
# the scores' shapes a file may give (a fully convolutional net's [N, 10, 1, 1] among them): flattened
SCORE_SHAPES = {(10,), (10, 1, 1), (1, 10), (1, 1, 10)}
CLASSES = 10
# The operators the lab turns into its graph, and those that only compute constants around them
LAYER_OPS = {
    "Conv",
    "Transpose",
    "Cast",
    "Squeeze",
    "Gemm",
    "MatMul",
    "Add",
    "BatchNormalization",
    "Relu",
    "Clip",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Pad",
    "ReduceMean",
    "Flatten",
    "Reshape",
    "Concat",
    "LogSoftmax",
    "Softmax",
    "Sigmoid",
    "Tanh",
    "LeakyRelu",
    "Elu",
    "HardSigmoid",
    "HardSwish",
    "MeanVarianceNormalization",
    "InstanceNormalization",
    "LayerNormalization",
    "Identity",
    "Dropout",
}
CONSTANT_OPS = {"Constant", "Shape", "Gather", "Unsqueeze", "Slice"}
# operations that may also be the image's input step (before the first layer): a layout, a cast, scaling
VIEW_OPS = {"Transpose", "Reshape", "Flatten", "Unsqueeze", "Squeeze", "Cast", "Identity", "Dropout"}
SUPPORTED_OPS = LAYER_OPS | CONSTANT_OPS | VIEW_OPS | {"Mul", "Sub", "Div"}
# operations evaluated on import when every input is a constant tensor (weights prepared in the graph)
FOLDED_ON_CONSTANTS = {"Mul", "Add", "Sub", "Div", "Reshape", "Transpose", "Flatten"}
_DTYPES = {1: ("float32", 4), 6: ("int32", 4), 7: ("int64", 8), 10: ("float16", 2), 11: ("float64", 8)}


class OnnxImportError(CheckpointError):
    """An ONNX file the lab will not import; one line naming what and where."""

    def __init__(self, reason: str) -> None:
        super().__init__([reason])


class _Batch:
    """The batch size inside a shape computation (Shape of the input gives [batch, 1, 28, 28])."""

    def __repr__(self) -> str:
        return "batch"


BATCH = _Batch()


@dataclass(frozen=True)
class ImportedModel:
    """An ONNX model in the lab: the torch module its graph became, where it came from, and the data it
    reads (a dataset's normalized images, or raw [0, 1] pixels)."""

    module: nn.Module
    onnx_bytes: bytes = field(repr=False)
    producer: str
    opset: int  # the file's own; opsets below 11 were upgraded to UPGRADE_OPSET on import
    nodes: int
    parameters: int
    dataset: str
    input_scale: str  # the pixel convention it reads: one of qcore.data.INPUT_SCALES
    agreement_images: int  # test images on which ONNX Runtime and the import were compared
    largest_difference: float  # of any output score between the two on those images
    activation_values: int = 0  # per image, every operation's output together (bounded on arrival)
    multiply_adds: int = 0  # per image
    # each module's name in the lab -> the file's own name for its node: plain text, shortened, for display
    labels: tuple[tuple[str, str], ...] = ()
    # the file's own input step before its first layer, folded into how the lab reads the data: the image
    # times input_affine[0] plus input_affine[1], its layout, and the file's operations, for the card
    input_affine: tuple[float, float] = (1.0, 0.0)
    input_layout: tuple[int, ...] = INPUT_SHAPE
    input_float64: bool = False
    input_steps: tuple[str, ...] = ()
    # the float accuracy under each pixel convention on training images; whether it chose input_scale
    scale_accuracies: tuple[tuple[str, float], ...] = ()
    scale_measured: bool = False
    scores_output: str = ""  # of a file with several outputs, the one the lab uses (plain text, shortened)

    @property
    def input_view(self) -> str:
        """How the lab reads the dataset for this model (qcore.data.input_view_name)."""
        from qcore.data import input_view_name

        return input_view_name(self.input_scale, self.input_affine)

    @property
    def identity(self) -> str:
        """What decides this model's results: its graph and weights (fingerprint), the dataset it is
        evaluated on and the input convention it reads."""
        import hashlib

        from qcore.models.checkpoint import fingerprint

        text = "|".join((fingerprint(self.module), self.dataset, self.input_view))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _where(node: onnx.NodeProto, index: int) -> str:
    return f"at node {shorten(node.name or f'#{index}', 60)}"


def _dims(tensor: onnx.TensorProto, what: str) -> list[int]:
    dims = list(tensor.dims)
    if len(dims) > MAX_TENSOR_DIMS or any(d < 0 for d in dims):
        raise OnnxImportError(f"{what} declares an impossible shape {shorten(str(dims), 60)}")
    return dims


def _declared_elements(dims: list[int], what: str) -> int:
    """prod(dims), refused as soon as it passes the parameter bound (no huge number is ever formed)."""
    count = 1
    for dim in dims:
        count *= dim
        if count > MAX_PARAMETERS:
            raise OnnxImportError(
                f"{what} declares {shorten(str(dims), 60)} values, more than the {MAX_PARAMETERS:,} the lab takes"
            )
    return count


def _check_tensor(tensor: onnx.TensorProto, what: str) -> int:
    """Refuse external data, unknown types and declared sizes the file does not hold; the element count."""
    from onnx import TensorProto

    if tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data) > 0:
        raise OnnxImportError(f"{what} keeps its values in an external file, which the lab never opens")
    if tensor.HasField("segment"):
        raise OnnxImportError(f"{what} is stored in segments, which the lab does not read")
    if tensor.data_type not in _DTYPES:
        raise OnnxImportError(
            f"{what} has data type {tensor.data_type}; float32, float16, float64 and int32/64 are read"
        )
    count = _declared_elements(_dims(tensor, what), what)
    size = _DTYPES[tensor.data_type][1]
    typed = {
        1: len(tensor.float_data),
        6: len(tensor.int32_data),
        7: len(tensor.int64_data),
        10: len(tensor.int32_data),
        11: len(tensor.double_data),
    }[tensor.data_type]
    if tensor.HasField("raw_data") and len(tensor.raw_data) != count * size:
        raise OnnxImportError(
            f"{what} declares {count:,} values ({count * size:,} bytes) but the file holds {len(tensor.raw_data):,}"
        )
    if not tensor.HasField("raw_data") and typed != count:
        raise OnnxImportError(f"{what} declares {count:,} values but the file holds {typed:,}")
    return count


def _tensor_shape(value: onnx.ValueInfoProto) -> list[int | str]:
    shape = value.type.tensor_type.shape
    return [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in shape.dim]


def read_onnx(data: bytes) -> onnx.ModelProto:
    """The parsed model, after every check in the module's docstring's step 2 (nothing allocated from it),
    at the file's own opset (import_onnx upgrades opsets 7 to 10 in the sandbox)."""
    return _read(data)[0]


def _read(data: bytes) -> tuple[onnx.ModelProto, int, int]:
    """read_onnx's model, the opset the file itself declares, and how many outputs the file lists (the
    model keeps only the scores)."""
    import onnx
    from google.protobuf.message import DecodeError

    if len(data) > MAX_FILE_BYTES:
        raise OnnxImportError(f"a file of {len(data) / 1e6:.1f} MB; at most {MAX_FILE_BYTES / 1e6:.1f} MB is accepted")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as error:
        raise OnnxImportError(f"a damaged ONNX file ({shorten(error, 80)})") from None
    if not model.HasField("graph") or model.ir_version <= 0:
        raise OnnxImportError("not an ONNX model (no graph or IR version)")
    if len(model.functions) > 0:
        raise OnnxImportError("the model defines local functions; only a plain graph of ONNX operators is imported")
    opsets = {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}
    opset = opsets.get("ai.onnx", 0)
    if opset not in ONNX_OPSETS and opset not in OLD_OPSETS:
        raise OnnxImportError(
            f"opset {opset}; the lab imports ONNX opsets {OLD_OPSETS.start} to {ONNX_OPSETS.stop - 1} "
            "(torch.onnx.export writes 17 to 20)"
        )
    graph = model.graph
    if len(graph.node) > MAX_NODES:
        raise OnnxImportError(f"{len(graph.node)} nodes; at most {MAX_NODES} are imported")
    for index, node in enumerate(graph.node):
        # GRAPH, GRAPHS, SPARSE_TENSOR(S): subgraphs and sparse data are never imported
        if any(attribute.type in (5, 10, 11, 12) or len(attribute.graphs) for attribute in node.attribute):
            raise OnnxImportError(
                f"a subgraph in {shorten(node.op_type, 30)} {_where(node, index)}: control flow (If, Loop, Scan) "
                "is not imported"
            )
        if node.domain not in ("", "ai.onnx"):
            raise OnnxImportError(
                f"unsupported operation {shorten(node.domain, 30)}.{shorten(node.op_type, 30)} {_where(node, index)} "
                "(only ONNX's own operators are imported)"
            )
        if node.op_type not in SUPPORTED_OPS:
            raise OnnxImportError(f"unsupported operation {shorten(node.op_type, 30)} {_where(node, index)}")
        for attribute in node.attribute:
            for tensor in [*([attribute.t] if attribute.HasField("t") else []), *attribute.tensors]:
                _check_tensor(tensor, f"the constant of node {shorten(node.name, 40)!r}")
    parameters = 0
    for tensor in graph.initializer:
        parameters += _check_tensor(tensor, f"tensor {shorten(tensor.name, 40)!r}")
        if parameters > MAX_PARAMETERS:
            raise OnnxImportError(f"more than {MAX_PARAMETERS:,} parameters in all")
    if len(graph.sparse_initializer) > 0:
        raise OnnxImportError("the model has sparse tensors; only dense ones are imported")
    # tf2onnx declares ai.onnx.ml whether or not a node uses it: a set no node uses is dropped
    kept = [entry for entry in model.opset_import if entry.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    _sort_nodes(graph)
    initialized = {tensor.name for tensor in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initialized]
    if len(inputs) != 1:
        names = ", ".join(shorten(value.name, 30) for value in inputs[:4])
        raise OnnxImportError(f"the model takes {len(inputs)} inputs ({names}); it must take one image tensor")
    shape = _tensor_shape(inputs[0])
    if inputs[0].type.tensor_type.elem_type not in (1, 11) or tuple(shape[1:]) not in INPUT_LAYOUTS:
        raise OnnxImportError(
            f"the input is {shorten(str(shape), 60)}; the lab reads one float image of 28x28 pixels as "
            "[N, 1, 28, 28], [N, 28, 28, 1], [N, 28, 28], [N, 784] or [N, 3, 28, 28]"
        )
    scores = [value for value in graph.output if tuple(_tensor_shape(value)[1:]) in SCORE_SHAPES]
    if len(graph.output) == 1 and not scores:
        shape = _tensor_shape(graph.output[0])
        raise OnnxImportError(f"the output is {shorten(str(shape), 60)}; it must be [N, 10], one score per class")
    if len(scores) != 1:
        raise OnnxImportError(
            f"the model gives {len(graph.output)} outputs, {len(scores)} of them [N, 10]; one must be the 10 scores"
        )
    outputs = len(graph.output)
    if outputs > 1:  # the scores are what the lab quantizes; the other outputs are left out
        chosen = type(scores[0])()
        chosen.CopyFrom(scores[0])
        del graph.output[:]
        graph.output.append(chosen)
    return model, opset, outputs


def image_input(graph: onnx.GraphProto) -> onnx.ValueInfoProto:
    """The graph's one input that is not also an initializer (files of IR version 3, opsets 7 and 8, list
    every initializer as an input too: those are constants)."""
    initialized = {tensor.name for tensor in graph.initializer}
    return next(value for value in graph.input if value.name not in initialized)


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """The nodes in an order where each comes after what it reads (ONNX requires it; older writers did
    not always keep it, and ONNX Runtime sorts such files itself), the file's order kept where it holds
    (Kahn's algorithm, taking the earliest ready node first). A node that reads a value nothing computes,
    or a cycle, is refused."""
    import heapq

    known = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer} | {""}
    nodes = list(graph.node)
    waiting: dict[str, list[int]] = {}  # value name -> nodes that read it before it is known
    missing = [0] * len(nodes)
    for position, node in enumerate(nodes):
        for name in set(node.input) - known:
            waiting.setdefault(name, []).append(position)
            missing[position] += 1
    ready = [position for position in range(len(nodes)) if missing[position] == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        position = heapq.heappop(ready)
        order.append(position)
        for name in nodes[position].output:
            for reader in waiting.pop(name, []):
                missing[reader] -= 1
                if missing[reader] == 0:
                    heapq.heappush(ready, reader)
    if len(order) < len(nodes):
        node = nodes[min(set(range(len(nodes))) - set(order))]
        unknown = sorted(name for name in node.input if name in waiting)[0]
        raise OnnxImportError(
            f"{shorten(node.op_type, 30)} at node {shorten(node.name or '?', 60)} reads "
            f"{shorten(unknown, 40)!r}, which no node computes before it (a cycle or a missing value)"
        )
    if order != sorted(order):
        copies = [type(nodes[position])() for position in order]
        for copy, position in zip(copies, order, strict=True):
            copy.CopyFrom(nodes[position])
        del graph.node[:]
        graph.node.extend(copies)


def _reserved_names() -> frozenset[str]:
    """Names a module must not take: Python's keywords and builtins (torch.fx writes module names into
    the forward's source code), what generated code refers to, and every attribute of a GraphModule
    instance ('training', 'forward', '_modules', ...), which setattr would silently replace."""
    empty = fx.GraphModule(nn.Module(), fx.Graph())
    return frozenset(
        {*keyword.kwlist, *keyword.softkwlist, *dir(builtins), *dir(empty), "self", "torch", "image", "fx"}
    )


_RESERVED: frozenset[str] | None = None
_ASCII_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def _identifier(node: onnx.NodeProto, fallback: str, taken: set[str]) -> str:
    """A safe module name for a node, derived from the file's names when they allow it: the PyTorch module
    path its weight is named after ('layer1.conv1.weight', as torch.export's exporter names them), else
    its node name's scopes ('/blocks/blocks.0/depthwise/Conv', as TorchScript's exporter names them), as
    ASCII letters, digits and underscores ('blocks_0_depthwise'). Names from a file are never trusted as
    identifiers: anything outside ASCII (which Python's NFKC normalization would turn into another name:
    'ﬁ' is 'fi'), a keyword, a builtin, a GraphModule attribute or a name already taken gives `fallback`
    (the operator's kind and the node's position, both the lab's own), made unique."""
    global _RESERVED
    if _RESERVED is None:
        _RESERVED = _reserved_names()
    weights = [name for name in node.input[1:2] if name.endswith(".weight")]
    if weights:
        parts = weights[0][: -len(".weight")].split(".")
    else:
        scopes = [part for part in node.name.strip("/").split("/") if part]
        scopes = scopes[:-1] if len(scopes) > 1 else scopes  # the exporter's last part is the operator's own name
        # a nested scope repeats its parent ('blocks', 'blocks.0'): keep the innermost
        parts = [
            part for i, part in enumerate(scopes) if not (i + 1 < len(scopes) and scopes[i + 1].startswith(part + "."))
        ]
        parts = [piece for part in parts for piece in part.split(".")]
    text = re.sub(r"[^A-Za-z0-9]+", "_", "_".join(parts)).strip("_")[:60]  # ASCII only: never NFKC-folded
    if not _ASCII_IDENTIFIER.fullmatch(text) or text in _RESERVED or text in taken:
        text = fallback
    while text in taken or text in _RESERVED:
        text += "_"
    taken.add(text)
    return text


class _Converter:
    """Walks the validated nodes in order, building a torch.fx graph of torch's layers."""

    def __init__(self, model: onnx.ModelProto) -> None:
        from onnx import numpy_helper

        self.model, self.graph = model, model.graph
        self.opset = {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}["ai.onnx"]
        self.fx = fx.Graph()
        self.modules: dict[str, nn.Module] = {}
        self.taken: set[str] = set()
        self.values: dict[str, fx.Node] = {}  # ONNX value name -> the fx node computing it
        self.constants: dict[str, object] = {
            tensor.name: numpy_helper.to_array(tensor) for tensor in self.graph.initializer
        }
        self.shapes: dict[str, list[object]] = {}  # value name -> its shape with BATCH for the batch
        # a convolution's or linear layer's output -> its module: a per-channel Mul/Add/Sub/Div folds into it
        self.foldable: dict[str, str] = {}
        self.grey_copies: set[str] = set()  # values that are the grey image in each of 3 channels
        # value name -> (shape without the batch, multiply, add): the image, scaled, in a layout of its own
        self.views: dict[str, tuple[tuple[int, ...], float, float]] = {}
        self.steps: list[str] = []  # the file's input step, operation by operation, for the model card
        self.input_affine: tuple[float, float] | None = None  # the scaling where the first layer reads it
        self.padded: dict[str, tuple[fx.Node, tuple[int, int]]] = {}  # a zero Pad's output -> (input, pads)
        self.channels_last: dict[str, fx.Node] = {}  # a Transpose to [N, H, W, C] -> the [N, C, H, W] map
        self.column_order: dict[str, torch.Tensor] = {}  # a flattened channels-last map -> its feature order
        self.readers: dict[str, int] = {}
        for node in self.graph.node:
            for name in node.input:
                self.readers[name] = self.readers.get(name, 0) + 1
        self.final = ""  # the file's last operation over the scores: softmax, log_softmax, sigmoid or none
        self.probe: dict[fx.Node, torch.Tensor] = {}  # every fx node's value on two zero images
        self.labels: dict[str, str] = {}  # module name -> the file's own name for its node, shortened
        self.operations = 0
        self.activation_values = 0  # per image, every operation's output together
        self.multiply_adds = 0  # per image

    def account(self, node: onnx.NodeProto, index: int, values: int, multiply_adds: int = 0) -> None:
        """Count one more operation giving `values` per image at the cost of `multiply_adds`, refused in one
        line as soon as a bound is passed: called with the shapes alone, before the operation runs."""
        self.operations += 1
        self.activation_values += values
        self.multiply_adds += multiply_adds
        where = f"{shorten(node.op_type, 30)} {_where(node, index)}"
        if self.operations > MAX_OPERATIONS:
            raise OnnxImportError(
                f"{where} is operation {self.operations}; the lab runs graphs of at most {MAX_OPERATIONS} operations"
            )
        if values > MAX_TENSOR_VALUES:
            raise OnnxImportError(
                f"{where} gives {values:,} values per image; the lab takes at most {MAX_TENSOR_VALUES:,} in one tensor"
            )
        if self.activation_values > MAX_ACTIVATION_VALUES:
            raise OnnxImportError(
                f"the activations reach {self.activation_values:,} values per image at {where}; "
                f"the lab takes at most {MAX_ACTIVATION_VALUES:,}"
            )
        if self.multiply_adds > MAX_MULTIPLY_ADDS:
            raise OnnxImportError(
                f"the graph needs more than {MAX_MULTIPLY_ADDS:,} multiply-adds per image (reached at {where}); "
                "the lab runs at most that"
            )

    # --- helpers ---------------------------------------------------------------------------------
    def refuse(self, node: onnx.NodeProto, index: int, reason: str) -> OnnxImportError:
        return OnnxImportError(f"unsupported operation {shorten(node.op_type, 30)} {_where(node, index)} ({reason})")

    def attribute(self, node: onnx.NodeProto, name: str, default: object = None) -> object:
        from onnx import helper

        for attribute in node.attribute:
            if attribute.name == name:
                return helper.get_attribute_value(attribute)
        return default

    def tensor(self, node: onnx.NodeProto, index: int, position: int) -> fx.Node:
        name = node.input[position] if position < len(node.input) else ""
        if name not in self.values:
            raise self.refuse(node, index, "its input is not a tensor computed from the image")
        return self.values[name]

    def constant(self, node: onnx.NodeProto, index: int, position: int, required: bool = True) -> object:
        name = node.input[position] if position < len(node.input) else ""
        if name == "" and not required:
            return None
        if name not in self.constants:
            raise self.refuse(node, index, f"input {position + 1} must be a constant (weights, a shape)")
        return self.constants[name]

    def weight(self, node: onnx.NodeProto, index: int, position: int, required: bool = True) -> torch.Tensor | None:
        import numpy as np

        value = self.constant(node, index, position, required)
        if value is None:
            return None
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
            raise self.refuse(node, index, f"input {position + 1} must be a floating-point tensor")
        return torch.from_numpy(np.array(value, dtype=np.float32))

    def module(self, node: onnx.NodeProto, index: int, module: nn.Module, source: fx.Node) -> fx.Node:
        values = math.prod(self.probe[source].shape[1:])  # pools and activations give at most their input
        multiply_adds = 0
        if isinstance(module, nn.Conv2d):
            _, _, height, width = self.probe[source].shape
            (kh, kw), (sh, sw), (ph, pw) = module.kernel_size, module.stride, module.padding  # type: ignore[misc]
            out_h, out_w = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
            values = module.out_channels * max(out_h, 0) * max(out_w, 0)
            multiply_adds = values * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            values, multiply_adds = module.out_features, module.in_features * module.out_features
        self.account(node, index, values, multiply_adds)
        name = _identifier(node, f"{node.op_type.lower()}{index}", self.taken)
        self.labels[name] = shorten(node.name or node.output[0] or f"#{index}", 60)
        self.modules[name] = module.eval()
        created = self.fx.call_module(name, (source,))
        with torch.no_grad():
            self.probe[created] = module(self.probe[source])
        return created

    def function(
        self,
        node: onnx.NodeProto,
        index: int,
        target: object,
        args: tuple[object, ...],
        kwargs: dict[str, object] | None = None,
    ) -> fx.Node:
        """A call_function node, evaluated at once on the probe images (shapes for Shape and Reshape) once
        its output's size is within the bounds (a concatenation's is its inputs' together)."""
        sources = [a for a in (args[0] if isinstance(args[0], list) else args[:1]) if isinstance(a, fx.Node)]
        sizes = [math.prod(self.probe[source].shape[1:]) for source in sources]
        self.account(node, index, sum(sizes) if target is torch.cat else max(sizes, default=0))
        created = self.fx.call_function(target, args, kwargs or {})  # type: ignore[arg-type]

        def probe_of(arg: object) -> object:
            if isinstance(arg, fx.Node):
                return self.probe[arg]
            if isinstance(arg, list | tuple):
                return type(arg)(probe_of(a) for a in arg)
            return arg

        with torch.no_grad():
            self.probe[created] = target(*probe_of(args), **(kwargs or {}))  # type: ignore[operator]
        return created

    def output(self, node: onnx.NodeProto, value: fx.Node) -> None:
        self.values[node.output[0]] = value
        self.shapes[node.output[0]] = [BATCH, *self.probe[value].shape[1:]]

    def pair(self, node: onnx.NodeProto, index: int, name: str, default: list[int]) -> tuple[int, int]:
        values = list(self.attribute(node, name, default))  # type: ignore[call-overload]
        if len(values) != 2:
            raise self.refuse(node, index, f"{name} must have two values (2-D images)")
        return int(values[0]), int(values[1])

    def _pads(
        self, node: onnx.NodeProto, index: int, source: fx.Node, kernel: tuple[int, int]
    ) -> tuple[str, list[tuple[int, int]]]:
        """A convolution's or pool's padding as (before, after) for height and width: its pads, or what
        auto_pad SAME asks for on this input's size (as tf2onnx writes Keras's padding='same')."""
        auto_pad = self.attribute(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode(errors="replace") if isinstance(auto_pad, bytes) else str(auto_pad)
        strides = self.pair(node, index, "strides", [1, 1])
        sizes = [int(size) for size in self.probe[source].shape[2:]]
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            totals = [
                max((-(-size // stride) - 1) * stride + k - size, 0)
                for size, k, stride in zip(sizes, kernel, strides, strict=True)
            ]
            early = [total // 2 if auto_pad == "SAME_UPPER" else total - total // 2 for total in totals]
            return auto_pad, [(first, total - first) for total, first in zip(totals, early, strict=True)]
        if auto_pad not in ("NOTSET", "VALID"):
            raise self.refuse(node, index, f"auto_pad {shorten(auto_pad, 20)}")
        pads = [int(p) for p in self.attribute(node, "pads", [0, 0, 0, 0])]  # type: ignore[union-attr]
        if auto_pad == "VALID":
            pads = [0, 0, 0, 0]
        if len(pads) != 4:
            raise self.refuse(node, index, f"pads {pads} (2-D images have four)")
        return auto_pad, [(pads[0], pads[2]), (pads[1], pads[3])]

    def _unread_end(self, before: int, after: int, size: int, k: int, stride: int) -> bool:
        """Whether padding `after` > `before` at the end adds cells no window reads (the same output size)."""
        return after > before and (size + before + after - k) // stride == (size + 2 * before - k) // stride

    def padding(self, node: onnx.NodeProto, index: int, source: fx.Node, kernel: tuple[int, int]) -> tuple[int, int]:
        """A pool's symmetric padding. Padding that is larger at the end than at the start is the start's on
        both sides when the extra cells are never read (Chainer's cover_all pooling writes such pads);
        other uneven padding is refused."""
        auto_pad, pads = self._pads(node, index, source, kernel)
        strides, sizes = self.pair(node, index, "strides", [1, 1]), self.probe[source].shape[2:]
        padding = []
        for (before, after), size, k, stride in zip(pads, sizes, kernel, strides, strict=True):
            if before != after and not self._unread_end(before, after, int(size), k, stride):
                where = f"auto_pad {auto_pad} pads" if auto_pad.startswith("SAME") else "pads"
                raise self.refuse(
                    node, index, f"{where} {before} before and {after} after; only padding the same on both sides"
                )
            padding.append(before)
        return padding[0], padding[1]

    def conv_padding(
        self, node: onnx.NodeProto, index: int, source: fx.Node, weight: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """A convolution's weight and symmetric padding. Padding one larger on one side (auto_pad SAME with
        stride 2 on an even size, as Keras writes padding='same') is the larger on both sides with the
        kernel one larger, its extra row or column zero on the side that padding moves the windows from:
        the same windows over the same pixels, the same output size, exactly."""
        auto_pad, pads = self._pads(node, index, source, (int(weight.shape[2]), int(weight.shape[3])))
        strides, sizes = self.pair(node, index, "strides", [1, 1]), self.probe[source].shape[2:]
        padding = []
        for axis, ((before, after), size, stride) in enumerate(zip(pads, sizes, strides, strict=True)):
            k = int(weight.shape[2 + axis])
            if before == after or self._unread_end(before, after, int(size), k, stride):
                padding.append(before)
                continue
            if abs(before - after) != 1:
                where = f"auto_pad {auto_pad} pads" if auto_pad.startswith("SAME") else "pads"
                raise self.refuse(node, index, f"{where} {before} before and {after} after; at most one apart")
            zero_shape = list(weight.shape)
            zero_shape[2 + axis] = 1
            zeros = torch.zeros(zero_shape, dtype=weight.dtype)
            # more at the end: the windows start one later, so the grown kernel's first row is zero
            weight = torch.cat([zeros, weight] if after > before else [weight, zeros], dim=2 + axis)
            padding.append(max(before, after))
        return weight, (padding[0], padding[1])

    # --- the operators ---------------------------------------------------------------------------
    def convert(self, node: onnx.NodeProto, index: int) -> None:
        import numpy as np

        op = node.op_type
        handler = getattr(self, f"op_{op}", None)
        assert handler is not None, op  # read_onnx refused every other operator
        if (
            op in FOLDED_ON_CONSTANTS
            and node.input
            and all(isinstance(self.constants.get(name), np.ndarray) for name in node.input if name)
        ):
            self._fold_constants(node, index)
            return
        if op != "Shape" and any(name in self.views for name in node.input):
            if self._input_step(node, index):
                return
            for name in [name for name in node.input if name in self.views]:
                self._materialize(node, index, name)
        handler(node, index)

    def _fold_constants(self, node: onnx.NodeProto, index: int) -> None:
        """An operation on constants alone (a weight reshaped or transposed before its MatMul, as CNTK and
        older PyTorch exports write, a bias computed from two), evaluated once on import; its result is
        bounded like any tensor of the file before it is made."""
        import numpy as np

        op = node.op_type
        values = [np.asarray(self.constants[name]) for name in node.input if name]
        if op in ("Mul", "Add", "Sub", "Div"):
            try:
                shape = np.broadcast_shapes(values[0].shape, values[1].shape)
            except ValueError:
                raise self.refuse(node, index, "constants whose shapes do not broadcast") from None
            _declared_elements(list(shape), f"the result of {op} {_where(node, index)}")
            with np.errstate(all="ignore"):
                result = {"Mul": np.multiply, "Add": np.add, "Sub": np.subtract, "Div": np.divide}[op](*values[:2])
        elif op == "Reshape":
            data, target = values[0], [int(d) for d in values[1].reshape(-1)]
            target = [data.shape[i] if d == 0 and i < data.ndim else d for i, d in enumerate(target)]
            try:
                result = data.reshape(target)
            except ValueError:
                raise self.refuse(node, index, f"a constant reshaped to {shorten(str(target), 40)}") from None
        elif op == "Transpose":
            perm = self.attribute(node, "perm", None)
            try:
                result = np.transpose(values[0], None if perm is None else [int(p) for p in perm])  # type: ignore[union-attr]
            except ValueError:
                raise self.refuse(node, index, "a transpose that does not fit the constant") from None
        else:  # Flatten
            axis = int(self.attribute(node, "axis", 1)) % max(values[0].ndim, 1)  # type: ignore[call-overload]
            result = values[0].reshape(math.prod(values[0].shape[:axis]), -1)
        self.constants[node.output[0]] = np.ascontiguousarray(result)

    # --- the image's own step: layout and scaling before the first layer ------------------------
    def _input_step(self, node: onnx.NodeProto, index: int) -> bool:
        """Whether `node` is part of the file's input step, applied to a view of the image: a change of
        layout that keeps the pixels in order (the grey image's 784 pixels read row by row, whether as
        [1, 28, 28], [28, 28, 1], [28, 28] or [784]), a Cast, or a Mul/Add/Sub/Div by one number. Each
        becomes part of the view (recorded for the model card); the image is never copied."""
        import numpy as np

        op, name = node.op_type, node.input[0]
        if name not in self.views or (
            op not in VIEW_OPS and op not in ("Mul", "Add", "Sub", "Div", "BatchNormalization")
        ):
            return False
        shape, multiply, add = self.views[name]
        grey = shape == (3, *INPUT_SHAPE[1:])
        if op == "BatchNormalization":  # of the one-channel image (a Keras model's first layer): affine
            factor, shift = self._batchnorm_affine(node, index)
            if factor.numel() != 1 or grey:
                raise self.refuse(node, index, "a BatchNorm of the image with more than one channel")
            multiply, add = multiply * float(factor), add * float(factor) + float(shift)
            self.steps.append(f"BatchNormalization x{float(factor):.6g} {float(shift):+.6g}")
        elif op in ("Mul", "Add", "Sub", "Div"):
            if len(node.input) != 2 or node.input[1] not in self.constants:
                return False
            value = np.asarray(self.constants[node.input[1]], dtype=np.float64)
            if value.size != 1:
                raise self.refuse(node, index, "an input step with a constant per pixel; only one number is imported")
            number = float(value.reshape(-1)[0])
            if op in ("Div",) and number == 0:
                raise self.refuse(node, index, "a division by zero")
            multiply, add = {
                "Mul": (multiply * number, add * number),
                "Div": (multiply / number, add / number),
                "Add": (multiply, add + number),
                "Sub": (multiply, add - number),
            }[op]
            self.steps.append(f"{op} {number:.6g}")
        elif op == "Cast":
            to = int(self.attribute(node, "to", 1))  # type: ignore[call-overload]
            if to not in (1, 10, 11):
                raise self.refuse(node, index, "the image cast to a type other than float")
            self.steps.append("Cast to float")
        elif op in ("Identity", "Dropout"):
            pass
        else:
            if grey:
                raise self.refuse(node, index, "a 3-channel image must reach a convolution as it is")
            shape = self._view_shape(node, index, shape)
            self.steps.append(f"{op} to [N, {', '.join(map(str, shape))}]")
        self.views[node.output[0]] = (shape, multiply, add)
        self.shapes[node.output[0]] = [BATCH, *shape]
        return True

    def _view_shape(self, node: onnx.NodeProto, index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of the image after a layout operation, refused if the pixels' order changes."""
        import numpy as np

        op, size = node.op_type, math.prod(shape)
        if op == "Transpose":
            perm = [int(p) for p in self.attribute(node, "perm", list(range(len(shape), -1, -1)))]  # type: ignore[union-attr]
            if sorted(perm) != list(range(len(shape) + 1)) or perm[0] != 0:
                raise self.refuse(node, index, f"a transpose {perm} of the image that moves the batch")
            moved = [p - 1 for p in perm[1:]]
            if [p for p in moved if shape[p] != 1] != sorted(p for p in moved if shape[p] != 1):
                raise self.refuse(node, index, f"a transpose {perm} that reorders the image's pixels")
            return tuple(shape[p] for p in moved)
        if op == "Flatten":
            if int(self.attribute(node, "axis", 1)) != 1:  # type: ignore[call-overload]
                raise self.refuse(node, index, "only flattening after the batch dimension (axis 1)")
            return (size,)
        if op in ("Unsqueeze", "Squeeze"):
            axes = self.attribute(node, "axes", None)
            if axes is None and len(node.input) > 1:
                axes = self.constant(node, index, 1)
            if axes is None:
                raise self.refuse(node, index, "a squeeze without axes (it could remove the batch)")
            full = [BATCH, *shape]
            rank = len(full) + (len(np.asarray(axes).reshape(-1)) if op == "Unsqueeze" else 0)
            positions = sorted(int(a) % rank for a in np.asarray(axes).reshape(-1))
            if 0 in positions:
                raise self.refuse(node, index, f"an {op} at the batch's position")
            for position in positions if op == "Unsqueeze" else reversed(positions):
                if op == "Unsqueeze":
                    full.insert(position, 1)
                elif full[position] != 1:
                    raise self.refuse(node, index, "squeezing a dimension that is not 1")
                else:
                    del full[position]
            return tuple(int(d) for d in full[1:])  # type: ignore[call-overload]
        # Reshape: the batch first (symbolic, 0, or the file's fixed batch), then the image's dimensions
        target = self._as_list(self.constant(node, index, 1))
        batch = image_input(self.graph).type.tensor_type.shape.dim[0]
        fixed = [batch.dim_value] if batch.HasField("dim_value") and batch.dim_value > 0 else []
        if not target or not (
            target[0] is BATCH or target[0] in (0, *fixed) or (target[0] == -1 and -1 not in target[1:])
        ):
            raise self.refuse(node, index, f"reshaping the image to {shorten(str(target), 40)}; the batch comes first")
        rest = [shape[i] if d == 0 and i < len(shape) else d for i, d in enumerate(target[1:])]
        if any(d is BATCH for d in rest) or sum(1 for d in rest if d == -1) > 1:
            raise self.refuse(node, index, f"reshaping the image to {shorten(str(target), 40)}")
        known = math.prod(int(d) for d in rest if d != -1)  # type: ignore[call-overload]
        if known <= 0 or size % known:
            raise self.refuse(node, index, f"reshaping the image to {shorten(str(target), 40)}")
        return tuple(size // known if d == -1 else int(d) for d in rest)  # type: ignore[call-overload]

    def _materialize(self, node: onnx.NodeProto, index: int, name: str) -> None:
        """The image as the lab's graph reads it, where an operation other than the input step first
        reads it: [N, 1, 28, 28] (a convolution, or a 3-channel copy that a convolution sums), or flattened
        to [N, 784] (a linear layer). Every such place must see the same scaling."""
        shape, multiply, add = self.views[name]
        if self.input_affine is None:
            self.input_affine = (multiply, add)
        elif self.input_affine != (multiply, add):
            raise self.refuse(node, index, "the image reaches two layers scaled in two ways")
        if name in self.values:
            return
        if shape == (3, *INPUT_SHAPE[1:]) and node.op_type == "Conv" and node.input[0] == name:
            self.values[name] = self.image
            self.grey_copies.add(name)
        elif shape == INPUT_SHAPE:
            self.values[name] = self.image
        elif shape == (math.prod(INPUT_SHAPE),):
            self.values[name] = self.function(node, index, torch.flatten, (self.image, 1))
        else:
            raise self.refuse(
                node,
                index,
                f"the image reaches it as [N, {', '.join(map(str, shape))}]; a convolution reads "
                "[N, 1, 28, 28] (or a 3-channel copy), a linear layer [N, 784]",
            )

    def op_Constant(self, node: onnx.NodeProto, index: int) -> None:
        import numpy as np
        from onnx import numpy_helper

        for attribute in node.attribute:
            if attribute.name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(attribute.t)
                return
            if attribute.name in ("value_float", "value_int", "value_floats", "value_ints"):
                self.constants[node.output[0]] = np.array(self.attribute(node, attribute.name))
                return
        raise self.refuse(node, index, "only tensor and number constants are imported")

    def op_Shape(self, node: onnx.NodeProto, index: int) -> None:
        source = node.input[0]
        if source not in self.shapes:
            raise self.refuse(node, index, "the shape of a value whose shape is not known")
        shape = self.shapes[source]
        start, end = int(self.attribute(node, "start", 0)), self.attribute(node, "end", None)  # type: ignore[call-overload]
        self.constants[node.output[0]] = shape[start : None if end is None else int(end)]  # type: ignore[call-overload]

    def _as_list(self, value: object) -> list[object]:
        import numpy as np

        if isinstance(value, list):
            return value
        if isinstance(value, np.ndarray):
            return [int(v) for v in value.reshape(-1)] if value.dtype.kind in "iu" else list(value.reshape(-1))
        return [value]

    def op_Gather(self, node: onnx.NodeProto, index: int) -> None:
        import numpy as np

        data, indices = self.constant(node, index, 0), self.constant(node, index, 1)
        if int(self.attribute(node, "axis", 0)) != 0:  # type: ignore[call-overload]
            raise self.refuse(node, index, "only gathering from a shape (axis 0)")
        items = self._as_list(data)
        picked = [items[int(i)] for i in np.array(indices).reshape(-1)]
        self.constants[node.output[0]] = picked[0] if np.ndim(indices) == 0 else picked

    def op_Unsqueeze(self, node: onnx.NodeProto, index: int) -> None:
        import numpy as np

        value = self.constant(node, index, 0)
        if isinstance(value, list) or np.ndim(value) != 0:
            raise self.refuse(node, index, "only a scalar dimension of a shape being assembled")
        self.constants[node.output[0]] = self._as_list(value)  # a scalar dimension becomes a 1-element shape

    def op_Identity(self, node: onnx.NodeProto, index: int) -> None:
        name = node.input[0]
        if name in self.constants:
            self.constants[node.output[0]] = self.constants[name]
        else:
            self.output(node, self.tensor(node, index, 0))

    def op_Dropout(self, node: onnx.NodeProto, index: int) -> None:
        if len(node.output) > 1 and node.output[1] and self.readers.get(node.output[1]):
            raise self.refuse(node, index, "its mask output is read")
        self.output(node, self.tensor(node, index, 0))

    def op_Conv(self, node: onnx.NodeProto, index: int) -> None:
        extra = (0, 0)
        if node.input[0] in self.padded:  # a zero Pad before it: its padding
            x, extra = self.padded[node.input[0]]
        else:
            x = self.tensor(node, index, 0)
        weight = self.weight(node, index, 1)
        bias = self.weight(node, index, 2, required=False)
        assert weight is not None
        if weight.ndim != 4:
            raise self.refuse(node, index, "only 2-D convolutions")
        if self.pair(node, index, "dilations", [1, 1]) != (1, 1):
            raise self.refuse(node, index, "only dilation 1")
        groups = int(self.attribute(node, "group", 1))  # type: ignore[call-overload]
        if node.input[0] in self.grey_copies:  # the grey image in each of 3 channels: one channel's sum
            if groups != 1 or weight.shape[1] != 3:
                raise self.refuse(node, index, "a 3-channel image must reach an ordinary convolution")
            weight = weight.sum(1, keepdim=True)
        if extra != (0, 0) and self._pads(node, index, x, (int(weight.shape[2]), int(weight.shape[3])))[0].startswith(
            "SAME"
        ):
            raise self.refuse(node, index, "a Pad before a convolution with auto_pad SAME")
        weight, padding = self.conv_padding(node, index, x, weight)
        out_channels, per_group, kh, kw = weight.shape
        conv = nn.Conv2d(
            per_group * groups,
            out_channels,
            (kh, kw),
            self.pair(node, index, "strides", [1, 1]),
            tuple(p + e for p, e in zip(padding, extra, strict=True)),
            groups=groups,
            bias=True,
        )
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(torch.zeros(out_channels) if bias is None else bias)
        self.output(node, self.module(node, index, conv, x))
        self.foldable[node.output[0]] = str(self.values[node.output[0]].target)

    def _batchnorm(self, node: onnx.NodeProto, index: int) -> nn.BatchNorm2d:
        """An inference BatchNorm's parameters (scale, shift, mean, variance, epsilon) as torch's module."""
        if int(self.attribute(node, "training_mode", 0)) != 0:  # type: ignore[call-overload]
            raise self.refuse(node, index, "training mode; export the model in eval mode")
        scale, shift, mean, var = (self.weight(node, index, i) for i in range(1, 5))
        assert scale is not None and shift is not None and mean is not None and var is not None
        bn = nn.BatchNorm2d(scale.numel(), eps=float(self.attribute(node, "epsilon", 1e-5)))  # type: ignore[arg-type]
        with torch.no_grad():
            bn.weight.copy_(scale)
            bn.bias.copy_(shift)
            bn.running_mean.copy_(mean)  # type: ignore[union-attr]
            bn.running_var.copy_(var)  # type: ignore[union-attr]
        return bn.eval()

    def _batchnorm_affine(self, node: onnx.NodeProto, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """An inference BatchNorm as x * multiply + add per channel (float64)."""
        bn = self._batchnorm(node, index)
        scale, shift = bn.weight.detach().double(), bn.bias.detach().double()
        mean, var = bn.running_mean.double(), bn.running_var.double()  # type: ignore[union-attr]
        multiply = scale / torch.sqrt(var + bn.eps)
        return multiply, shift - mean * multiply

    def op_BatchNormalization(self, node: onnx.NodeProto, index: int) -> None:
        x = self.tensor(node, index, 0)
        if self.probe[x].ndim == 2:  # after a linear layer (Keras's Dense then BatchNormalization): folded
            if node.input[0] not in self.foldable or self.readers.get(node.input[0]) != 1:
                raise self.refuse(node, index, "a BatchNorm of features that no linear layer of its own computes")
            multiply, add = self._batchnorm_affine(node, index)
            self._fold_into(node, index, node.input[0], multiply, add)
            return
        self.output(node, self.module(node, index, self._batchnorm(node, index), x))

    def op_Relu(self, node: onnx.NodeProto, index: int) -> None:
        self.output(node, self.module(node, index, nn.ReLU(), self.tensor(node, index, 0)))

    def _activation(self, node: onnx.NodeProto, index: int, function: str, parameter: tuple[float, ...]) -> None:
        from qcore.graph.ops import Activation

        self.output(node, self.module(node, index, Activation(function, parameter), self.tensor(node, index, 0)))

    def op_Sigmoid(self, node: onnx.NodeProto, index: int) -> None:
        if node.output[0] == self.graph.output[0].name:  # over the scores: monotone, stays float
            self.output(node, self._final(node, index, "sigmoid"))
            return
        self._activation(node, index, "sigmoid", ())

    def op_Tanh(self, node: onnx.NodeProto, index: int) -> None:
        self._activation(node, index, "tanh", ())

    def op_LeakyRelu(self, node: onnx.NodeProto, index: int) -> None:
        self._activation(node, index, "leaky_relu", (float(self.attribute(node, "alpha", 0.01)),))  # type: ignore[arg-type]

    def op_Elu(self, node: onnx.NodeProto, index: int) -> None:
        self._activation(node, index, "elu", (float(self.attribute(node, "alpha", 1.0)),))  # type: ignore[arg-type]

    def op_HardSigmoid(self, node: onnx.NodeProto, index: int) -> None:
        alpha, beta = float(self.attribute(node, "alpha", 0.2)), float(self.attribute(node, "beta", 0.5))  # type: ignore[arg-type]
        self._activation(node, index, "hardsigmoid", (alpha, beta))

    def op_HardSwish(self, node: onnx.NodeProto, index: int) -> None:
        self._activation(node, index, "hardswish", ())

    def _normalization(
        self,
        node: onnx.NodeProto,
        index: int,
        axes: list[int],
        scale: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        """A normalization by the sample's own statistics: float between a dequantize and a quantize."""
        from qcore.graph.ops import Normalization

        x = self.tensor(node, index, 0)
        rank = self.probe[x].ndim
        positions = tuple(sorted({int(a) % rank for a in axes}))
        if not positions or 0 in positions:
            raise self.refuse(node, index, f"normalizing over axes {axes}, which include the batch")
        eps = float(self.attribute(node, "epsilon", 1e-9 if node.op_type == "MeanVarianceNormalization" else 1e-5))  # type: ignore[arg-type]
        function = {"MeanVarianceNormalization": "mvn", "InstanceNormalization": "instance_norm"}.get(
            node.op_type, "layer_norm"
        )
        self.output(node, self.module(node, index, Normalization(function, positions, eps, scale, bias), x))

    def op_MeanVarianceNormalization(self, node: onnx.NodeProto, index: int) -> None:
        self._normalization(node, index, list(self.attribute(node, "axes", [0, 2, 3])))  # type: ignore[call-overload]

    def op_InstanceNormalization(self, node: onnx.NodeProto, index: int) -> None:
        scale, bias = self.weight(node, index, 1), self.weight(node, index, 2)
        assert scale is not None and bias is not None
        self._normalization(node, index, [2, 3], scale.reshape(1, -1, 1, 1), bias.reshape(1, -1, 1, 1))

    def op_LayerNormalization(self, node: onnx.NodeProto, index: int) -> None:
        x = self.tensor(node, index, 0)
        rank, axis = self.probe[x].ndim, int(self.attribute(node, "axis", -1))  # type: ignore[call-overload]
        scale, bias = self.weight(node, index, 1), self.weight(node, index, 2, required=False)
        assert scale is not None
        if len(node.output) > 1 and any(self.readers.get(name) for name in node.output[1:] if name):
            raise self.refuse(node, index, "its mean and variance outputs are read")
        self._normalization(node, index, list(range(axis % rank, rank)), scale, bias)

    def op_Clip(self, node: onnx.NodeProto, index: int) -> None:
        import numpy as np

        x = self.tensor(node, index, 0)
        low = self.constant(node, index, 1, required=False)
        high = self.constant(node, index, 2, required=False)
        bounds = (
            None if low is None else float(np.array(low).reshape(-1)[0]),
            None if high is None else float(np.array(high).reshape(-1)[0]),
        )
        if bounds != (0.0, 6.0):
            raise self.refuse(node, index, f"Clip{bounds}; only Clip(0, 6), ReLU6, is imported")
        self.output(node, self.module(node, index, nn.ReLU6(), x))

    def op_MaxPool(self, node: onnx.NodeProto, index: int) -> None:
        if len(node.output) > 1 and node.output[1] and self.readers.get(node.output[1]):
            raise self.refuse(node, index, "its indices output is read")
        if int(self.attribute(node, "ceil_mode", 0)) or self.pair(node, index, "dilations", [1, 1]) != (1, 1):  # type: ignore[call-overload]
            raise self.refuse(node, index, "only dilation 1 without ceil_mode")
        kernel, x = self.pair(node, index, "kernel_shape", []), self.tensor(node, index, 0)
        pool = nn.MaxPool2d(kernel, self.pair(node, index, "strides", [1, 1]), self.padding(node, index, x, kernel))
        self.output(node, self.module(node, index, pool, x))

    def op_AveragePool(self, node: onnx.NodeProto, index: int) -> None:
        kernel, x = self.pair(node, index, "kernel_shape", []), self.tensor(node, index, 0)
        if int(self.attribute(node, "ceil_mode", 0)) or self.padding(node, index, x, kernel) != (0, 0):  # type: ignore[call-overload]
            raise self.refuse(node, index, "only unpadded average pooling without ceil_mode")
        pool = nn.AvgPool2d(kernel, self.pair(node, index, "strides", [1, 1]))
        self.output(node, self.module(node, index, pool, x))

    def op_GlobalMaxPool(self, node: onnx.NodeProto, index: int) -> None:
        x = self.tensor(node, index, 0)
        if self.probe[x].ndim != 4:
            raise self.refuse(node, index, "only over a feature map")
        size = tuple(int(d) for d in self.probe[x].shape[2:])
        self.output(node, self.module(node, index, nn.MaxPool2d(size, size), x))

    def op_Pad(self, node: onnx.NodeProto, index: int) -> None:
        """Zero padding of height and width the same on both sides, read by one convolution: that
        convolution's padding (Keras's ZeroPadding2D, PyTorch's ZeroPad2d)."""
        import numpy as np

        x = self.tensor(node, index, 0)
        mode = self.attribute(node, "mode", b"constant")
        pads = self.attribute(node, "pads", None)
        if pads is None:
            pads = self.constant(node, index, 1)
        value = self.constant(node, index, 2, required=False) if pads is not None else None
        value = value if value is not None else self.attribute(node, "value", 0.0)
        pads = [int(p) for p in np.asarray(pads).reshape(-1)]
        readers = [other for other in self.graph.node if node.output[0] in other.input]
        if (
            mode not in (b"constant", "constant")
            or float(np.asarray(value).reshape(-1)[0] if np.size(value) else 0.0) != 0.0
            or self.probe[x].ndim != 4
            or len(pads) != 8
            or pads[:2] != [0, 0]
            or pads[4:6] != [0, 0]
            or pads[2:4] != pads[6:8]
            or [other.op_type for other in readers] != ["Conv"]
        ):
            raise self.refuse(node, index, "only zero padding of height and width, even, before one convolution")
        self.padded[node.output[0]] = (x, (pads[2], pads[3]))
        height, width = self.probe[x].shape[2:]
        self.shapes[node.output[0]] = [BATCH, self.probe[x].shape[1], height + 2 * pads[2], width + 2 * pads[3]]

    def op_GlobalAveragePool(self, node: onnx.NodeProto, index: int) -> None:
        self.output(node, self.module(node, index, nn.AdaptiveAvgPool2d(1), self.tensor(node, index, 0)))

    def op_ReduceMean(self, node: onnx.NodeProto, index: int) -> None:
        import numpy as np

        axes = self.attribute(node, "axes", None)
        if axes is None and len(node.input) > 1:
            axes = self.constant(node, index, 1)
        if sorted(int(a) % 4 for a in np.array(axes).reshape(-1)) != [2, 3]:
            raise self.refuse(node, index, "only the mean over height and width (global average pooling)")
        pooled = self.module(node, index, nn.AdaptiveAvgPool2d(1), self.tensor(node, index, 0))
        if not int(self.attribute(node, "keepdims", 1)):  # type: ignore[call-overload]
            pooled = self.function(node, index, torch.flatten, (pooled, 1))
        self.output(node, pooled)

    def op_Flatten(self, node: onnx.NodeProto, index: int) -> None:
        if int(self.attribute(node, "axis", 1)) != 1:  # type: ignore[call-overload]
            raise self.refuse(node, index, "only flattening after the batch dimension (axis 1)")
        self._flatten(node, index)

    def _flatten(self, node: onnx.NodeProto, index: int) -> None:
        """[N, features]; a channels-last feature map (a Transpose to [N, H, W, C], as Keras flattens)
        is flattened channels-first, and the linear layer reading it takes its columns in that order."""
        name = node.input[0]
        if name in self.channels_last:
            source = self.channels_last[name]
            channels, height, width = self.probe[source].shape[1:]
            order = torch.arange(channels * height * width).reshape(channels, height, width).permute(1, 2, 0)
            flat = self.function(node, index, torch.flatten, (source, 1))
            self.output(node, flat)
            self.column_order[node.output[0]] = order.reshape(-1)
            return
        self.output(node, self.function(node, index, torch.flatten, (self.tensor(node, index, 0), 1)))

    def op_Transpose(self, node: onnx.NodeProto, index: int) -> None:
        perm = [int(p) for p in self.attribute(node, "perm", [])]  # type: ignore[union-attr]
        x = self.tensor(node, index, 0)
        if self.probe[x].ndim != 4 or perm != [0, 2, 3, 1] or self.readers.get(node.output[0], 0) < 1:
            raise self.refuse(node, index, f"a transpose {perm}; only to channels-last before a flatten")
        self.channels_last[node.output[0]] = x
        self.shapes[node.output[0]] = [BATCH, *self.probe[x].shape[2:], self.probe[x].shape[1]]

    def op_Cast(self, node: onnx.NodeProto, index: int) -> None:
        import numpy as np

        to = int(self.attribute(node, "to", 1))  # type: ignore[call-overload]
        if node.input[0] in self.constants:  # a shape being computed (tf2onnx casts them to int64 and back)
            value = self.constants[node.input[0]]
            if to not in (1, 6, 7, 10, 11):
                raise self.refuse(node, index, "a cast of a constant to a type other than a number")
            if isinstance(value, list):  # a shape holding the batch symbol: its values are integers
                self.constants[node.output[0]] = value
            else:
                dtype = {1: np.float32, 6: np.int32, 7: np.int64, 10: np.float16, 11: np.float64}[to]
                self.constants[node.output[0]] = np.asarray(value).astype(dtype)
            return
        if to not in (1, 10, 11):
            raise self.refuse(node, index, "a cast to a type other than float")
        self.output(node, self.tensor(node, index, 0))

    def op_Slice(self, node: onnx.NodeProto, index: int) -> None:
        """A slice of a shape being computed (Shape, then Slice to keep the batch, as tf2onnx writes)."""
        import numpy as np

        items = self._as_list(self.constant(node, index, 0))
        starts, ends = self.constant(node, index, 1), self.constant(node, index, 2)  # opset 10 and up: inputs
        axes, steps = self.constant(node, index, 3, required=False), self.constant(node, index, 4, required=False)
        as_ints = [
            None if v is None else [int(i) for i in np.asarray(v).reshape(-1)] for v in (starts, ends, axes, steps)
        ]
        starts_, ends_, axes_, steps_ = as_ints
        if (axes_ is not None and list(axes_) not in ([0], [-1])) or len(starts_) != 1 or (steps_ not in (None, [1])):
            raise self.refuse(node, index, "only a slice of a shape (one axis, step 1)")
        start, end = int(starts_[0]), int(ends_[0])
        end = min(end, len(items)) if end >= 0 else end
        self.constants[node.output[0]] = items[start:end]

    def op_Squeeze(self, node: onnx.NodeProto, index: int) -> None:
        import numpy as np

        axes = self.attribute(node, "axes", None)
        if axes is None and len(node.input) > 1:
            axes = self.constant(node, index, 1)
        x = self.tensor(node, index, 0)
        if self.probe[x].ndim != 4 or tuple(self.probe[x].shape[2:]) != (1, 1) or axes is None:
            raise self.refuse(node, index, "only squeezing a pooled [N, C, 1, 1] map to [N, C]")
        if sorted(int(a) % 4 for a in np.asarray(axes).reshape(-1)) != [2, 3]:
            raise self.refuse(node, index, "only squeezing height and width")
        self.output(node, self.function(node, index, torch.flatten, (x, 1)))

    def op_Reshape(self, node: onnx.NodeProto, index: int) -> None:
        if node.input[0] not in self.channels_last:
            self.tensor(node, index, 0)  # refused unless computed from the image
        target = self._as_list(self.constant(node, index, 1))
        features = math.prod(int(d) for d in self.shapes[node.input[0]][1:])  # type: ignore[call-overload]
        batch = image_input(self.graph).type.tensor_type.shape.dim[0]
        fixed = [batch.dim_value] if batch.HasField("dim_value") and batch.dim_value > 0 else []
        first_ok = len(target) == 2 and (target[0] is BATCH or target[0] in (0, -1, *fixed))
        second_ok = len(target) == 2 and (target[1] == features or (target[1] == -1 and target[0] != -1))
        if not (first_ok and second_ok):
            raise self.refuse(node, index, f"reshaping to {shorten(str(target), 40)}; only to (batch, features)")
        self._flatten(node, index)

    def op_Gemm(self, node: onnx.NodeProto, index: int) -> None:
        x = self.tensor(node, index, 0)
        if int(self.attribute(node, "transA", 0)):  # type: ignore[call-overload]
            raise self.refuse(node, index, "transA")
        weight = self.weight(node, index, 1)
        bias = self.weight(node, index, 2, required=False)
        assert weight is not None
        if weight.ndim != 2:
            raise self.refuse(node, index, "the weight must be a matrix")
        if not int(self.attribute(node, "transB", 0)):  # type: ignore[call-overload]
            weight = weight.t()
        weight = weight * float(self.attribute(node, "alpha", 1.0))  # type: ignore[arg-type]
        out_features = weight.shape[0]
        if bias is not None:
            bias = (bias * float(self.attribute(node, "beta", 1.0))).reshape(-1)  # type: ignore[arg-type]
            if bias.numel() == 1:
                bias = bias.expand(out_features)
            if bias.numel() != out_features:
                raise self.refuse(node, index, "the bias must have one value per output")
        self.output(node, self._linear(node, index, x, weight, bias))
        self.foldable[node.output[0]] = str(self.values[node.output[0]].target)

    def _linear(
        self, node: onnx.NodeProto, index: int, x: fx.Node, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> fx.Node:
        if node.input[0] in self.column_order:  # features flattened channels-first, the weights' columns too
            order = self.column_order[node.input[0]]
            if weight.shape[1] != len(order):
                raise self.refuse(node, index, "its weight does not fit the flattened features")
            permuted = torch.empty_like(weight)
            permuted[:, order] = weight
            weight = permuted
        linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(torch.zeros(weight.shape[0]) if bias is None else bias)
        return self.module(node, index, linear, x)

    def op_MatMul(self, node: onnx.NodeProto, index: int) -> None:
        weight = self.weight(node, index, 1)
        assert weight is not None
        if weight.ndim != 2:
            raise self.refuse(node, index, "only a matrix product with a weight matrix")
        linear = self._linear(node, index, self.tensor(node, index, 0), weight.t(), None)
        self.output(node, linear)
        self.foldable[node.output[0]] = str(linear.target)

    def op_Add(self, node: onnx.NodeProto, index: int) -> None:
        a, b = node.input[0], node.input[1]
        if a in self.values and b in self.values:
            if self.shapes.get(a) != self.shapes.get(b):
                raise self.refuse(node, index, "shapes differ (no broadcasting)")
            self.output(node, self.function(node, index, operator.add, (self.values[a], self.values[b])))
            return
        self._fold_constant(node, index)

    def op_Sub(self, node: onnx.NodeProto, index: int) -> None:
        self._fold_constant(node, index)

    def op_Mul(self, node: onnx.NodeProto, index: int) -> None:
        self._fold_constant(node, index)

    def op_Div(self, node: onnx.NodeProto, index: int) -> None:
        self._fold_constant(node, index)

    def _fold_constant(self, node: onnx.NodeProto, index: int) -> None:
        """A convolution's or linear layer's output times, plus, minus or divided by a constant per output
        channel: its bias (MatMul + Add), or BatchNorm as tf2onnx writes it (Mul, Add), folded into the
        layer's weights and bias exactly as the operation computes them (its only reader)."""

        op = node.op_type
        if len(node.input) != 2 or not all(name in self.values or name in self.constants for name in node.input):
            raise self.refuse(node, index, "its inputs must be a tensor and a constant")
        tensor = next((name for name in node.input if name in self.values), None)
        if tensor is None:
            raise self.refuse(node, index, "arithmetic on constants alone")
        position = 1 - list(node.input).index(tensor)
        if tensor not in self.foldable or self.readers.get(tensor) != 1:
            raise self.refuse(
                node, index, f"{op} of a constant; only on the image or a layer's own output (its bias or scale)"
            )
        if position == 0 and op in ("Sub", "Div"):
            raise self.refuse(node, index, f"{op} with the constant first")
        value = self.weight(node, index, position)
        assert value is not None
        layer = self.modules[self.foldable[tensor]]
        assert isinstance(layer, nn.Conv2d | nn.Linear)
        channels = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        shapes = [(), (1,), (channels, 1, 1), (1, channels, 1, 1)] if isinstance(layer, nn.Conv2d) else []
        shapes = shapes or [(), (1,), (channels,), (1, channels)]
        if tuple(value.shape) not in shapes:
            raise self.refuse(
                node, index, f"a constant of shape {list(value.shape)}; one value per output channel is folded"
            )
        per_channel = value.reshape(-1).double().expand(channels)
        if op in ("Mul", "Div"):
            self._fold_into(node, index, tensor, per_channel if op == "Mul" else 1.0 / per_channel, None)
        else:
            self._fold_into(node, index, tensor, None, per_channel if op == "Add" else -per_channel)

    def _fold_into(
        self,
        node: onnx.NodeProto,
        index: int,
        tensor: str,
        multiply: torch.Tensor | None,
        add: torch.Tensor | None,
    ) -> None:
        """The layer computing `tensor` (its only reader is `node`) made to compute `tensor * multiply + add`
        per output channel, in float64: its weights and bias scaled, its bias shifted."""
        import numpy as np

        layer_name = self.foldable.pop(tensor)
        layer = self.modules[layer_name]
        assert isinstance(layer, nn.Conv2d | nn.Linear)
        channels = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        with torch.no_grad():
            weight, bias = layer.weight.double(), layer.bias.double()  # type: ignore[union-attr]
            if multiply is not None:
                factor = multiply.reshape(-1).expand(channels)
                weight = weight * factor.reshape(-1, *[1] * (weight.ndim - 1))
                bias = bias * factor
            if add is not None:
                bias = bias + add.reshape(-1).expand(channels)
            layer.weight.copy_(weight.float())
            layer.bias.copy_(bias.float())  # type: ignore[union-attr]
        if not (np.isfinite(layer.weight.detach().numpy()).all() and np.isfinite(layer.bias.detach().numpy()).all()):
            raise self.refuse(node, index, "folding it gives weights that are not finite")
        self.output(node, self.values[tensor])
        self.foldable[node.output[0]] = layer_name

    def op_Concat(self, node: onnx.NodeProto, index: int) -> None:
        if all(name in self.constants for name in node.input):  # a shape being assembled
            self.constants[node.output[0]] = [
                item for name in node.input for item in self._as_list(self.constants[name])
            ]
            return
        if int(self.attribute(node, "axis", 0)) not in (1, -3):  # type: ignore[call-overload]
            raise self.refuse(node, index, "only along channels (axis 1)")
        tensors = [self.tensor(node, index, position) for position in range(len(node.input))]
        self.output(node, self.function(node, index, torch.cat, (tensors, 1)))

    def _final(self, node: onnx.NodeProto, index: int, kind: str = "softmax") -> fx.Node:
        """The file's last operation over the 10 scores, which stays float (monotone: the prediction is the
        scores'): the lab's graph ends at log-probabilities for Softmax and LogSoftmax, at the scores
        themselves for Sigmoid (the arrival check applies the sigmoid to compare)."""
        if node.output[0] != self.graph.output[0].name:
            raise self.refuse(node, index, "only as the last operation, over the classes")
        if kind == "sigmoid":
            self.final = kind
            return self.tensor(node, index, 0)
        if int(self.attribute(node, "axis", -1)) not in (1, -1):  # type: ignore[call-overload]
            raise self.refuse(node, index, "only over the classes (axis 1)")
        self.final = kind
        return self.function(node, index, F.log_softmax, (self.tensor(node, index, 0),), {"dim": 1})

    def op_LogSoftmax(self, node: onnx.NodeProto, index: int) -> None:
        self.output(node, self._final(node, index, "log_softmax"))

    def op_Softmax(self, node: onnx.NodeProto, index: int) -> None:
        # the lab works with log-probabilities; the same argmax, and exp() gives the file's values back
        self.output(node, self._final(node, index))

    # --- the whole graph -------------------------------------------------------------------------
    def run(self) -> fx.GraphModule:
        name = self._input_name()
        self.image = self.fx.placeholder("image")
        self.probe[self.image] = torch.zeros(2, *INPUT_SHAPE)
        shape = tuple(int(d) for d in _tensor_shape(image_input(self.graph))[1:])  # read_onnx accepted it
        self.views[name] = (shape, 1.0, 0.0)
        self.shapes[name] = [BATCH, *shape]
        for index, node in enumerate(self.graph.node):
            checkpoint()  # bounded work per node (each probe within the bounds): abandoned imports stop
            self.convert(node, index)
        out = self.graph.output[0].name
        if out not in self.values:
            raise OnnxImportError("the output is not computed from the image by the imported operations")
        result = self.values[out]
        if self.probe[result].ndim > 2:  # scores as [N, 10, 1, 1] or [N, 1, 10]: flattened to [N, 10]
            result = self.function(self.graph.node[-1], len(self.graph.node) - 1, torch.flatten, (result, 1))
        self.fx.output(result)
        return fx.GraphModule(self.modules, self.fx)

    def _input_name(self) -> str:
        return image_input(self.graph).name


def _convert(model: onnx.ModelProto) -> tuple[fx.GraphModule, _Converter]:
    converter = _Converter(model)
    try:
        module = converter.run()
    except (RuntimeError, ValueError, IndexError, TypeError) as error:  # shapes that do not fit: one line
        if isinstance(error, OnnxImportError):
            raise
        raise OnnxImportError(
            f"the operations do not fit together on [N, 1, 28, 28] images ({shorten(error, 120)})"
        ) from None
    return module.eval(), converter


def onnx_module(model: onnx.ModelProto) -> tuple[fx.GraphModule, bool]:
    """The validated model's graph as a torch.fx module of torch's layers (eval mode), and whether the
    file ends in Softmax (the module gives log-probabilities either way)."""
    module, converter = _convert(model)
    return module, converter.final == "softmax"


def check_batch(activation_values: int) -> int:
    """Images per batch of the arrival check so that a batch's activations stay within CHECK_MEMORY_BYTES."""
    return max(1, min(250, CHECK_MEMORY_BYTES // max(1, 4 * activation_values)))


def _checked(model: onnx.ModelProto) -> tuple[fx.GraphModule, _Converter]:
    """The file's graph converted, and passed by the lab's own graph checks."""
    from qcore.graph import GraphError, model_graph

    module, converter = _convert(model)
    try:
        model_graph(module)  # the lab's own checks (BatchNorm after a conv, linear after a flatten, ...)
    except GraphError as error:
        raise OnnxImportError(str(error)) from None
    return module, converter


def _reference_scores(scores: object) -> torch.Tensor:
    """ONNX Runtime's scores as the child computed them (the arrival check's reference)."""
    import numpy as np

    return torch.from_numpy(np.asarray(scores, dtype=np.float32))


def _batched(module: nn.Module, images: torch.Tensor, step: int) -> torch.Tensor:
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(images), step):
            checkpoint()
            outputs.append(module(images[start : start + step]))
    return torch.cat(outputs)


def import_onnx(data: bytes, dataset: Dataset, input_scale: str = "auto") -> ImportedModel:
    """An ONNX file as a lab model on `dataset` (its standardized images, as loaded), reading images in
    the pixel convention `input_scale` or, for "auto", the one under which ONNX Runtime finds the file most
    accurate on SCALE_IMAGES training images; refused with one line when it cannot be: the checks of
    read_onnx, a forward pass on probe images that is not finite, or a prediction of the imported graph
    that differs from ONNX Runtime's on any of the first CHECK_IMAGES test images (each fed as the file
    reads it). onnx's version converter and ONNX Runtime run in a bounded child process (onnx_sandbox)."""
    from qcore.data import INPUT_SCALES, view_spec, with_input_scale
    from qcore.models.onnx_sandbox import SandboxError, run_in_sandbox

    if input_scale != "auto" and input_scale not in INPUT_SCALES:
        raise OnnxImportError(
            f"unknown input scale {shorten(input_scale, 20)!r}; auto or one of {', '.join(INPUT_SCALES)}"
        )
    model, file_opset, outputs = _read(data)
    old = file_opset in OLD_OPSETS
    converted = None if old else _checked(model)  # a file the lab cannot run is refused before the child starts
    graph_input = image_input(model.graph)
    layout = tuple(int(d) for d in _tensor_shape(graph_input)[1:])
    batch = graph_input.type.tensor_type.shape.dim[0]
    fixed = batch.dim_value if batch.HasField("dim_value") and batch.dim_value > 0 else 0
    # batches bounded by the activation budget (an old file's is known only after the upgrade: 16 images)
    step = fixed or (16 if converted is None else check_batch(converted[1].activation_values))
    spec = dataset.spec
    conventions = {
        scale: (spec.mean, spec.std, view_spec(spec, scale).mean, view_spec(spec, scale).std) for scale in INPUT_SCALES
    }
    try:
        answer = run_in_sandbox(
            data,
            model.SerializeToString() if old else None,
            dataset.train.images[:SCALE_IMAGES].numpy(),
            dataset.train.labels[:SCALE_IMAGES].numpy(),
            dataset.test.images[:CHECK_IMAGES].numpy(),
            conventions,
            input_scale,
            layout,
            graph_input.type.tensor_type.elem_type == 11,
            model.graph.output[0].name,
            step,
            torch.get_num_threads(),
        )
    except SandboxError as error:
        raise OnnxImportError(str(error)) from None
    if old:
        if answer.upgraded is None:
            raise OnnxImportError("the converter gave no model back")
        model, upgraded_opset, _ = _read(answer.upgraded)  # the child's output is checked like any file
        if upgraded_opset != UPGRADE_OPSET:
            raise OnnxImportError(f"the converter gave opset {upgraded_opset}, not {UPGRADE_OPSET}")
        converted = _checked(model)
    assert converted is not None
    module, converter = converted
    affine = converter.input_affine or (1.0, 0.0)
    seen = with_input_scale(dataset, answer.chosen, affine)  # what the lab's graph reads
    with torch.inference_mode():
        probes = module(probe_images(seen.spec))
    if not bool(torch.isfinite(probes).all()):
        raise OnnxImportError("the model's outputs are not finite on ordinary images (probe images)")
    images = seen.test.images[:CHECK_IMAGES]
    reference = _reference_scores(answer.scores)
    ours = _batched(module, images, step)
    if converter.final == "softmax":
        ours = ours.exp()
    elif converter.final == "sigmoid":
        ours = torch.sigmoid(ours)
    if reference.shape != ours.shape:
        raise OnnxImportError(
            f"ONNX Runtime gives outputs of shape {list(reference.shape)}, the import {list(ours.shape)}"
        )
    difference = float((reference - ours).abs().max())
    parted = int((reference.argmax(1) != ours.argmax(1)).sum())
    if parted:
        raise OnnxImportError(
            f"the imported graph and ONNX Runtime predict differently on {parted} of {len(images)} test images "
            f"(largest difference of a score: {difference:.3g})"
        )
    producer = " ".join(part for part in (model.producer_name, model.producer_version) if part)
    return ImportedModel(
        module=module,
        onnx_bytes=data,
        producer=shorten(producer or "unknown", 60),
        opset=file_opset,
        nodes=len(model.graph.node),
        parameters=sum(p.numel() for p in module.parameters()),
        dataset=dataset.spec.name,
        input_scale=answer.chosen,
        agreement_images=len(images),
        largest_difference=difference,
        activation_values=converter.activation_values,
        multiply_adds=converter.multiply_adds,
        labels=tuple(converter.labels.items()),
        input_affine=affine,
        input_layout=layout,
        input_float64=graph_input.type.tensor_type.elem_type == 11,
        input_steps=tuple(converter.steps),
        scale_accuracies=tuple((scale, answer.accuracies[scale]) for scale in INPUT_SCALES),
        scale_measured=input_scale == "auto",
        scores_output=shorten(model.graph.output[0].name, 40) if outputs > 1 else "",
    )


def is_onnx(data: bytes) -> bool:
    """Whether a file's content is an ONNX model: protobuf whose first field is the IR version (field 1,
    a varint: byte 0x08), as every ONNX writer puts it first, and that parses with a graph."""
    if data[:1] != b"\x08" or len(data) > MAX_FILE_BYTES:
        return False
    import onnx
    from google.protobuf.message import DecodeError

    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError):
        return False
    return model.HasField("graph")


def describe(dataset: DatasetSpec, imported: ImportedModel) -> str:
    """One line for the model card: producer, opset, size, data, and the arrival check."""
    from qcore.data import INPUT_SCALE_TITLES

    return (
        f"ONNX from {imported.producer}, opset {imported.opset}"
        f"{f' (upgraded to {UPGRADE_OPSET})' if imported.opset in OLD_OPSETS else ''}, {imported.nodes} nodes, "
        f"{imported.parameters:,} parameters, {imported.multiply_adds:,} multiply-adds and "
        f"{imported.activation_values:,} activation values per image; reads {dataset.title.split(' (')[0]} as "
        f"{INPUT_SCALE_TITLES[imported.input_scale]}; matches ONNX Runtime on "
        f"{imported.agreement_images} test images (largest score difference {imported.largest_difference:.2g})"
    )


def describe_input(imported: ImportedModel) -> list[str]:
    """The card's lines on what the file reads: its layout, its own input step, and the float accuracy
    under each pixel convention (which one was measured best, or named)."""
    from qcore.data import INPUT_SCALE_TITLES

    layout = ", ".join(map(str, imported.input_layout))
    lines = [f"input [N, {layout}]" + (" (the grey image in each channel)" if imported.input_layout[0] == 3 else "")]
    if imported.input_steps:
        multiply, add = imported.input_affine
        lines.append(
            f"the file's own input step, run in float before the image is quantized: {'; '.join(imported.input_steps)}"
            f" (x * {multiply:.6g} + {add:.6g})"
        )
    if imported.scores_output:
        lines.append(f"scores from output {imported.scores_output}")
    from qcore.graph.ops import Normalization

    normalizations = [name for name, module in imported.module.named_modules() if isinstance(module, Normalization)]
    if normalizations:
        lines.append(
            f"normalized by each sample's own statistics, in float between a dequantize and a quantize: "
            f"{', '.join(normalizations)} (the integer engine and the exports have no integer rule for them)"
        )
    if imported.scale_accuracies:
        how = "measured best" if imported.scale_measured else "named"
        measured = "; ".join(
            f"{INPUT_SCALE_TITLES[scale]} {100 * accuracy:.1f}%" for scale, accuracy in imported.scale_accuracies
        )
        lines.append(
            f"pixel convention {INPUT_SCALE_TITLES[imported.input_scale]} ({how}); float accuracy on "
            f"{SCALE_IMAGES:,} training images under each: {measured}"
        )
    return lines
