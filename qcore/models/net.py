"""The notebook's MNIST CNN, layer for layer, so its saved state_dicts load unchanged."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

# Layers in forward order; every per-layer table and loop in qcore follows this order.
LAYER_NAMES: tuple[str, ...] = ("conv1", "conv2", "fc1", "fc2")


class Net(nn.Module):
    """conv 1->20 k5, pool, conv 20->50 k5, pool, fc 800->500, fc 500->10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5, 1)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.fc1 = nn.Linear(4 * 4 * 50, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pool before ReLU: identical values (ReLU is monotone, so it commutes with max) on a
        # quarter of the elements
        x = F.relu(F.max_pool2d(self.conv1(x), 2, 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2, 2))
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        return F.log_softmax(self.fc2(x), dim=1)


def layer(model: Net, name: str) -> nn.Conv2d | nn.Linear:
    """The named quantizable layer of `model`."""
    if name not in LAYER_NAMES:
        raise KeyError(f"unknown layer {name!r}; layers are {', '.join(LAYER_NAMES)}")
    return getattr(model, name)


def capture_layers(model: nn.Module, images: torch.Tensor, what: Literal["input", "output"]) -> dict[str, torch.Tensor]:
    """Every layer's input, or its output before the activation, for `images` (the model graph's
    float walk; the model itself is never touched)."""
    from qcore.graph import capture, model_graph

    return capture(model_graph(model), images, what)
