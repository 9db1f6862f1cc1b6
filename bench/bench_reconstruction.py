"""Block reconstruction's goals (the peers issue): on fashion-resnet and fashion-mobilenet at W4A4, W2A4
and W4A8, the full test set, 1,024 calibration images (16 x 64), one run, seed 0. Each row: float,
the default config (nearest rounding), block reconstruction, and its time; under the lab's default
convention (every layer and the input at the row's bits, symmetric weights), under the papers' (BRECQ,
QDrop: the first and last layers, weights and inputs, at 8 bits: `edge_bits=8`), and with BRECQ's
asymmetric weights (4 levels at 2 bits where symmetric ones have 3). The lab's three other methods
(equalization, AdaRound, bias correction) are docs/models.md's zoo table (bench_zoo.py), or measured
here with --with-methods.

    QCORE_DATA_DIR=../shared/data python bench/bench_reconstruction.py [--json-out FILE]
    python bench/bench_reconstruction.py --models fashion-resnet --rows W4A4 --conventions default --with-methods
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

# (model, row, weight bits, activation bits, the largest drop in points the goal allows)
GOALS: list[tuple[str, str, int, int, float]] = [
    ("fashion-resnet", "W4A4", 4, 4, 0.5),
    ("fashion-resnet", "W2A4", 2, 4, 3.0),
    ("fashion-mobilenet", "W4A4", 4, 4, 1.0),
    ("fashion-mobilenet", "W2A4", 2, 4, 8.0),
    ("fashion-mobilenet", "W4A8", 4, 8, 0.3),
]
# the lab's default (every layer and the input at the row's bits, symmetric weights: 3 levels at 2 bits),
# the papers' first and last layers at 8 bits, and BRECQ's asymmetric weights (4 levels at 2 bits)
CONVENTIONS: dict[str, dict[str, object]] = {
    "default": {},
    "edges8": {"edge_bits": 8},
    "asymmetric": {"scheme": "asymmetric"},
    "asymmetric-edges8": {"scheme": "asymmetric", "edge_bits": 8},
}
THREE_METHODS = ("equalization", "adaround", "bias-correction")


def main() -> None:
    from qcore.analysis.tables import quantize_for
    from qcore.data import load_dataset
    from qcore.inference.evaluate import evaluate
    from qcore.models.checkpoint import load_model
    from qcore.models.zoo import zoo_model
    from qcore.quantize.config import QuantConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="fashion-resnet,fashion-mobilenet")
    parser.add_argument("--rows", default="W4A4,W2A4,W4A8")
    parser.add_argument("--conventions", default=",".join(CONVENTIONS), help=f"from {','.join(CONVENTIONS)}")
    parser.add_argument("--with-methods", action="store_true", help="also measure the three other methods")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    models, labels = args.models.split(","), args.rows.split(",")
    rows: list[dict[str, object]] = []
    floats: dict[str, float] = {}
    for name in models:
        data = load_dataset(zoo_model(name).dataset, download=False)
        model = load_model(None, name)
        floats[name] = 100 * evaluate(model, data.test).accuracy
        print(f"{name}: float {floats[name]:.2f}%", flush=True)
        for model_name, label, weight_bits, act_bits, max_drop in GOALS:
            if model_name != name or label not in labels:
                continue
            for convention in args.conventions.split(","):
                changes = CONVENTIONS[convention]
                base = QuantConfig(weight_bits=weight_bits, act_bits=act_bits, **changes)  # type: ignore[arg-type]
                learned = base.with_changes(methods=("block-reconstruction",))
                recipes = {"nearest": base, "block reconstruction": learned}
                if args.with_methods:
                    recipes["three methods"] = base.with_changes(methods=THREE_METHODS)
                for recipe, config in recipes.items():
                    started = time.perf_counter()
                    qnet = quantize_for(model, data, config)
                    seconds = time.perf_counter() - started
                    accuracy = 100 * evaluate(qnet, data.test).accuracy
                    drop = floats[name] - accuracy
                    row = {
                        "model": name,
                        "bits": label,
                        "convention": convention,
                        "recipe": recipe,
                        "accuracy": round(accuracy, 2),
                        "drop_points": round(drop, 2),
                        "goal_points": max_drop,
                        "quantize_seconds": round(seconds, 1),
                        "ok": drop <= max_drop if recipe == "block reconstruction" else None,
                    }
                    rows.append(row)
                    verdict = "" if row["ok"] is None else ("ok" if row["ok"] else "MISSED")
                    print(
                        f"  {label} {convention:18} {recipe:22} {accuracy:6.2f}%  drop {drop:5.2f} "
                        f"(goal {max_drop})  {seconds:6.1f} s  {verdict}",
                        flush=True,
                    )
    emit({"bench": "reconstruction", "float_accuracy": floats, "rows": rows}, args.json_out)


if __name__ == "__main__":
    main()
