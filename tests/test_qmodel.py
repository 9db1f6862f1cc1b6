"""The quantized twin against an independent fake-quant forward written here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qcore.models.net import LAYER_NAMES, Net
from qcore.quantize.config import QuantConfig
from qcore.quantize.qmodel import quantize_model


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture(scope="module")
def batches():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(16, 1, 28, 28, generator=generator) for _ in range(2)]


def ref_fake_quant(x, lo, hi, bits, symmetric, axis=None):
    """Independent per-tensor / per-channel fake quantization in float64 from docs/DESIGN.md's formulas."""
    x = x.double()
    lo = torch.clamp(torch.as_tensor(lo, dtype=torch.float64), max=0)
    hi = torch.clamp(torch.as_tensor(hi, dtype=torch.float64), min=0)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        qmin, scale, zero = -qmax, torch.maximum(-lo, hi) / qmax, torch.zeros_like(lo)
    else:
        qmin, qmax = 0, 2**bits - 1
        scale = (hi - lo) / qmax
        zero = torch.clamp(torch.round(-lo / scale), qmin, qmax)
    if axis is not None:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (torch.clamp(torch.round(x / scale) + zero, qmin, qmax) - zero) * scale, scale


def reference_forward(net, config, act_ranges, x):
    """Net's forward with docs/DESIGN.md's quantizer applied by hand at each layer (minmax weights);
    with config.edge_bits, conv1 and fc2 (weights and inputs) at those bits."""
    x = x.double()
    for name in LAYER_NAMES:
        edge = config.edge_bits and name in ("conv1", "fc2")
        act_bits, weight_bits = (config.edge_bits,) * 2 if edge else (config.act_bits, config.weight_bits)
        module = getattr(net, name)
        weight, bias = module.weight.detach().double(), module.bias.detach().double()
        if name == "fc1":
            x = x.flatten(1)
        lo, hi = act_ranges[name]
        x, s_in = ref_fake_quant(x, lo, hi, act_bits, symmetric=False)
        rows = weight.reshape(weight.shape[0], -1)
        weight, s_w = ref_fake_quant(
            weight, rows.min(1).values, rows.max(1).values, weight_bits, symmetric=True, axis=0
        )
        s_bias = s_in.flatten() * s_w.flatten()
        bias = torch.round(bias / s_bias) * s_bias  # int32 at s_in * s_w
        x = F.conv2d(x, weight, bias) if name.startswith("conv") else F.linear(x, weight, bias)
        if name != "fc2":
            x = F.relu(x)
        if name.startswith("conv"):
            x = F.max_pool2d(x, 2, 2)
    return F.log_softmax(x, dim=1)


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_matches_independent_reference(net, batches, bits):
    config = QuantConfig(weight_bits=bits, act_bits=bits, observer="minmax", weight_range="minmax")
    qnet = quantize_model(net, config, batches)
    act_ranges = {name: (q.activation.clip_min, q.activation.clip_max) for name, q in qnet.layers.items()}
    x = batches[0]
    with torch.no_grad():
        ours = qnet(x)
        reference = reference_forward(net, config, act_ranges, x).float()
    assert torch.equal(ours.argmax(1), reference.argmax(1))
    assert torch.allclose(ours, reference, atol=1e-3)


def test_edge_bits_put_the_first_and_last_layers_on_their_own_grid(net, batches):
    config = QuantConfig(weight_bits=3, act_bits=2, observer="minmax", weight_range="minmax", edge_bits=8)
    qnet = quantize_model(net, config, batches)
    act_ranges = {name: (q.activation.clip_min, q.activation.clip_max) for name, q in qnet.layers.items()}
    with torch.no_grad():
        ours = qnet(batches[0])
        reference = reference_forward(net, config, act_ranges, batches[0]).float()
    assert torch.equal(ours.argmax(1), reference.argmax(1))
    assert torch.allclose(ours, reference, atol=1e-3)
    bits = {name: (q.weight_bits, q.input_qparams.qmax) for name, q in qnet.layers.items()}
    assert bits == {"conv1": (8, 255), "conv2": (3, 3), "fc1": (3, 3), "fc2": (8, 255)}
    assert config.bits_label == "W3A2, first and last layers at 8"


def test_all_layers_float_is_the_float_model(net, batches):
    qnet = quantize_model(net, QuantConfig(float_layers=LAYER_NAMES), batches)
    with torch.no_grad():
        assert torch.equal(qnet(batches[0]), net(batches[0]))


def test_sixteen_bits_is_close_to_float(net, batches):
    qnet = quantize_model(net, QuantConfig(weight_bits=16, act_bits=16, observer="minmax"), batches)
    with torch.no_grad():
        assert torch.allclose(qnet(batches[0]).exp(), net(batches[0]).exp(), atol=1e-3)


def test_bias_is_int32_at_input_times_weight_scale(net, batches):
    qnet = quantize_model(net, QuantConfig(), batches)
    for name, quant in qnet.layers.items():
        scale = quant.input_qparams.scale.double() * quant.weight_qparams.scale.double()
        assert quant.bias_int.tolist() == torch.round(quant.bias.double() / scale).long().tolist(), name


def test_float_input_leaves_conv1_input_unquantized(net, batches):
    qnet = quantize_model(net, QuantConfig(quantize_input=False), batches)
    assert qnet.layers["conv1"].input_qparams is None and qnet.layers["conv1"].bias_int is None
    assert qnet.layers["conv1"].weight_qparams is not None
    assert qnet.layers["conv2"].input_qparams is not None


def test_input_sqnrs_as_the_inputs_come_are_those_of_the_captured_inputs(net, batches):
    """The report's activation SQNRs, measured as each layer's input is produced (none held), equal
    torch's own layers' inputs (forward pre-hooks) against those inputs fake-quantized on the grid."""
    from qcore.analysis.tables import input_sqnrs
    from qcore.quantize.quant import fake_quantize, sqnr_db

    qnet = quantize_model(net, QuantConfig(weight_bits=4, act_bits=4, float_layers=("fc2",)), batches)
    images = torch.cat(batches)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        getattr(net, name).register_forward_pre_hook(lambda module, args, name=name: inputs.__setitem__(name, args[0]))
        for name in LAYER_NAMES
    ]
    with torch.no_grad():
        net(images)
    for hook in hooks:
        hook.remove()
    expected = {
        name: sqnr_db(inputs[name], fake_quantize(inputs[name], qnet.layers[name].input_qparams))
        for name in LAYER_NAMES
        if qnet.layers[name].input_qparams is not None
    }
    measured = input_sqnrs(qnet, net, images)
    assert measured.keys() == expected.keys() and "fc2" not in measured
    for name, value in expected.items():
        assert measured[name] == pytest.approx(value, rel=1e-9), name
