"""The integer engine's products, two ways, measured in one run on every zoo model's 10,000 test
images at the default W8A8 config: torch._int_mm (int8 x int8 -> int32 after an im2col on bytes, the
engine's kernel before, `IntegerNet(qnet, integer_kernels=True)` now) and the exact float kernels the
engine uses by default (qcore.inference.integer._centred_weights: torch's float convolution and GEMM
of x - z_x by w - z_w, in float32 where every partial sum stays within 2^24, else float64). The
predictions must be identical. Beside them, in the same run, the float model's and the simulation's
evaluation of the same images: what the engine's time compares with.

    QCORE_DATA_DIR=../shared/data python bench/bench_integer_kernels.py [--json-out FILE] [--models a,b]

Goal (issue 33): fashion-resnet's 10,000 test images through the integer engine in at most 5 s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit  # noqa: E402

import qcore.inference.integer as integer  # noqa: E402
from qcore.analysis.tables import quantize_for  # noqa: E402
from qcore.data import Dataset, load_dataset  # noqa: E402
from qcore.inference.evaluate import evaluate  # noqa: E402
from qcore.models.checkpoint import load_model  # noqa: E402
from qcore.models.zoo import ZOO  # noqa: E402
from qcore.quantize.config import QuantConfig  # noqa: E402


def timed_predictions(engine: integer.IntegerNet, images: torch.Tensor) -> tuple[float, torch.Tensor]:
    started = time.perf_counter()
    predictions = engine.predict(images)
    return time.perf_counter() - started, predictions


def timed_evaluation(model: torch.nn.Module, data: Dataset) -> float:
    started = time.perf_counter()
    evaluate(model, data.test)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json-out")
    parser.add_argument("--models", default=",".join(ZOO))
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        spec = ZOO[name]
        data = load_dataset(spec.dataset, download=False)
        model = load_model(None, name)
        qnet = quantize_for(model, data, QuantConfig())
        float_s, simulation_s = timed_evaluation(model, data), timed_evaluation(qnet, data)
        before, old = timed_predictions(integer.IntegerNet(qnet, integer_kernels=True), data.test.images)
        after, new = timed_predictions(integer.IntegerNet(qnet), data.test.images)
        rows.append(
            {
                "model": name,
                "int_mm s": round(before, 2),
                "float kernels s": round(after, 2),
                "speed-up": round(before / after, 2),
                "float model s": round(float_s, 2),
                "simulation s": round(simulation_s, 2),
                "engine / simulation": round(after / simulation_s, 2),
                "identical predictions": bool(torch.equal(old, new)),
            }
        )
    resnet = next((row for row in rows if row["model"] == "fashion-resnet"), None)
    print("| " + " | ".join(rows[0]) + " |")
    print("| " + " | ".join("---" for _ in rows[0]) + " |")
    for row in rows:
        print("| " + " | ".join(str(value) for value in row.values()) + " |")
    met = None if resnet is None else resnet["float kernels s"] <= 5.0
    emit({"rows": rows, "threads": torch.get_num_threads(), "goal_resnet_s": 5.0, "met": met}, args.json_out)


if __name__ == "__main__":
    main()
