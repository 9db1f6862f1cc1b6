"""Training with the notebook's recipe by default, on in-memory tensors (no per-sample transforms)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from qcore import cancel
from qcore.data import MAX_SEED, TRAIN_SIZE, Split
from qcore.models.net import Net

OPTIMIZERS = ("sgd", "sgd-nesterov")
SCHEDULES = ("constant", "one-cycle")

# The Model page's bounds, shared by the CLI: a shared server's training runs are bounded, and a
# flag may not ask for more work than a click could (issue 16: an unbounded batch took 8 GB).
MAX_EPOCHS = 20
MAX_TRAIN_BATCH = 4096


@dataclass(frozen=True)
class TrainConfig:
    """The notebook's recipe by default: SGD lr 0.01, momentum 0.5, batch 64, 3 epochs, seed 1. The
    zoo's BatchNorm networks add Nesterov momentum, weight decay and a one-cycle schedule (lr is
    then the peak)."""

    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.5
    seed: int = 1
    train_samples: int | None = None  # None: the whole training split
    device: str = "auto"  # "auto": cuda when present, else cpu
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    schedule: str = "constant"

    def validate(self) -> None:
        problems = []
        if not 1 <= self.epochs <= MAX_EPOCHS:
            problems.append(f"epochs must be between 1 and {MAX_EPOCHS} (got {self.epochs})")
        if not 1 <= self.batch_size <= MAX_TRAIN_BATCH:
            problems.append(f"batch size must be between 1 and {MAX_TRAIN_BATCH} (got {self.batch_size})")
        if not (math.isfinite(self.lr) and 0 < self.lr <= 10):
            problems.append(f"learning rate must be > 0 and at most 10 (got {self.lr})")
        if not 0 <= self.momentum < 1:
            problems.append(f"momentum must be in [0, 1) (got {self.momentum})")
        if not 0 <= self.seed <= MAX_SEED:
            problems.append(f"seed must be between 0 and {MAX_SEED} (got {self.seed})")
        if self.train_samples is not None and not 1 <= self.train_samples <= TRAIN_SIZE:
            problems.append(f"train samples must be between 1 and {TRAIN_SIZE} (got {self.train_samples})")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)} (got {self.optimizer!r})")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)} (got {self.schedule!r})")
        if not (math.isfinite(self.weight_decay) and 0 <= self.weight_decay <= 1):
            problems.append(f"weight decay must be in [0, 1] (got {self.weight_decay})")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"device must be auto, cpu or cuda (got {self.device!r})")
        if self.device == "cuda" and not torch.cuda.is_available():
            problems.append("device cuda was asked for but no CUDA device is available")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class TrainProgress:
    """One optimizer step's report, for a live curve."""

    epoch: int  # 1-based
    epochs: int
    step: int  # 1-based within the epoch
    steps_per_epoch: int
    loss: float  # this step's mean loss
    running_accuracy: float  # fraction correct so far in this epoch

    @property
    def fraction_done(self) -> float:
        return ((self.epoch - 1) * self.steps_per_epoch + self.step) / (self.epochs * self.steps_per_epoch)


@dataclass
class TrainResult:
    model: nn.Module
    config: TrainConfig
    cancelled: bool
    history: list[dict[str, float]] = field(default_factory=list)  # one row per step


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seeded_start(
    seed: int, count: int, epochs: int, build: Callable[[], nn.Module] = Net
) -> tuple[nn.Module, list[torch.Tensor]]:
    """The initial Net and every epoch's sample order, drawn exactly as the notebook's script draws
    them: torch.manual_seed(seed), Net(), then per epoch DataLoader(shuffle=True)'s two draws from
    the global generator (the iterator's base seed, then RandomSampler's seed for randperm). So a
    run here sees the same batches as the notebook's DataLoader loop. The global generator state is
    restored afterwards. `build` makes the architecture (the notebook's Net by default)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
        orders = []
        for _ in range(epochs):
            torch.empty((), dtype=torch.int64).random_()  # DataLoader iterator's base seed
            sampler_seed = int(torch.empty((), dtype=torch.int64).random_().item())
            orders.append(torch.randperm(count, generator=torch.Generator().manual_seed(sampler_seed)))
    return model, orders


def train(
    train_split: Split,
    config: TrainConfig = TrainConfig(),
    on_progress: Callable[[TrainProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    build: Callable[[], nn.Module] = Net,
) -> TrainResult:
    """Train a fresh model of `build`'s architecture (the notebook's Net by default). `should_stop` is
    polled between steps; when it returns True training
    ends early and the result says `cancelled` (the caller decides whether to keep the model)."""
    config.validate()
    device = resolve_device(config.device)
    data = train_split if config.train_samples is None else train_split.subset(config.train_samples)
    count = len(data)
    model, orders = seeded_start(config.seed, count, config.epochs, build)
    # channels_last: the CPU (oneDNN) convolution and pooling kernels run about 30% faster in it
    # than in the default NCHW layout, for the same arithmetic up to float summation order.
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.optimizer == "sgd-nesterov",
        weight_decay=config.weight_decay,
    )
    images = data.images.to(device).contiguous(memory_format=torch.channels_last)
    labels = data.labels.to(device)
    steps_per_epoch = (count + config.batch_size - 1) // config.batch_size
    schedule = None
    if config.schedule == "one-cycle":
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch
        )
    history: list[dict[str, float]] = []
    model.train()
    for epoch in range(1, config.epochs + 1):
        order = orders[epoch - 1].to(device)
        correct = seen = 0
        for step in range(1, steps_per_epoch + 1):
            cancel.checkpoint()  # per step: abandoned work stops here
            if should_stop is not None and should_stop():
                return _finished(model, config, True, history)
            batch = order[(step - 1) * config.batch_size : step * config.batch_size]
            x, y = images[batch], labels[batch]
            optimizer.zero_grad(set_to_none=True)
            output = model(x)
            loss = F.nll_loss(output, y)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            correct += int((output.argmax(1) == y).sum())
            seen += len(y)
            report = TrainProgress(epoch, config.epochs, step, steps_per_epoch, loss.item(), correct / seen)
            history.append({"epoch": epoch, "step": step, "loss": report.loss, "accuracy": report.running_accuracy})
            if on_progress is not None:
                on_progress(report)
    return _finished(model, config, False, history)


def _finished(model: nn.Module, config: TrainConfig, cancelled: bool, history: list[dict[str, float]]) -> TrainResult:
    """Back to CPU, eval mode and the default memory layout, so checkpoints look like the notebook's."""
    model = model.cpu().to(memory_format=torch.contiguous_format).eval()
    return TrainResult(model, config, cancelled, history)
