"""Every zoo model's figures on its full test set, as the tests compare them after a change that must
not move a number: the float model, the simulation at W8A8, W6A6 and W4A4 (default config otherwise)
and the integer engine at W8A8 and W4A4; per figure the images correct, per class, and the SHA-256 of
the predictions (int64, test-set order).

    QCORE_DATA_DIR=../shared/data python bench/record_zoo_figures.py --out tests/reference/zoo_figures.json

tests/reference/zoo_figures.json was written by this script at commit 1280539, before evaluation
batches were sized to the model, max-pooling went to strided slices and the engine's products to
centred float kernels (tests/test_zoo.py checks every figure still holds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qcore.analysis.tables import quantize_for  # noqa: E402
from qcore.data import load_dataset  # noqa: E402
from qcore.inference.evaluate import evaluate  # noqa: E402
from qcore.inference.integer import IntegerNet  # noqa: E402
from qcore.models.checkpoint import load_model  # noqa: E402
from qcore.models.zoo import ZOO, zoo_model  # noqa: E402
from qcore.quantize.config import QuantConfig  # noqa: E402

SIMULATED_BITS = (8, 6, 4)
ENGINE_BITS = (8, 4)


def figures(predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, object]:
    correct = predictions == labels
    return {
        "correct": int(correct.sum()),
        "correct_per_class": [int(correct[labels == label].sum()) for label in range(10)],
        "predictions_sha256": hashlib.sha256(predictions.to(torch.int64).numpy().tobytes()).hexdigest(),
    }


def model_figures(name: str, predictions: dict[str, torch.Tensor] | None = None) -> dict[str, dict[str, object]]:
    """The figures of zoo model `name`; each run's predictions also go into `predictions` when given."""
    data = load_dataset(zoo_model(name).dataset, download=False)
    model = load_model(None, name)
    runs = {"float": evaluate(model, data.test).predictions}
    for bits in SIMULATED_BITS:
        qnet = quantize_for(model, data, QuantConfig(weight_bits=bits, act_bits=bits))
        runs[f"W{bits}A{bits}"] = evaluate(qnet, data.test).predictions
        if bits in ENGINE_BITS:
            runs[f"engine W{bits}A{bits}"] = IntegerNet(qnet).predict(data.test.images)
    if predictions is not None:
        predictions.update(runs)
    return {run: figures(predicted, data.test.labels) for run, predicted in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    Path(args.out).write_text(json.dumps({name: model_figures(name) for name in ZOO}, indent=1) + "\n")


if __name__ == "__main__":
    main()
