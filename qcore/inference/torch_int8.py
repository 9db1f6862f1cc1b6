"""Cross-check against PyTorch's own int8 kernels: torch.ao.quantization eager mode on the x86
(fbgemm/oneDNN) engine, calibrated on the same training batches as ours. Torch picks its own
ranges (histogram observer, 7-bit reduced-range activations, per-channel symmetric int8 weights)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qcore.models.net import Net

TORCH_ENGINE = "x86"


class _EagerNet(nn.Module):
    """Net rewritten with module ReLUs/pools and quant stubs, the form eager mode needs."""

    def __init__(self, net: Net) -> None:
        from torch.ao.quantization import DeQuantStub, QuantStub

        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv1, self.conv2 = copy.deepcopy(net.conv1), copy.deepcopy(net.conv2)
        self.fc1, self.fc2 = copy.deepcopy(net.fc1), copy.deepcopy(net.fc2)
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.pool = nn.MaxPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        x = self.pool(self.relu1(self.conv1(x)))
        x = self.pool(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(x.flatten(1)))
        return F.log_softmax(self.dequant(self.fc2(x)), dim=1)


def torch_int8_model(model: Net, batches: Sequence[torch.Tensor]) -> nn.Module:
    """PyTorch's int8 version of `model`: fused conv/linear+ReLU, calibrated on `batches`."""
    import torch.ao.quantization as tq

    if TORCH_ENGINE not in torch.backends.quantized.supported_engines:
        raise RuntimeError(f"this PyTorch build has no {TORCH_ENGINE} quantized engine")
    torch.backends.quantized.engine = TORCH_ENGINE
    with warnings.catch_warnings():
        # torch.ao.quantization announces its own deprecation on every call; the API still works in
        # the pinned torch, and this module exists only to compare against it.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        eager = _EagerNet(model).eval()
        eager = tq.fuse_modules(eager, [["conv1", "relu1"], ["conv2", "relu2"], ["fc1", "relu3"]])
        eager.qconfig = tq.get_default_qconfig(TORCH_ENGINE)
        tq.prepare(eager, inplace=True)
        with torch.inference_mode():
            for images in batches:
                eager(images)
        tq.convert(eager, inplace=True)
    return eager
