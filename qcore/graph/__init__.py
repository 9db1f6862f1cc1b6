"""The model graph: a float network as the ordered operations every path walks (see ops.py)."""

from qcore.graph.diagram import Diagram, DiagramBox, graph_diagram
from qcore.graph.folding import FoldReport, batchnorm_folding
from qcore.graph.ops import LAYER_KINDS, PASSTHROUGH_KINDS, GraphError, ModelGraph, Op, OpKind
from qcore.graph.points import QuantPlan, quant_plan
from qcore.graph.run import BATCH_VALUES, DEFAULT_BATCH, GraphRun, batch_size_for, capture, run_float
from qcore.graph.trace import ModelGraphModule, model_graph

__all__ = [
    "Diagram",
    "DiagramBox",
    "FoldReport",
    "batchnorm_folding",
    "LAYER_KINDS",
    "PASSTHROUGH_KINDS",
    "GraphError",
    "GraphRun",
    "ModelGraph",
    "ModelGraphModule",
    "Op",
    "OpKind",
    "QuantPlan",
    "capture",
    "graph_diagram",
    "model_graph",
    "quant_plan",
    "run_float",
    "BATCH_VALUES",
    "DEFAULT_BATCH",
    "batch_size_for",
]
