"""BatchNorm folding made visible: one channel's weights and bias before and after, and the spread of
per-channel weight ranges folding creates (why per-tensor quantization of folded layers fails)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qcore.graph.ops import GraphError
from qcore.graph.trace import model_graph


@dataclass(frozen=True)
class FoldReport:
    layer: str
    batchnorm: str
    channel: int
    factor: float  # gamma / sqrt(running_var + eps) of the channel: what its weights are multiplied by
    weights_before: list[float]  # the channel's conv weights, flattened
    weights_after: list[float]
    bias_before: float
    bias_after: float  # (b - mean) * factor + beta
    ranges_before: list[float]  # max |w| per output channel
    ranges_after: list[float]

    @property
    def spread_before(self) -> float:
        """Largest over smallest per-channel weight range (inf when a channel is all zero)."""
        return _spread(self.ranges_before)

    @property
    def spread_after(self) -> float:
        return _spread(self.ranges_after)

    def to_dict(self) -> dict[str, object]:
        return {**self.__dict__, "spread_before": self.spread_before, "spread_after": self.spread_after}


def _spread(ranges: list[float]) -> float:
    smallest = min(ranges)
    return float("inf") if smallest == 0 else max(ranges) / smallest


def folded_layers(model: nn.Module) -> dict[str, str]:
    """conv -> the BatchNorm folded into it."""
    return dict(model_graph(model).folded_batchnorm)


def batchnorm_folding(model: nn.Module, layer: str, channel: int) -> FoldReport:
    """What folding did to `layer` (a conv with a BatchNorm after it) and its output `channel`."""
    graph = model_graph(model)
    if layer not in graph.folded_batchnorm:
        folded = ", ".join(graph.folded_batchnorm) or "none in this model"
        raise GraphError(f"no BatchNorm is folded into {layer!r} (folded: {folded})")
    modules = dict(model.named_modules())
    conv, bn = modules[layer], modules[graph.folded_batchnorm[layer]]
    assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
    weight = conv.weight.detach()
    if not 0 <= channel < weight.shape[0]:
        raise GraphError(f"channel must be between 0 and {weight.shape[0] - 1} (got {channel})")
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros(weight.shape[0])
    folded_weight, folded_bias = graph.weight(layer), graph.bias(layer)
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones(weight.shape[0])
    assert bn.running_var is not None
    factor = gamma / torch.sqrt(bn.running_var.detach() + bn.eps)
    return FoldReport(
        layer=layer,
        batchnorm=graph.folded_batchnorm[layer],
        channel=channel,
        factor=float(factor[channel]),
        weights_before=weight[channel].flatten().tolist(),
        weights_after=folded_weight[channel].flatten().tolist(),
        bias_before=float(bias[channel]),
        bias_after=float(folded_bias[channel]),
        ranges_before=weight.flatten(1).abs().max(dim=1).values.tolist(),
        ranges_after=folded_weight.flatten(1).abs().max(dim=1).values.tolist(),
    )
