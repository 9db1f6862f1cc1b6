"""A float nn.Module turned, once, into the lab's model graph: torch.fx symbolic tracing, then every
node checked against the supported operations and BatchNorm folded into the convolution before it.

Why torch.fx and not torch.export: fx keeps the module boundaries (`call_module layer1.conv`), so a
layer's name is its state_dict prefix and BatchNorm is a module after a conv, which is exactly the
folding pattern; torch.export lowers to ATen ops with BatchNorm decomposed and the module names only
in metadata, and it compiles (seconds), where fx traces a small CNN in milliseconds.
"""

from __future__ import annotations

import operator
import threading

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from qcore.graph.ops import Activation, GraphError, ModelGraph, Normalization, Op, OpKind

INPUT_SHAPE = (1, 28, 28)  # MNIST and Fashion-MNIST: one channel, 28 x 28
MAX_NODES = 2000  # bound the work of checking a traced graph


def _pair(value: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


def _where(node: fx.Node) -> str:
    """'after <the nearest named input>' or 'at the input', for one-line refusals."""
    for argument in node.all_input_nodes:
        return f"after {argument.target if argument.op == 'call_module' else argument.name}"
    return "at the input"


def _refuse(node: fx.Node, what: str, reason: str = "") -> GraphError:
    detail = f" ({reason})" if reason else ""
    return GraphError(f"unsupported operation {what!r} {_where(node)}{detail}")


def _function_name(target: object) -> str:
    return getattr(target, "__name__", str(target))


def _argument(node: fx.Node, index: int, name: str, default: object) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise GraphError(f"operation {node.name!r} does not produce one tensor")
    return tuple(int(v) for v in meta.shape)


class _Builder:
    """Walks the traced nodes in order and emits Ops, folding BatchNorm into the conv before it."""

    def __init__(self, traced: fx.GraphModule) -> None:
        self.modules = dict(traced.named_modules())
        self.ops: list[Op] = []
        self.names: dict[fx.Node, str] = {}  # fx node -> the op whose value it is
        self.parameters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.folded: dict[str, str] = {}

    def source(self, node: object, user: fx.Node) -> str:
        if not isinstance(node, fx.Node) or node not in self.names:
            raise _refuse(user, _function_name(user.target), "its input is not a tensor of the network")
        return self.names[node]

    def emit(self, node: fx.Node, kind: OpKind, inputs: tuple[str, ...], name: str | None = None, **attrs) -> None:
        op = Op(name or node.name, kind, inputs, _shape(node), dict(attrs))
        self.ops.append(op)
        self.names[node] = op.name

    def alias(self, node: fx.Node, of: fx.Node) -> None:
        """A node with no effect at inference (dropout, identity, contiguous): its value is its input's."""
        self.names[node] = self.source(of, node)

    def module_node(self, node: fx.Node) -> None:
        module = self.modules[str(node.target)]
        name = str(node.target)
        x = node.args[0]
        if isinstance(module, nn.Conv2d):
            if _pair(module.dilation) != (1, 1) or module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise _refuse(node, "Conv2d", "only dilation 1 and numeric zero padding are supported")
            weight = module.weight.detach().clone()
            bias = module.bias.detach().clone() if module.bias is not None else torch.zeros(weight.shape[0])
            self.parameters[name] = (weight, bias)
            self.emit(
                node,
                OpKind.CONV,
                (self.source(x, node),),
                name=name,
                stride=_pair(module.stride),
                padding=_pair(module.padding),
                groups=int(module.groups),
            )
        elif isinstance(module, nn.Linear):
            weight = module.weight.detach().clone()
            bias = module.bias.detach().clone() if module.bias is not None else torch.zeros(weight.shape[0])
            self.parameters[name] = (weight, bias)
            self.emit(node, OpKind.LINEAR, (self.source(x, node),), name=name)
        elif isinstance(module, nn.BatchNorm2d):
            self.fold_batchnorm(node, module, x)
        elif isinstance(module, nn.ReLU):
            self.emit(node, OpKind.RELU, (self.source(x, node),))
        elif isinstance(module, nn.ReLU6) or (
            isinstance(module, nn.Hardtanh) and (module.min_val, module.max_val) == (0.0, 6.0)
        ):
            self.emit(node, OpKind.RELU6, (self.source(x, node),))
        elif isinstance(module, Activation):
            attrs = {"function": module.function, "parameter": module.parameter}
            self.emit(node, OpKind.LOOKUP, (self.source(x, node),), **attrs)
        elif isinstance(module, Normalization):
            attrs = {"function": module.function, "axes": module.axes, "eps": module.eps}
            attrs |= {"weight": module.weight, "bias": module.bias}
            self.emit(node, OpKind.NORMALIZE, (self.source(x, node),), name=name, **attrs)
        elif type(module) in _TORCH_ACTIVATIONS:
            function, parameter = _TORCH_ACTIVATIONS[type(module)](module)
            self.emit(node, OpKind.LOOKUP, (self.source(x, node),), function=function, parameter=parameter)
        elif isinstance(module, nn.MaxPool2d):
            self.max_pool(node, x, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode)
        elif isinstance(module, nn.AvgPool2d):
            self.avg_pool(node, x, module.kernel_size, module.stride, module.padding, module.ceil_mode)
        elif isinstance(module, nn.AdaptiveAvgPool2d):
            self.global_pool(node, x, module.output_size)
        elif isinstance(module, nn.Flatten):
            self.flatten(node, x, module.start_dim, module.end_dim)
        elif isinstance(module, nn.Dropout | nn.Identity):
            self.alias(node, x)
        elif isinstance(module, nn.LogSoftmax):
            self.log_softmax(node, x, module.dim)
        else:
            raise _refuse(node, type(module).__name__)

    def fold_batchnorm(self, node: fx.Node, bn: nn.BatchNorm2d, x: object) -> None:
        """w' = w * g / sqrt(var + eps), b' = (b - mean) * g / sqrt(var + eps) + beta, per output channel:
        the conv and its BatchNorm in eval mode as one conv (what every path then quantizes)."""
        producer = self.ops[-1] if self.ops else None
        if (
            not isinstance(x, fx.Node)
            or producer is None
            or producer.kind is not OpKind.CONV
            or self.names.get(x) != producer.name
            or len(x.users) != 1
            or bn.running_mean is None
            or bn.running_var is None
        ):
            raise _refuse(
                node, "BatchNorm2d", "BatchNorm is supported right after a convolution that nothing else reads"
            )
        weight, bias = self.parameters[producer.name]
        gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_mean)
        beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(bn.running_mean)
        factor = gamma / torch.sqrt(bn.running_var.detach() + bn.eps)
        self.parameters[producer.name] = (
            weight * factor.reshape(-1, 1, 1, 1),
            (bias - bn.running_mean.detach()) * factor + beta,
        )
        self.folded[producer.name] = str(node.target)
        self.names[node] = producer.name

    def max_pool(self, node: fx.Node, x: object, kernel, stride, padding, dilation, ceil_mode) -> None:
        stride = kernel if stride is None or stride == [] else stride
        if _pair(dilation) != (1, 1) or ceil_mode:
            raise _refuse(node, "max_pool2d", "only dilation 1 without ceil_mode is supported")
        self.emit(
            node,
            OpKind.MAXPOOL,
            (self.source(x, node),),
            kernel=_pair(kernel),
            stride=_pair(stride),
            padding=_pair(padding),
        )

    def avg_pool(self, node: fx.Node, x: object, kernel, stride, padding, ceil_mode) -> None:
        stride = kernel if stride is None or stride == [] else stride
        if _pair(padding) != (0, 0) or ceil_mode:
            raise _refuse(node, "avg_pool2d", "only unpadded average pooling without ceil_mode is supported")
        self.emit(node, OpKind.AVGPOOL, (self.source(x, node),), kernel=_pair(kernel), stride=_pair(stride))

    def global_pool(self, node: fx.Node, x: object, output_size) -> None:
        if output_size not in (1, (1, 1), [1, 1]):
            raise _refuse(node, "adaptive_avg_pool2d", "only output size 1 (global average pooling) is supported")
        assert isinstance(x, fx.Node)
        height, width = _shape(x)[2:]
        self.emit(node, OpKind.AVGPOOL, (self.source(x, node),), kernel=(height, width), stride=(height, width))

    def flatten(self, node: fx.Node, x: object, start: int, end: int = -1) -> None:
        if start != 1 or end not in (-1, 3):
            raise _refuse(node, "flatten", "only flattening everything after the batch dimension is supported")
        self.emit(node, OpKind.FLATTEN, (self.source(x, node),))

    def log_softmax(self, node: fx.Node, x: object, dim: object) -> None:
        if dim not in (1, -1) or any(user.op != "output" for user in node.users):
            raise _refuse(node, "log_softmax", "only over the classes, as the last operation")
        self.emit(node, OpKind.LOG_SOFTMAX, (self.source(x, node),))

    def function_node(self, node: fx.Node) -> None:
        target = node.target
        x = node.args[0] if node.args else None
        if target in (F.relu, torch.relu):
            self.emit(node, OpKind.RELU, (self.source(x, node),))
        elif target is F.relu6 or (
            target is F.hardtanh and (_argument(node, 1, "min_val", -1.0), _argument(node, 2, "max_val", 1.0)) == (0, 6)
        ):
            self.emit(node, OpKind.RELU6, (self.source(x, node),))
        elif target in _FUNCTION_ACTIVATIONS:
            function, parameter = _FUNCTION_ACTIVATIONS[target](node)
            self.emit(node, OpKind.LOOKUP, (self.source(x, node),), function=function, parameter=parameter)
        elif target is F.max_pool2d:
            kernel = _argument(node, 1, "kernel_size", None)
            self.max_pool(
                node,
                x,
                kernel,
                _argument(node, 2, "stride", None),
                _argument(node, 3, "padding", 0),
                _argument(node, 4, "dilation", 1),
                _argument(node, 5, "ceil_mode", False),
            )
        elif target is F.avg_pool2d:
            if _argument(node, 6, "divisor_override", None) is not None:
                raise _refuse(node, "avg_pool2d", "divisor_override is not supported")
            self.avg_pool(
                node,
                x,
                _argument(node, 1, "kernel_size", None),
                _argument(node, 2, "stride", None),
                _argument(node, 3, "padding", 0),
                _argument(node, 4, "ceil_mode", False),
            )
        elif target is F.adaptive_avg_pool2d:
            self.global_pool(node, x, _argument(node, 1, "output_size", None))
        elif target is torch.flatten:
            self.flatten(node, x, int(_argument(node, 1, "start_dim", 0)), int(_argument(node, 2, "end_dim", -1)))
        elif target in (operator.add, torch.add, operator.iadd):
            self.add(node)
        elif target is torch.cat:
            self.cat(node, node.args[0] if node.args else node.kwargs.get("tensors"), _argument(node, 1, "dim", 0))
        elif target in (F.log_softmax, torch.log_softmax):
            self.log_softmax(node, x, _argument(node, 1, "dim", None))
        elif target is F.dropout:
            self.alias(node, x)  # type: ignore[arg-type]
        elif target in (getattr, operator.getitem) and all(user.target in _SHAPE_USERS for user in node.users):
            return  # x.size(0) / x.shape[0] feeding a reshape: read by the reshape check below
        else:
            raise _refuse(node, _function_name(target))

    def add(self, node: fx.Node) -> None:
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        if len(node.args) > 2 or node.kwargs.get("alpha", 1) != 1:
            raise _refuse(node, "add", "only a plain sum of two tensors")
        if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
            raise _refuse(node, "add", "adding a constant is not supported; residual adds of two tensors are")
        if _shape(a) != _shape(b):
            raise _refuse(
                node, "add", f"shapes {list(_shape(a))[1:]} and {list(_shape(b))[1:]} differ (no broadcasting)"
            )
        self.emit(node, OpKind.ADD, (self.source(a, node), self.source(b, node)))

    def cat(self, node: fx.Node, tensors: object, dim: object) -> None:
        if dim not in (1, -3) or not isinstance(tensors, list | tuple) or len(tensors) < 2:
            raise _refuse(node, "cat", "only along channels (dim 1), of two or more tensors")
        self.emit(node, OpKind.CAT, tuple(self.source(t, node) for t in tensors))

    def method_node(self, node: fx.Node) -> None:
        method = str(node.target)
        x = node.args[0]
        if method == "flatten":
            self.flatten(node, x, int(_argument(node, 1, "start_dim", 0)), int(_argument(node, 2, "end_dim", -1)))
        elif method in ("view", "reshape"):
            assert isinstance(x, fx.Node)
            before, after = _shape(x), _shape(node)
            if len(after) != 2 or after[0] != before[0]:
                raise _refuse(node, method, "only reshaping to (batch, features) is supported")
            self.emit(node, OpKind.FLATTEN, (self.source(x, node),))
        elif method in ("relu", "relu_"):
            self.emit(node, OpKind.RELU, (self.source(x, node),))
        elif method in ("add", "add_", "__add__"):
            self.add(node)
        elif method == "mean" and _argument(node, 1, "dim", None) in ((2, 3), [2, 3], (-2, -1), [-2, -1]):
            if not _argument(node, 2, "keepdim", False):
                raise _refuse(node, "mean", "global average pooling by mean needs keepdim=True before a flatten")
            assert isinstance(x, fx.Node)
            height, width = _shape(x)[2:]
            self.emit(node, OpKind.AVGPOOL, (self.source(x, node),), kernel=(height, width), stride=(height, width))
        elif method == "contiguous":
            self.alias(node, x)  # type: ignore[arg-type]
        elif method in ("size", "dim") and all(user.target in _SHAPE_USERS for user in node.users):
            return
        else:
            raise _refuse(node, method)


_SHAPE_USERS = {"view", "reshape", operator.getitem}
# torch's own activation modules the lab computes by lookup: (function, parameter) from the module
_TORCH_ACTIVATIONS = {
    nn.Sigmoid: lambda m: ("sigmoid", ()),
    nn.Tanh: lambda m: ("tanh", ()),
    nn.LeakyReLU: lambda m: ("leaky_relu", (float(m.negative_slope),)),
    nn.ELU: lambda m: ("elu", (float(m.alpha),)),
    nn.Hardswish: lambda m: ("hardswish", ()),
}
_FUNCTION_ACTIVATIONS = {
    torch.sigmoid: lambda n: ("sigmoid", ()),
    F.sigmoid: lambda n: ("sigmoid", ()),
    torch.tanh: lambda n: ("tanh", ()),
    F.tanh: lambda n: ("tanh", ()),
    F.leaky_relu: lambda n: ("leaky_relu", (float(_argument(n, 1, "negative_slope", 0.01)),)),  # type: ignore[arg-type]
    F.elu: lambda n: ("elu", (float(_argument(n, 1, "alpha", 1.0)),)),  # type: ignore[arg-type]
    F.hardswish: lambda n: ("hardswish", ()),
}

# torch.fx traces by patching torch.nn.Module.__call__ and __getattr__ for the whole process while it
# runs: a server's other sessions evaluating a model in other threads would be routed into the trace
# (a forward pass getting proxies, the traced graph getting their nodes; seen as "KeyError: conv2" when
# two sessions' first pages traced and ran the bundled net at once), and two traces at once could
# leave one's patch in place for good. So one trace at a time, and its patches act on its own thread only.
_TRACE_LOCK = threading.Lock()


class _OwnThreadTracer(fx.Tracer):
    """fx's tracer, except that module calls and attribute reads from other threads run as usual."""

    def trace(self, root, concrete_args=None):  # type: ignore[no-untyped-def]
        self._thread = threading.get_ident()
        return super().trace(root, concrete_args)

    def call_module(self, m, forward, args, kwargs):  # type: ignore[no-untyped-def]
        if threading.get_ident() != self._thread:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def is_leaf_module(self, m, module_qualified_name):  # type: ignore[no-untyped-def]
        # the lab's own Activation is one operation, as torch's nn modules are
        return isinstance(m, Activation | Normalization) or super().is_leaf_module(m, module_qualified_name)

    def getattr(self, attr, attr_val, parameter_proxy_cache):  # type: ignore[no-untyped-def]
        if threading.get_ident() != self._thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def _symbolic_trace(model: nn.Module) -> fx.GraphModule:
    """fx.symbolic_trace, safe beside other threads (see _TRACE_LOCK)."""
    with _TRACE_LOCK:
        tracer = _OwnThreadTracer()
        graph = tracer.trace(model)
        return fx.GraphModule(tracer.root, graph, model.__class__.__name__)


def model_graph(model: nn.Module, input_shape: tuple[int, ...] = INPUT_SHAPE) -> ModelGraph:
    """The model graph of `model` (which is never modified): checked, BatchNorm folded, shapes known.
    Anything unsupported raises GraphError with one line naming the operation and where it is."""
    if isinstance(model, ModelGraphModule):
        return model.graph_
    try:
        traced = _symbolic_trace(model.eval())
    except (torch.fx.proxy.TraceError, TypeError, NotImplementedError, RuntimeError) as error:
        raise GraphError(f"the model cannot be traced into a graph: {str(error).splitlines()[0][:200]}") from None
    nodes = list(traced.graph.nodes)
    if len(nodes) > MAX_NODES:
        raise GraphError(f"the model has {len(nodes)} operations; at most {MAX_NODES} are supported")
    placeholders = [node for node in nodes if node.op == "placeholder"]
    if len(placeholders) != 1:
        raise GraphError(f"the model must take one input tensor (it takes {len(placeholders)})")
    try:
        with torch.no_grad():
            ShapeProp(traced).propagate(torch.zeros(2, *input_shape))
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        raise GraphError(
            f"the model does not run on {list(input_shape)} images: {str(error).splitlines()[0][:200]}"
        ) from None
    builder = _Builder(traced)
    output_name = ""
    for node in nodes:
        if node.op == "placeholder":
            builder.emit(node, OpKind.INPUT, (), name="input")
        elif node.op == "call_module":
            builder.module_node(node)
        elif node.op == "call_function":
            builder.function_node(node)
        elif node.op == "call_method":
            builder.method_node(node)
        elif node.op == "output":
            result = node.args[0]
            if not isinstance(result, fx.Node):
                raise GraphError("the model must return one tensor of class scores")
            output_name = builder.source(result, node)
        else:  # get_attr: a tensor stored on the module and used directly
            raise _refuse(node, f"{node.op} {node.target}")
    graph = ModelGraph(tuple(builder.ops), output_name, builder.parameters, dict(builder.folded), input_shape)
    graph.check()
    return graph


class ModelGraphModule(nn.Module):
    """A model graph as an nn.Module: its float forward pass (folded weights), for evaluate() and
    everything else that takes a model. The graph's tensors are its parameters."""

    def __init__(self, graph: ModelGraph) -> None:
        super().__init__()
        self.graph_ = graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from qcore.graph.run import run_float

        return run_float(self.graph_, x)
