"""A user's own model as an ONNX file, imported into the lab's model graph. Every file is hostile.

Reading ONNX runs no code, but a file can point its tensors at other files, declare tensors far larger
than itself, nest subgraphs or use any operator. So, in order, `read_onnx`
1. bounds the file's size and parses the protobuf alone (no external data is ever resolved or opened);
2. refuses, each in one line and before any tensor is allocated: external data (wherever `location`
   points), a tensor whose declared size the file does not hold or that passes the bounds below, more
   nodes or parameters than the bounds, subgraphs (If, Loop, Scan, any graph attribute) and local
   functions, an operator set other than ONNX's own at a version outside ONNX_OPSETS, an operator
   outside the supported set (named, with its node), an input that is not one [N, 1, 28, 28] float
   image tensor or an output that is not [N, 10] scores (named with the shape found);
then `onnx_module` turns the nodes into a torch.fx module of torch's own layers (Conv2d, BatchNorm2d,
Linear, ReLU, ReLU6, pools) that `qcore.graph.model_graph` traces like any zoo model, evaluating the
constant computations exporters emit around them (Constant; Shape, Gather, Unsqueeze and Concat
feeding a Reshape) with the batch size as a symbol; and `import_onnx` checks the result on probe
images (finite) and against ONNX Runtime on 1,000 test images (the same prediction on every one).
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

from qcore.cancel import Cancelled, checkpoint
from qcore.files import shorten
from qcore.models.checkpoint import MAX_FILE_BYTES, CheckpointError, probe_images

if TYPE_CHECKING:
    import onnx

    from qcore.data import Dataset, DatasetSpec

ONNX_OPSETS = range(11, 24)  # ONNX's own operator set: 11 (Clip's bounds as inputs) to 23
MAX_NODES = 2000
MAX_PARAMETERS = 4_000_000  # float32 values across all tensors (the upload limit holds about 1M anyway)
MAX_TENSOR_DIMS = 8
CHECK_IMAGES = 1000  # test images run through ONNX Runtime and the imported graph on arrival
# The work a graph asks for, which the parameter bound does not see (a 1x1 convolution to 2,048 channels
# has 2 kB of weights and 1.6M values per image), bounded from the shapes before anything runs. The zoo's
# largest: one tensor of 25,088 values per image, 182,948 in all, 9.3M multiply-adds, 24 operations.
MAX_TENSOR_VALUES = 131_072  # one activation per image: 128 channels at 32x32, 512 kB
MAX_ACTIVATION_VALUES = 1_048_576  # all activations of one image together: 4 MB
MAX_MULTIPLY_ADDS = 100_000_000  # per image, every convolution and linear layer together
MAX_OPERATIONS = 256  # operations of the lab's graph (layers, activations, pools, adds, ...)
CHECK_MEMORY_BYTES = 256 * 2**20  # the arrival check's batches hold at most this much activation
INPUT_SHAPE = (1, 28, 28)
CLASSES = 10
# The operators the lab turns into its graph, and those that only compute constants around them
LAYER_OPS = {
    "Conv",
    "Gemm",
    "MatMul",
    "Add",
    "BatchNormalization",
    "Relu",
    "Clip",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "ReduceMean",
    "Flatten",
    "Reshape",
    "Concat",
    "LogSoftmax",
    "Softmax",
    "Identity",
    "Dropout",
}
CONSTANT_OPS = {"Constant", "Shape", "Gather", "Unsqueeze"}
SUPPORTED_OPS = LAYER_OPS | CONSTANT_OPS
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
    opset: int
    nodes: int
    parameters: int
    dataset: str
    input_scale: str  # "normalized" or "raw"
    agreement_images: int  # test images on which ONNX Runtime and the import were compared
    largest_difference: float  # of any output score between the two on those images
    activation_values: int = 0  # per image, every operation's output together (bounded on arrival)
    multiply_adds: int = 0  # per image
    # each module's name in the lab -> the file's own name for its node: plain text, shortened, for display
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def identity(self) -> str:
        """What decides this model's results: its graph and weights (fingerprint), the dataset it is
        evaluated on and the input convention it reads."""
        import hashlib

        from qcore.models.checkpoint import fingerprint

        text = "|".join((fingerprint(self.module), self.dataset, self.input_scale))
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
    """The parsed model, after every check in the module's docstring's step 2 (nothing allocated from it)."""
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
    foreign = sorted(domain for domain in opsets if domain != "ai.onnx")
    if foreign:
        raise OnnxImportError(f"operator set {shorten(foreign[0], 40)!r} is not supported (only ONNX's own)")
    opset = opsets.get("ai.onnx", 0)
    if opset not in ONNX_OPSETS:
        raise OnnxImportError(
            f"opset {opset}; the lab imports ONNX opsets {ONNX_OPSETS.start} to {ONNX_OPSETS.stop - 1} "
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
                f"unsupported operation {shorten(node.domain, 30)}.{shorten(node.op_type, 30)} {_where(node, index)}"
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
    initialized = {tensor.name for tensor in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initialized]
    if len(inputs) != 1:
        raise OnnxImportError(f"the model takes {len(inputs)} inputs; it must take one image tensor [N, 1, 28, 28]")
    shape = _tensor_shape(inputs[0])
    if inputs[0].type.tensor_type.elem_type != 1 or len(shape) != 4 or tuple(shape[1:]) != INPUT_SHAPE:
        raise OnnxImportError(
            f"the input is {shorten(str(shape), 60)}; it must be one float image tensor [N, 1, 28, 28]"
        )
    if len(graph.output) != 1:
        raise OnnxImportError(f"the model gives {len(graph.output)} outputs; it must give one tensor of 10 scores")
    shape = _tensor_shape(graph.output[0])
    if len(shape) != 2 or shape[1] != CLASSES:
        raise OnnxImportError(f"the output is {shorten(str(shape), 60)}; it must be [N, 10], one score per class")
    return model


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
        self.pending_bias: dict[str, str] = {}  # a MatMul's output -> its Linear (an Add may supply the bias)
        self.readers: dict[str, int] = {}
        for node in self.graph.node:
            for name in node.input:
                self.readers[name] = self.readers.get(name, 0) + 1
        self.softmax_output = False
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

    def padding(self, node: onnx.NodeProto, index: int) -> tuple[int, int]:
        auto_pad = self.attribute(node, "auto_pad", b"NOTSET")
        if auto_pad not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
            raise self.refuse(node, index, "auto_pad SAME is not imported; export with explicit pads")
        pads = [int(p) for p in self.attribute(node, "pads", [0, 0, 0, 0])]  # type: ignore[union-attr]
        if len(pads) != 4 or pads[0] != pads[2] or pads[1] != pads[3]:
            raise self.refuse(node, index, f"pads {pads} are not the same on both sides")
        return pads[0], pads[1]

    # --- the operators ---------------------------------------------------------------------------
    def convert(self, node: onnx.NodeProto, index: int) -> None:
        op = node.op_type
        handler = getattr(self, f"op_{op}", None)
        assert handler is not None, op  # read_onnx refused every other operator
        handler(node, index)

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
        x = self.tensor(node, index, 0)
        weight = self.weight(node, index, 1)
        bias = self.weight(node, index, 2, required=False)
        assert weight is not None
        if weight.ndim != 4:
            raise self.refuse(node, index, "only 2-D convolutions")
        if self.pair(node, index, "dilations", [1, 1]) != (1, 1):
            raise self.refuse(node, index, "only dilation 1")
        groups = int(self.attribute(node, "group", 1))  # type: ignore[call-overload]
        out_channels, per_group, kh, kw = weight.shape
        conv = nn.Conv2d(
            per_group * groups,
            out_channels,
            (kh, kw),
            self.pair(node, index, "strides", [1, 1]),
            self.padding(node, index),
            groups=groups,
            bias=True,
        )
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(torch.zeros(out_channels) if bias is None else bias)
        self.output(node, self.module(node, index, conv, x))

    def op_BatchNormalization(self, node: onnx.NodeProto, index: int) -> None:
        x = self.tensor(node, index, 0)
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
        self.output(node, self.module(node, index, bn.eval(), x))

    def op_Relu(self, node: onnx.NodeProto, index: int) -> None:
        self.output(node, self.module(node, index, nn.ReLU(), self.tensor(node, index, 0)))

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
        kernel = self.pair(node, index, "kernel_shape", [])
        pool = nn.MaxPool2d(kernel, self.pair(node, index, "strides", [1, 1]), self.padding(node, index))
        self.output(node, self.module(node, index, pool, self.tensor(node, index, 0)))

    def op_AveragePool(self, node: onnx.NodeProto, index: int) -> None:
        if int(self.attribute(node, "ceil_mode", 0)) or self.padding(node, index) != (0, 0):  # type: ignore[call-overload]
            raise self.refuse(node, index, "only unpadded average pooling without ceil_mode")
        kernel = self.pair(node, index, "kernel_shape", [])
        pool = nn.AvgPool2d(kernel, self.pair(node, index, "strides", [1, 1]))
        self.output(node, self.module(node, index, pool, self.tensor(node, index, 0)))

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
        self.output(node, self.function(node, index, torch.flatten, (self.tensor(node, index, 0), 1)))

    def op_Reshape(self, node: onnx.NodeProto, index: int) -> None:
        x = self.tensor(node, index, 0)
        target = self._as_list(self.constant(node, index, 1))
        features = math.prod(int(d) for d in self.shapes[node.input[0]][1:])  # type: ignore[call-overload]
        batch = self.graph.input[0].type.tensor_type.shape.dim[0]
        fixed = [batch.dim_value] if batch.HasField("dim_value") and batch.dim_value > 0 else []
        first_ok = len(target) == 2 and (target[0] is BATCH or target[0] in (0, -1, *fixed))
        second_ok = len(target) == 2 and (target[1] == features or (target[1] == -1 and target[0] != -1))
        if not (first_ok and second_ok):
            raise self.refuse(node, index, f"reshaping to {shorten(str(target), 40)}; only to (batch, features)")
        self.output(node, self.function(node, index, torch.flatten, (x, 1)))

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

    def _linear(
        self, node: onnx.NodeProto, index: int, x: fx.Node, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> fx.Node:
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
        self.pending_bias[node.output[0]] = str(linear.target)

    def op_Add(self, node: onnx.NodeProto, index: int) -> None:
        a, b = node.input[0], node.input[1]
        if a in self.values and b in self.values:
            if self.shapes.get(a) != self.shapes.get(b):
                raise self.refuse(node, index, "shapes differ (no broadcasting)")
            self.output(node, self.function(node, index, operator.add, (self.values[a], self.values[b])))
            return
        tensor, constant = (a, b) if a in self.values else (b, a)
        if tensor in self.pending_bias and constant in self.constants and self.readers.get(tensor) == 1:
            linear = self.modules[self.pending_bias.pop(tensor)]
            bias = self.weight(node, index, list(node.input).index(constant))
            assert isinstance(linear, nn.Linear) and bias is not None
            if bias.numel() not in (1, linear.out_features):
                raise self.refuse(node, index, "the bias must have one value per output")
            with torch.no_grad():
                linear.bias.copy_(bias.reshape(-1).expand(linear.out_features))
            self.output(node, self.values[tensor])
            return
        raise self.refuse(
            node, index, "adding a constant; residual adds of two tensors and a MatMul's bias are imported"
        )

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

    def _final(self, node: onnx.NodeProto, index: int) -> fx.Node:
        if node.output[0] != self.graph.output[0].name:
            raise self.refuse(node, index, "only as the last operation, over the classes")
        if int(self.attribute(node, "axis", -1)) not in (1, -1):  # type: ignore[call-overload]
            raise self.refuse(node, index, "only over the classes (axis 1)")
        return self.function(node, index, F.log_softmax, (self.tensor(node, index, 0),), {"dim": 1})

    def op_LogSoftmax(self, node: onnx.NodeProto, index: int) -> None:
        self.output(node, self._final(node, index))

    def op_Softmax(self, node: onnx.NodeProto, index: int) -> None:
        # the lab works with log-probabilities; the same argmax, and exp() gives the file's values back
        self.output(node, self._final(node, index))
        self.softmax_output = True

    # --- the whole graph -------------------------------------------------------------------------
    def run(self) -> fx.GraphModule:
        name = self._input_name()
        image = self.fx.placeholder("image")
        self.probe[image] = torch.zeros(2, *INPUT_SHAPE)
        self.values[name] = image
        self.shapes[name] = [BATCH, *INPUT_SHAPE]
        for index, node in enumerate(self.graph.node):
            checkpoint()  # bounded work per node (each probe within the bounds): abandoned imports stop
            self.convert(node, index)
        out = self.graph.output[0].name
        if out not in self.values:
            raise OnnxImportError("the output is not computed from the image by the imported operations")
        self.fx.output(self.values[out])
        return fx.GraphModule(self.modules, self.fx)

    def _input_name(self) -> str:
        initialized = {tensor.name for tensor in self.graph.initializer}
        return next(value.name for value in self.graph.input if value.name not in initialized)


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
    return module, converter.softmax_output


def check_batch(activation_values: int) -> int:
    """Images per batch of the arrival check so that a batch's activations stay within CHECK_MEMORY_BYTES."""
    return max(1, min(250, CHECK_MEMORY_BYTES // max(1, 4 * activation_values)))


def _onnxruntime_outputs(data: bytes, model: onnx.ModelProto, images: torch.Tensor, step: int) -> torch.Tensor:
    """ONNX Runtime's outputs for `images`, in batches of `step`, or of the input's own batch size when it
    is fixed."""
    import numpy as np

    from qcore.models.onnx_runtime import onnxruntime_session

    session = onnxruntime_session(data, torch.get_num_threads())
    name = session.get_inputs()[0].name
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    step = batch.dim_value if batch.HasField("dim_value") and batch.dim_value > 0 else step
    outputs = []
    for start in range(0, len(images), step):
        checkpoint()  # a batch at a time: an upload whose session has left stops here
        outputs.append(session.run(None, {name: images[start : start + step].numpy().astype(np.float32)})[0])
    return torch.from_numpy(np.concatenate(outputs)).float()


def _batched(module: nn.Module, images: torch.Tensor, step: int) -> torch.Tensor:
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(images), step):
            checkpoint()
            outputs.append(module(images[start : start + step]))
    return torch.cat(outputs)


def import_onnx(data: bytes, dataset: Dataset, input_scale: str = "normalized") -> ImportedModel:
    """An ONNX file as a lab model on `dataset` (whose images are already scaled as the model expects:
    see qcore.data.with_input_scale), refused with one line when it cannot be: the checks of read_onnx,
    a forward pass on probe images that is not finite, or a prediction of the imported graph that
    differs from ONNX Runtime's on any of the first CHECK_IMAGES test images."""
    from qcore.graph import GraphError, model_graph

    model = read_onnx(data)
    module, converter = _convert(model)
    softmax, step = converter.softmax_output, check_batch(converter.activation_values)
    try:
        model_graph(module)  # the lab's own checks (BatchNorm after a conv, linear after a flatten, ...)
    except GraphError as error:
        raise OnnxImportError(str(error)) from None
    with torch.inference_mode():
        probes = module(probe_images(dataset.spec))
    if not bool(torch.isfinite(probes).all()):
        raise OnnxImportError("the model's outputs are not finite on ordinary images (probe images)")
    images = dataset.test.images[:CHECK_IMAGES]
    try:
        reference = _onnxruntime_outputs(data, model, images, step)
    except Cancelled:
        raise
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types for bad models
        raise OnnxImportError(f"ONNX Runtime cannot run the file ({shorten(error, 120)})") from None
    ours = _batched(module, images, step)
    if softmax:
        ours = ours.exp()
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
    opset = {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}["ai.onnx"]
    return ImportedModel(
        module=module,
        onnx_bytes=data,
        producer=shorten(producer or "unknown", 60),
        opset=opset,
        nodes=len(model.graph.node),
        parameters=sum(p.numel() for p in module.parameters()),
        dataset=dataset.spec.name,
        input_scale=input_scale,
        agreement_images=len(images),
        largest_difference=difference,
        activation_values=converter.activation_values,
        multiply_adds=converter.multiply_adds,
        labels=tuple(converter.labels.items()),
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
    scale = "raw [0, 1] pixels" if imported.input_scale == "raw" else f"{dataset.title} normalized images"
    return (
        f"ONNX from {imported.producer}, opset {imported.opset}, {imported.nodes} nodes, "
        f"{imported.parameters:,} parameters, {imported.multiply_adds:,} multiply-adds and "
        f"{imported.activation_values:,} activation values per image; reads {scale}; matches ONNX Runtime on "
        f"{imported.agreement_images} test images (largest score difference {imported.largest_difference:.2g})"
    )
