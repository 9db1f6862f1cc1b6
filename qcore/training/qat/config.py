"""The settings of a QAT run (what is trained, at which bits, how long) and the limits every entry
point checks before any work starts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qcore.data import MAX_SEED, TRAIN_SIZE
from qcore.quantize.config import QuantConfig
from qcore.training.train import MAX_TRAIN_BATCH

QAT_METHODS = ("lsq", "ste")
EMA_CONSTANT = 0.01  # torch.ao's MovingAverageMinMaxObserver averaging constant
HELD_OUT = 2000  # the last training images, never trained on: the live curve's accuracy
HISTOGRAM_BINS = 61
MAX_QAT_EPOCHS = 5  # the Model page's QAT tab offers 1 to 5; the CLI the same
MIN_SCALE = 1e-12
# int32 bias values stay below 2^24, so that with 8-bit products (800 x 255 x 127 < 2^25) the
# accumulators of every layer fit int32 with room to spare
BIAS_HEADROOM_BITS = 24
# a channel's weight step stays within 2^12 of its layer's largest: a step that much finer makes the
# channel's levels negligible anyway, and keeps every multiplier inside TFLite's fixed-point range
CHANNEL_STEP_SPAN_BITS = 12


class QatError(ValueError):
    """A QAT setting out of range; the message lists each problem."""


@dataclass(frozen=True)
class QatConfig:
    """QAT settings. The defaults: LSQ, Adam at lr 1e-3 with a cosine decay, batch 256, 2 epochs."""

    weight_bits: int = 2
    act_bits: int = 2
    edge_bits: int = 0  # > 0: the first and last layers (weights and inputs) at this many bits (LSQ's 8)
    add_bits: int = 0  # > 0: the tensors that are no layer's input (residual adds' inputs) at this many bits
    epochs: int = 2
    method: str = "lsq"
    lr: float = 1e-3
    batch_size: int = 256
    seed: int = 0
    train_samples: int | None = None  # None: every training image but the held-out slice
    device: str = "auto"
    eval_every: int = 100  # steps between held-out evaluations (the live curve)

    def problems(self) -> list[str]:
        found = []
        for name in ("weight_bits", "act_bits"):
            value = getattr(self, name)
            if not 2 <= value <= 8:
                found.append(f"{name} must be between 2 and 8 for QAT (got {value})")
        for name in ("edge_bits", "add_bits"):
            value = getattr(self, name)
            if value != 0 and not 2 <= value <= 8:
                found.append(f"{name} must be 0 (off) or between 2 and 8 for QAT (got {value})")
        if not 1 <= self.epochs <= MAX_QAT_EPOCHS:
            found.append(f"epochs must be between 1 and {MAX_QAT_EPOCHS} (got {self.epochs})")
        if self.method not in QAT_METHODS:
            found.append(f"method must be one of {', '.join(QAT_METHODS)} (got {str(self.method)[:40]!r})")
        if not (math.isfinite(self.lr) and 0 < self.lr <= 1):
            found.append(f"learning rate must be > 0 and at most 1 (got {self.lr})")
        if not 1 <= self.batch_size <= MAX_TRAIN_BATCH:
            found.append(f"batch size must be between 1 and {MAX_TRAIN_BATCH} (got {self.batch_size})")
        if not 0 <= self.seed <= MAX_SEED:
            found.append(f"seed must be between 0 and {MAX_SEED} (got {self.seed})")
        if self.train_samples is not None and not 1 <= self.train_samples <= TRAIN_SIZE - HELD_OUT:
            found.append(f"train samples must be between 1 and {TRAIN_SIZE - HELD_OUT} (got {self.train_samples})")
        if self.device not in ("auto", "cpu", "cuda"):
            found.append(f"device must be auto, cpu or cuda (got {str(self.device)[:20]!r})")
        elif self.device == "cuda" and not torch.cuda.is_available():
            found.append("device cuda was asked for but no CUDA device is available")
        if not 1 <= self.eval_every <= 100_000:
            found.append(f"eval_every must be between 1 and 100000 (got {self.eval_every})")
        return found

    def validate(self) -> QatConfig:
        problems = self.problems()
        if problems:
            raise QatError("; ".join(problems))
        return self

    def quant_config(self) -> QuantConfig:
        """The PTQ config QAT starts from and the deployed model follows: the defaults at these bits."""
        return QuantConfig(
            weight_bits=self.weight_bits, act_bits=self.act_bits, edge_bits=self.edge_bits, add_bits=self.add_bits
        )
