"""Quantization-aware training against PTQ on the bundled net, and what a QAT epoch costs.

For each config: float accuracy, PTQ (the default QuantConfig at those bits, the grid QAT starts
from), QAT with LSQ and with the plain STE after --epochs epochs, and how often the integer engine
agrees with the simulation on the QAT model; all on the full 10k test set. Then one float training
epoch (qcore.training.train, the notebook's recipe) next to a QAT epoch, in the same run.

    QCORE_DATA_DIR=../shared/data python bench/bench_qat.py [--epochs 2] [--json-out FILE]

Goals (issue 11): after 2 epochs a drop of at most 0.3 points at W2A2, 0.05 at W4A4, 0.1 at W2A8;
integer agreement at least 99.5% at 2 to 8 bits; a QAT epoch at most 1.5x a float epoch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import emit  # noqa: E402

from qcore.analysis.tables import quantize_for  # noqa: E402
from qcore.data import load_mnist  # noqa: E402
from qcore.inference.evaluate import evaluate  # noqa: E402
from qcore.inference.integer import IntegerNet  # noqa: E402
from qcore.models.checkpoint import load_model  # noqa: E402
from qcore.training.qat import QatConfig, qat  # noqa: E402
from qcore.training.train import TrainConfig, train  # noqa: E402

CONFIGS = [(2, 2), (4, 4), (2, 8), (3, 3), (8, 8)]
GOALS = {(2, 2): 0.3, (4, 4): 0.05, (2, 8): 0.1}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--methods", default="lsq,ste")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    data, model = load_mnist(download=False), load_model()
    float_accuracy = evaluate(model, data.test).accuracy
    rows = []
    for weight_bits, act_bits in CONFIGS:
        config = QatConfig(weight_bits=weight_bits, act_bits=act_bits, epochs=args.epochs)
        ptq = evaluate(quantize_for(model, data, config.quant_config()), data.test).accuracy
        for method in args.methods.split(","):
            result = qat(model, data, QatConfig(**{**config.__dict__, "method": method}))
            simulated = evaluate(result.qnet, data.test)
            integer = IntegerNet(result.qnet).predict(data.test.images)
            rows.append(
                {
                    "config": f"W{weight_bits}A{act_bits}",
                    "method": method,
                    "ptq_accuracy": ptq,
                    "qat_accuracy": simulated.accuracy,
                    "drop_points": 100 * (float_accuracy - simulated.accuracy),
                    "goal_points": GOALS.get((weight_bits, act_bits)),
                    "integer_agreement": float((integer == simulated.predictions).float().mean()),
                    "seconds_per_epoch": result.seconds_per_epoch,
                }
            )
            print(rows[-1], file=sys.stderr)
    started = time.perf_counter()
    train(data.train, TrainConfig(epochs=1))
    float_epoch = time.perf_counter() - started
    qat_epochs = {
        method: min(row["seconds_per_epoch"]) for row in rows if row["config"] == "W2A2" for method in [row["method"]]
    }
    print(f"float accuracy {100 * float_accuracy:.2f}%; {args.epochs} QAT epochs per config")
    print(f"{'config':<7} {'method':<6} {'PTQ':>7} {'QAT':>7} {'drop':>6} {'goal':>5} {'int agree':>9}  s/epoch")
    for row in rows:
        goal = "" if row["goal_points"] is None else f"{row['goal_points']:.2f}"
        print(
            f"{row['config']:<7} {row['method']:<6} {100 * row['ptq_accuracy']:>6.2f}% "
            f"{100 * row['qat_accuracy']:>6.2f}% "
            f"{row['drop_points']:>6.2f} {goal:>5} {100 * row['integer_agreement']:>8.2f}%  "
            + ", ".join(f"{t:.1f}" for t in row["seconds_per_epoch"])
        )
    print(f"one float training epoch (qcore.training.train, batch 64): {float_epoch:.1f} s")
    for method, seconds in qat_epochs.items():
        print(f"one QAT epoch, W2A2 {method} (batch 256): {seconds:.1f} s = {seconds / float_epoch:.2f}x float")
    emit(
        {
            "float_accuracy": float_accuracy,
            "rows": rows,
            "float_epoch_seconds": float_epoch,
            "qat_epoch_over_float": {m: s / float_epoch for m, s in qat_epochs.items()},
        },
        args.json_out,
    )


if __name__ == "__main__":
    main()
