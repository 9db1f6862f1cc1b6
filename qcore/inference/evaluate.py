"""Loss, accuracy, per-class accuracy and predictions of any model on a split."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qcore import cancel
from qcore.data import Split
from qcore.graph import ModelGraph, batch_size_for

NUM_CLASSES = 10


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean negative log-likelihood
    accuracy: float  # fraction of 1
    per_class_accuracy: tuple[float, ...]  # index = digit
    predictions: torch.Tensor  # int64 [N]

    @property
    def count(self) -> int:
        return int(self.predictions.shape[0])

    def to_dict(self) -> dict[str, object]:
        return {"loss": self.loss, "accuracy": self.accuracy, "per_class_accuracy": list(self.per_class_accuracy)}


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, batch_size: int | None = None) -> EvalResult:
    """`model` must return log-probabilities, as Net and QuantizedNet do. Batches are sized to the
    model's graph when it carries one (batch_size_for)."""
    model.eval()
    if batch_size is None:
        graph = getattr(model, "graph", None) or getattr(model, "graph_", None)  # QuantizedNet's, ModelGraphModule's
        batch_size = batch_size_for(graph if isinstance(graph, ModelGraph) else None)
    total_loss = 0.0
    predictions = []
    for start in range(0, len(split), batch_size):
        cancel.checkpoint()  # per batch: abandoned work stops here
        output = model(split.images[start : start + batch_size])
        total_loss += float(F.nll_loss(output, split.labels[start : start + batch_size], reduction="sum"))
        predictions.append(output.argmax(dim=1))
    predicted = torch.cat(predictions)
    correct = predicted == split.labels
    per_class = tuple(
        float(correct[split.labels == digit].float().mean()) if bool((split.labels == digit).any()) else float("nan")
        for digit in range(NUM_CLASSES)
    )
    return EvalResult(total_loss / len(split), float(correct.float().mean()), per_class, predicted)


def flipped_indices(reference: EvalResult, other: EvalResult, labels: torch.Tensor) -> dict[str, list[int]]:
    """Indices whose prediction differs, split by whether quantization broke or fixed them."""
    differs = reference.predictions != other.predictions
    broke = differs & (reference.predictions == labels)
    fixed = differs & (other.predictions == labels)
    return {
        "broke": broke.nonzero().flatten().tolist(),
        "fixed": fixed.nonzero().flatten().tolist(),
        "other": (differs & ~broke & ~fixed).nonzero().flatten().tolist(),
    }


@dataclass(frozen=True)
class SliceEstimate:
    """Accuracy measured on the first `images` test images only: a first answer while the rest run,
    with its 95% interval (Wilson score: the binomial proportion's interval that stays inside [0, 1])."""

    accuracy: float
    low: float
    high: float
    images: int
    of: int  # the split's size: what the full answer will be measured on

    def describe(self) -> str:
        return (
            f"{100 * self.accuracy:.1f}% (95% interval {100 * self.low:.1f} to {100 * self.high:.1f}%), "
            f"measured on the first {self.images:,} of the {self.of:,} test images"
        )


def wilson_interval(correct: int, count: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion correct / count."""
    if count == 0:
        return 0.0, 1.0
    p = correct / count
    centre = (p + z * z / (2 * count)) / (1 + z * z / count)
    half = z * ((p * (1 - p) / count + z * z / (4 * count * count)) ** 0.5) / (1 + z * z / count)
    return max(0.0, centre - half), min(1.0, centre + half)


def slice_estimate(model: nn.Module, split: Split, images: int = 1000) -> SliceEstimate:
    """Accuracy on the first `images` of `split` and its 95% interval."""
    part = split.subset(images)
    correct = round(evaluate(model, part).accuracy * len(part))
    low, high = wilson_interval(correct, len(part))
    return SliceEstimate(correct / len(part), low, high, len(part), len(split))
