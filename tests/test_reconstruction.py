"""Block reconstruction (BRECQ with QDrop): the blocks it finds are the model's own, the blocks' walk
composes to the float model, and on a small residual net at W2A4 it reconstructs each block's float
output better than nearest rounding and than AdaRound layer by layer (measured here on the calibration
images, not assumed), reproducibly, and the integer engine runs its result to the same predictions."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from qcore.data import calibration_batches
from qcore.graph import GraphRun, model_graph
from qcore.graph.blocks import cuts, reconstruction_blocks
from qcore.inference.integer import IntegerNet
from qcore.models.checkpoint import load_model
from qcore.quantize.config import QuantConfig
from qcore.quantize.qmodel import quantize_model
from qcore.quantize.reconstruction import ReconstructionSettings, block_errors, reconstruct_blocks

# with the activations' scales learned as well (off by default), so that path is checked end to end
QUICK = ReconstructionSettings(iterations=300, learn_activation_scales=True)


class SmallResidual(nn.Module):
    """A stem, one residual block and a classifier: the shape of the zoo's ResNet, small enough to learn in seconds."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 8, 3, 4, 1)
        self.conv1 = nn.Conv2d(8, 8, 3, 1, 1)
        self.conv2 = nn.Conv2d(8, 8, 3, 1, 1)
        self.fc = nn.Linear(8 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def small(mnist):
    model = SmallResidual().eval()
    images = torch.cat(calibration_batches(mnist.train, 2, 64, 0))
    config = QuantConfig(weight_bits=2, act_bits=4)
    return model, images, config


def test_blocks_are_the_models_own(mnist):
    """On the zoo's ResNet the blocks are its residual blocks (the modules' own grouping), on the notebook's
    net two pairs; every layer is in one block, and each block starts where nothing before is read again."""
    resnet = model_graph(load_model(None, "fashion-resnet"))
    blocks = reconstruction_blocks(resnet)
    assert [b.name for b in blocks] == ["stem", "layer1", "layer2", "layer3", "fc"]
    modules = {name.split(".")[0] for name in resnet.layers}
    for block in blocks:
        assert {layer.split(".")[0] for layer in block.layers} <= modules
        assert len({layer.split(".")[0] for layer in block.layers}) == 1
    assert [b.kind for b in blocks] == ["layer", "residual", "residual", "residual", "layer"]
    assert sorted(layer for b in blocks for layer in b.layers) == sorted(resnet.layers)
    starts = {resnet.ops[i].name for i in cuts(resnet)}
    assert all(block.start in starts for block in blocks)
    net = model_graph(load_model())
    assert [b.layers for b in reconstruction_blocks(net)] == [("conv1", "conv2"), ("fc1", "fc2")]


def test_the_blocks_walk_composes_to_the_float_model(mnist):
    """Running the blocks one after another gives torch's own output for the zoo's ResNet."""
    model = load_model(None, "fashion-resnet").eval()
    graph = model_graph(model)
    images = mnist.test.images[:16]
    run, x = GraphRun(graph), images
    with torch.no_grad():
        for block in reconstruction_blocks(graph):
            x = run.run_between(block.start, x, block.end)
        assert torch.allclose(torch.log_softmax(x, dim=1), model(images), atol=1e-4)  # the blocks end before it


@pytest.mark.slow
def test_reconstruction_beats_nearest_and_adaround_on_every_block(small):
    model, images, config = small
    nearest = block_errors(quantize_model(model, config, [images]), images)
    adaround = block_errors(quantize_model(model, config.with_changes(methods=("adaround",)), [images]), images)
    qnet = quantize_model(model, config, [images])
    learned = reconstruct_blocks(qnet, images, QUICK)
    layers = {name: replace(quant) for name, quant in qnet.layers.items()}
    for name, weights in learned.weights.items():
        assert not torch.equal(weights, qnet.layers[name].weight_int)  # learned, and qnet left as it was
        layers[name].weight_int = weights
    reconstructed = block_errors(qnet.with_layers(layers).with_point_scales(learned.scales), images)
    assert list(reconstructed) == ["stem", "conv1+conv2", "fc"]
    assert learned.report["conv1+conv2"]["kind"] == "residual"
    for name in nearest:
        assert reconstructed[name] < nearest[name], name
    assert reconstructed["conv1+conv2"] < adaround["conv1+conv2"]


@pytest.mark.slow
def test_reconstruction_is_reproducible_and_the_engine_runs_it(small, mnist, monkeypatch):
    model, images, config = small
    qnet = quantize_model(model, config.with_changes(act_bits=8), [images])
    first = reconstruct_blocks(qnet, images, QUICK, seed=3)
    again = reconstruct_blocks(qnet, images, QUICK, seed=3)
    assert all(torch.equal(first.weights[n], again.weights[n]) for n in first.weights)
    assert first.scales and all(torch.equal(first.scales[p], again.scales[p]) for p in first.scales)
    layers = {name: replace(quant) for name, quant in qnet.layers.items()}
    for name, weights in first.weights.items():
        layers[name].weight_int = weights
    learned = qnet.with_layers(layers).with_point_scales(first.scales)
    test = mnist.test.images[:2000]
    with torch.no_grad():
        simulated = learned(test).argmax(dim=1)
    assert torch.equal(IntegerNet(learned).predict(test), simulated)

    # through the config, as the sidebar and --methods ask for it (fewer steps here, to keep the test short)
    def quick(qnet, images, seed):
        return reconstruct_blocks(qnet, images, ReconstructionSettings(iterations=100), seed)

    monkeypatch.setattr("qcore.quantize.qmodel.reconstruct_blocks", quick)
    piped = quantize_model(model, config.with_changes(methods=("block-reconstruction",)), [images])
    rows = piped.methods.blocks.values()
    assert [row["kind"] for row in rows] == ["layer", "residual", "layer"]
    assert all(row["objective_reconstructed"] <= row["objective_nearest"] for row in rows)
    assert "block-reconstruction" in piped.methods.seconds


def test_bad_settings_are_refused_in_one_line():
    problems = QuantConfig(methods=("adaround", "block-reconstruction")).problems()
    assert problems == ["methods: adaround and block-reconstruction both learn the rounding: choose one"]
    with pytest.raises(ValueError, match="^block reconstruction: iterations must be between") as raised:
        reconstruct_blocks(None, torch.zeros(1), ReconstructionSettings(iterations=0))  # type: ignore[arg-type]
    assert "\n" not in str(raised.value)
