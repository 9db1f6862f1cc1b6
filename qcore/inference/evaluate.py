"""Loss, accuracy, per-class accuracy and predictions of any model on a split."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qcore import cancel
from qcore.data import Split

EVAL_BATCH = 1000
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
def evaluate(model: nn.Module, split: Split, batch_size: int = EVAL_BATCH) -> EvalResult:
    """`model` must return log-probabilities, as Net and QuantizedNet do."""
    model.eval()
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
