"""The model zoo: every architecture the lab ships, the dataset it was trained on, its bundled
checkpoint and the recipe that reproduces it.

The notebook's net stays the default (on MNIST, unchanged). The others are where quantization visibly
matters: a residual network with BatchNorm and a depthwise-separable (MobileNet-style) network with
BatchNorm and ReLU6, both on Fashion-MNIST, and the notebook's net on Fashion-MNIST so one network can
be compared across datasets. Each bundled checkpoint is a plain state_dict this project trained with
`python -m qcore train --model NAME --out FILE` (the recipe below; see docs/models.md for each command).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qcore.files import shorten
from qcore.models.net import Net

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
DEFAULT_MODEL = "mnist-net"


class UnknownModelError(ValueError):
    """A model name that is not in the zoo; one line listing the names."""


class ResidualBlock(nn.Module):
    """conv-BN-ReLU, conv-BN, plus the shortcut (identity, or a strided 1x1 conv-BN when the shape
    changes), then ReLU: the basic block of He et al. 2016."""

    def __init__(self, channels_in: int, channels_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride, bias=False), nn.BatchNorm2d(channels_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small residual network: a 3x3 stem, three stages (16, 32, 64 channels at 28, 14, 7 pixels)
    with identity and strided shortcuts, global average pooling, one linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.layer1 = ResidualBlock(16, 16)
        self.layer2 = ResidualBlock(16, 32, stride=2)
        self.layer3 = ResidualBlock(32, 64, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return F.log_softmax(self.fc(self.pool(x).flatten(1)), dim=1)


class SeparableBlock(nn.Module):
    """MobileNet's depthwise-separable block: 3x3 depthwise conv-BN-ReLU6, then 1x1 pointwise conv-BN-ReLU6."""

    def __init__(self, channels_in: int, channels_out: int, stride: int = 1) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels_in, channels_in, 3, stride, 1, groups=channels_in, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_in)
        self.pointwise = nn.Conv2d(channels_in, channels_out, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn1(self.depthwise(x)))
        return F.relu6(self.bn2(self.pointwise(x)))


class DepthwiseNet(nn.Module):
    """A MobileNet-style network: a 3x3 stem, four depthwise-separable blocks (16 to 128 channels,
    two of them strided), global average pooling, one linear layer; BatchNorm and ReLU6 throughout."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.blocks = nn.Sequential(
            SeparableBlock(16, 32),
            SeparableBlock(32, 64, stride=2),
            SeparableBlock(64, 128, stride=2),
            SeparableBlock(128, 128),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn(self.stem(x)))
        x = self.blocks(x)
        return F.log_softmax(self.fc(self.pool(x).flatten(1)), dim=1)


# The zoo's recipe for the BatchNorm networks: SGD with Nesterov momentum and weight decay under a
# one-cycle schedule, the usual recipe for small residual networks, sized to train in minutes on 2 cores.
_BATCHNORM_RECIPE: Mapping[str, object] = {
    "epochs": 6,
    "batch_size": 128,
    "lr": 0.1,
    "momentum": 0.9,
    "optimizer": "sgd-nesterov",
    "weight_decay": 5e-4,
    "schedule": "one-cycle",
    "seed": 1,
}


@dataclass(frozen=True)
class ZooModel:
    """One model of the zoo: its architecture, dataset, bundled checkpoint and training recipe."""

    name: str
    title: str
    dataset: str
    build: Callable[[], nn.Module]
    checkpoint_file: str
    float_accuracy: float  # of the bundled checkpoint on the dataset's 10,000 test images (tests check it)
    description: str
    recipe: Mapping[str, object] = field(default_factory=dict)  # TrainConfig fields beyond the notebook's

    @property
    def checkpoint(self) -> Path:
        return PRETRAINED_DIR / self.checkpoint_file

    @property
    def is_notebook_net(self) -> bool:
        return self.build is Net


ZOO: dict[str, ZooModel] = {
    model.name: model
    for model in (
        ZooModel(
            "mnist-net",
            "Notebook net (MNIST)",
            "mnist",
            Net,
            "mnist_net.pt",
            0.9832,
            "the original notebook's CNN: conv, pool, conv, pool, two linear layers",
        ),
        ZooModel(
            "fashion-net",
            "Notebook net (Fashion-MNIST)",
            "fashion-mnist",
            Net,
            "fashion_net.pt",
            0.8595,
            "the notebook's CNN trained by the notebook's recipe on Fashion-MNIST",
        ),
        ZooModel(
            "fashion-resnet",
            "Residual BN net (Fashion-MNIST)",
            "fashion-mnist",
            ResNet,
            "fashion_resnet.pt",
            0.9222,
            "three residual stages of conv-BN-ReLU with identity and strided shortcuts, global average pooling",
            _BATCHNORM_RECIPE,
        ),
        ZooModel(
            "fashion-mobilenet",
            "Depthwise BN net (Fashion-MNIST)",
            "fashion-mnist",
            DepthwiseNet,
            "fashion_mobilenet.pt",
            0.9191,
            "MobileNet-style depthwise-separable blocks with BatchNorm and ReLU6, global average pooling",
            _BATCHNORM_RECIPE,
        ),
    )
}


def zoo_model(name: str) -> ZooModel:
    """The zoo model called `name`, or a one-line error listing the names."""
    if name not in ZOO:
        raise UnknownModelError(f"unknown model {shorten(name)!r}; models are {', '.join(ZOO)}")
    return ZOO[name]
