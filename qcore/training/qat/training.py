"""The training loop: PTQ calibration as the start, fine-tuning with the held-out curve and weight
snapshots, the control run without quantizers, and the scales kept deployable."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from qcore import cancel
from qcore.analysis.tables import quantize_for
from qcore.data import TRAIN_SIZE, Dataset
from qcore.models.checkpoint import fingerprint
from qcore.models.net import Net
from qcore.quantize.config import QuantConfig
from qcore.quantize.qmodel import QuantizedNet
from qcore.training.qat.config import (
    BIAS_HEADROOM_BITS,
    CHANNEL_STEP_SPAN_BITS,
    HELD_OUT,
    HISTOGRAM_BINS,
    MIN_SCALE,
    QatConfig,
)
from qcore.training.qat.network import QatNet, _channel_view, _key, to_quantized_net
from qcore.training.train import resolve_device


@dataclass(frozen=True)
class QatProgress:
    """One optimizer step's report, for a live curve."""

    epoch: int  # 1-based
    epochs: int
    step: int  # 1-based within the epoch
    steps_per_epoch: int
    loss: float  # this step's quantized training loss
    held_out_accuracy: float | None  # quantized accuracy on the held-out slice, when measured at this step

    @property
    def fraction_done(self) -> float:
        return ((self.epoch - 1) * self.steps_per_epoch + self.step) / (self.epochs * self.steps_per_epoch)


@dataclass
class QatResult:
    qnet: QuantizedNet  # the deployed model (integer weights at the trained scales)
    model: nn.Module  # its float (latent) weights: a Net for the bundled architecture
    config: QatConfig
    cancelled: bool
    started_from: str  # fingerprint of the float model QAT started from
    seconds_per_epoch: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # one per step
    held_out: list[dict[str, float]] = field(default_factory=list)  # {"step", "epoch", "accuracy"}
    snapshots: list[dict[str, object]] = field(default_factory=list)  # weight histograms, per epoch
    ptq: QuantizedNet | None = None  # the PTQ-calibrated model it started from

    def meta(self) -> dict[str, object]:
        return {
            "qat_config": asdict(self.config),
            "cancelled": self.cancelled,
            "started_from": self.started_from,
            "seconds_per_epoch": self.seconds_per_epoch,
            "held_out": self.held_out,
            "snapshots": self.snapshots,
        }


def weight_snapshot(net: QatNet, epoch: int) -> dict[str, object]:
    """Each layer's weights in units of its channel's step (w / s_w), as a histogram: at low bits QAT
    gathers them on the integer levels."""
    layers = {}
    for name in net.graph.layers:
        qmin, qmax = net.weight_range[name]
        weight = net.weights[_key(name)].detach().cpu()
        steps = weight / _channel_view(net.weight_scales[_key(name)].detach().cpu(), weight.ndim)
        low, high = qmin - 1.5, qmax + 1.5
        counts = torch.histc(steps.clamp(low, high), bins=HISTOGRAM_BINS, min=low, max=high)
        layers[name] = {"low": low, "high": high, "counts": [int(c) for c in counts]}
    return {"epoch": epoch, "layers": layers}


def _held_out_accuracy(net: QatNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    was_training = net.training
    net.eval()
    with torch.no_grad():
        correct = sum(
            int((net(images[i : i + 1000]).argmax(1) == labels[i : i + 1000]).sum())
            for i in range(0, len(images), 1000)
        )
    net.train(was_training)
    return correct / len(images)


def qat(
    model: nn.Module,
    data: Dataset,
    config: QatConfig = QatConfig(),
    on_progress: Callable[[QatProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> QatResult:
    """Fine-tune `model` (never modified) with the quantizer in the loop. The grid starts from PTQ
    calibration of `model` at `config`'s bits; training uses every training image but the last
    HELD_OUT (or the first `train_samples`), shuffled by `seed`. `should_stop` is polled between steps."""
    return _fine_tune(model, data, config, True, on_progress, should_stop)


def qat_control(
    model: nn.Module,
    data: Dataset,
    config: QatConfig = QatConfig(),
    on_progress: Callable[[QatProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> QatResult:
    """The control for `qat(model, data, config)`: the same start (BatchNorm folded), optimizer,
    schedule, epochs, images and order, with no quantizer, so that QAT's drop can be measured against
    what the extra training alone does. The result's `model` is the fine-tuned float model."""
    return _fine_tune(model, data, config, False, on_progress, should_stop)


def _fine_tune(
    model: nn.Module,
    data: Dataset,
    config: QatConfig,
    quantize: bool,
    on_progress: Callable[[QatProgress], None] | None,
    should_stop: Callable[[], bool] | None,
) -> QatResult:
    config.validate()
    device = resolve_device(config.device)
    quant_config = config.quant_config()
    start = quantize_for(model, data, quant_config)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # nothing in the step is random, but cuda kernels may pick by seed
    net = QatNet(start, config.method, model, quantize).to(device)
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config.lr)
    count = TRAIN_SIZE - HELD_OUT if config.train_samples is None else config.train_samples
    count = min(count, len(data.train) - min(HELD_OUT, len(data.train) // 2))
    images = data.train.images[:count].to(device).contiguous(memory_format=torch.channels_last)
    labels = data.train.labels[:count].to(device)
    held_images = data.train.images[-HELD_OUT:].to(device)
    held_labels = data.train.labels[-HELD_OUT:].to(device)
    steps_per_epoch = (count + config.batch_size - 1) // config.batch_size
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
    result = QatResult(start, model, config, False, fingerprint(model), ptq=start)
    result.snapshots.append(weight_snapshot(net, 0))
    result.held_out.append({"step": 0, "epoch": 0, "accuracy": _held_out_accuracy(net, held_images, held_labels)})
    net.train()
    for epoch in range(1, config.epochs + 1):
        order = torch.randperm(count, generator=generator).to(device)
        began = time.perf_counter()
        for step in range(1, steps_per_epoch + 1):
            cancel.checkpoint()  # per step: abandoned work stops here
            if should_stop is not None and should_stop():
                result.cancelled = True
                return _finish(net, result, quant_config)
            batch = order[(step - 1) * config.batch_size : step * config.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = F.nll_loss(net(images[batch]), labels[batch])
            loss.backward()
            optimizer.step()
            schedule.step()
            if quantize:
                with torch.no_grad():
                    _keep_scales_deployable(net)
            result.losses.append(loss.item())
            accuracy = None
            if step % config.eval_every == 0 or step == steps_per_epoch:
                accuracy = _held_out_accuracy(net, held_images, held_labels)
                global_step = (epoch - 1) * steps_per_epoch + step
                result.held_out.append({"step": global_step, "epoch": epoch, "accuracy": accuracy})
            if on_progress is not None:
                on_progress(QatProgress(epoch, config.epochs, step, steps_per_epoch, result.losses[-1], accuracy))
        result.seconds_per_epoch.append(time.perf_counter() - began)
        result.snapshots.append(weight_snapshot(net, epoch))
    return _finish(net, result, quant_config)


def _keep_scales_deployable(net: QatNet) -> None:
    """Step sizes stay positive, and a weight step never shrinks so far that the channel's bias, as an
    integer at s_in * s_w, exceeds 2^BIAS_HEADROOM_BITS, nor below 2^-CHANNEL_STEP_SPAN_BITS of its
    layer's largest step: LSQ drives the step of a channel whose weights are near zero towards zero,
    and its int32 bias (and accumulator) would overflow, and its requantization multiplier (or the
    logits' ratio to the finest channel) would leave the fixed-point range (seen: fc1's 1.05e-10 on the
    notebook's net at W2A2, batch 128, lr 2e-3)."""
    for scale in net.input_scales.values():
        scale.clamp_(min=MIN_SCALE)
    for name in net.graph.layers:
        input_scale = net.point_scale(net.layer_input_point(name))
        bias_floor = net.biases[_key(name)].detach().abs() / (input_scale * 2.0**BIAS_HEADROOM_BITS)
        weight_scale = net.weight_scales[_key(name)]
        span_floor = weight_scale.detach().max() * 2.0**-CHANNEL_STEP_SPAN_BITS
        weight_scale.copy_(torch.maximum(weight_scale, torch.maximum(bias_floor, span_floor).clamp(min=MIN_SCALE)))


def _finish(net: QatNet, result: QatResult, quant_config: QuantConfig) -> QatResult:
    net = net.cpu().eval()
    result.model = net.float_model()
    if isinstance(result.model, Net):  # the checkpoint's path, so a saved model loads back identical
        result.qnet = to_quantized_net(result.model, net.qparams(), quant_config)
    else:
        result.qnet = net.quantized_net(quant_config)
    return result
