"""The PTQ methods' low-bit goals on the bundled net (the methods issue): equalization, AdaRound and bias
correction together, full test set, 1,024 calibration images, against the float model's accuracy. The
suite checks the first goal (W2A8, shared with the regression test); the other three each cost a run of
AdaRound (about 40 s on 2 cores), so they live here.

    QCORE_DATA_DIR=../shared/data python bench/bench_methods.py [--json-out FILE]
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

# (name, QuantConfig changes, the largest drop in points the goal allows)
GOALS: list[tuple[str, dict[str, object], float]] = [
    ("W2A8", {"weight_bits": 2, "act_bits": 8}, 1.0),
    ("W2A4", {"weight_bits": 2, "act_bits": 4}, 1.5),
    ("W3A3", {"weight_bits": 3, "act_bits": 3}, 0.3),
    ("2.5 average weight bits, A8", {"weight_bits_budget": 2.5}, 1.0),
]


def main() -> None:
    from qcore.analysis.tables import quantize_for
    from qcore.data import load_mnist
    from qcore.inference.evaluate import evaluate
    from qcore.models.checkpoint import load_model
    from qcore.quantize.config import QuantConfig
    from qcore.quantize.methods import METHODS, average_bits

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json-out")
    args = parser.parse_args()
    data, model = load_mnist(download=False), load_model()
    float_accuracy = evaluate(model, data.test).accuracy
    print(f"float {100 * float_accuracy:.2f}%")
    rows = []
    for name, changes, max_drop in GOALS:
        config = QuantConfig(methods=METHODS).with_changes(**changes)
        started = time.perf_counter()
        qnet = quantize_for(model, data, config)
        accuracy = evaluate(qnet, data.test).accuracy
        drop = 100 * (float_accuracy - accuracy)
        ok = drop <= max_drop
        if config.weight_bits_budget:
            ok = ok and average_bits(qnet.methods.weight_bits, qnet.methods.parameters) <= config.weight_bits_budget
        rows.append(
            {
                "config": name,
                "accuracy": round(100 * accuracy, 2),
                "drop_points": round(drop, 2),
                "goal_points": max_drop,
                "seconds": round(time.perf_counter() - started, 1),
                "ok": ok,
            }
        )
        print(f"{name:30} {100 * accuracy:6.2f}%  drop {drop:5.2f} (goal {max_drop})  {'ok' if ok else 'FAIL'}")
    emit({"bench": "methods", "float_accuracy": round(100 * float_accuracy, 2), "rows": rows}, args.json_out)


if __name__ == "__main__":
    main()
