"""Throughput of each inference path on the 10k test set, measured in one run: float torch, the
fake-quant simulation, our integer engine, PyTorch int8 (x86 engine) and ONNX Runtime on the QDQ
export, all at the default W8A8 config and the same torch thread count.

    QCORE_DATA_DIR=../shared/data python bench/bench_engines.py [--json-out bench/results/engines.json]

Goal (issue 4): the fastest int8 path at least 1.5x float torch.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit  # noqa: E402

from qcore.analysis.tables import quantize_for  # noqa: E402
from qcore.data import load_mnist  # noqa: E402
from qcore.export.deploy import predictor  # noqa: E402
from qcore.models.checkpoint import load_model  # noqa: E402
from qcore.quantize.config import QuantConfig  # noqa: E402

PATHS = ("float", "simulate", "integer", "torch-int8", "onnxruntime")
INT8_PATHS = ("integer", "torch-int8", "onnxruntime")


def cpu_flags() -> list[str]:
    """The int8 dot-product instruction sets this CPU advertises (x86 Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_vnni", "avx512vnni", "avx_vnni", "amx_int8"})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json-out")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data, model = load_mnist(download=False), load_model()
    qnet = quantize_for(model, data, QuantConfig())
    images, labels = data.test.images, data.test.labels
    rows = {}
    for path in PATHS:
        predict = predictor(path, model, data, qnet)
        predict(images[:100])
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            predictions = predict(images)
            times.append(time.perf_counter() - started)
        seconds = statistics.median(times)
        rows[path] = {
            "seconds": seconds,
            "images_per_second": len(images) / seconds,
            "accuracy": float((predictions == labels).float().mean()),
        }
    float_rate = rows["float"]["images_per_second"]
    fastest = max(INT8_PATHS, key=lambda p: rows[p]["images_per_second"])
    result = {
        "paths": rows,
        "fastest_int8": fastest,
        "fastest_int8_over_float": rows[fastest]["images_per_second"] / float_rate,
        "goal_fastest_int8_over_float": 1.5,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "int8_isa": cpu_flags(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }
    print(f"{'path':<12} {'images/s':>10} {'vs float':>9} {'accuracy':>9}")
    for path, row in rows.items():
        print(
            f"{path:<12} {row['images_per_second']:>10.0f} {row['images_per_second'] / float_rate:>8.2f}x "
            f"{100 * row['accuracy']:>8.2f}%"
        )
    print(f"fastest int8 path: {fastest}, {result['fastest_int8_over_float']:.2f}x float; CPU int8 ISA: {cpu_flags()}")
    emit(result, args.json_out)


if __name__ == "__main__":
    main()
