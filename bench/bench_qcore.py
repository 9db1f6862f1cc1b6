"""Engine benchmarks, measured in one run so ratios are comparable: prints a table and JSON.

    QCORE_DATA_DIR=../shared/data python bench/bench_qcore.py [--json-out bench/results/qcore.json]

Goals (issue 2): quantized-simulation eval <= 1.5x float eval; one training epoch with qcore.training.train
<= 0.6x a notebook-style DataLoader loop (torchvision MNIST with per-sample ToTensor+Normalize).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit  # noqa: E402

from qcore.analysis.tables import bit_sweep  # noqa: E402
from qcore.data import MNIST_MEAN, MNIST_STD, data_dir, load_mnist  # noqa: E402
from qcore.inference.evaluate import evaluate  # noqa: E402
from qcore.models.checkpoint import load_model  # noqa: E402
from qcore.models.net import Net  # noqa: E402
from qcore.quantize.config import QuantConfig  # noqa: E402
from qcore.quantize.qmodel import calibration_data, quantize_model  # noqa: E402
from qcore.training.train import TrainConfig, train  # noqa: E402


def timed(function: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls, after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def notebook_epoch(root: Path, seed: int) -> None:
    """One epoch as the notebook trains: torchvision dataset, per-sample transforms, DataLoader."""
    from torchvision import datasets, transforms

    dataset = datasets.MNIST(
        str(root),
        train=True,
        download=False,
        transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))]),
    )
    torch.manual_seed(seed)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    model.train()
    for images, labels in torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True):
        optimizer.zero_grad()
        F.nll_loss(model(images), labels).backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json-out", help="also write the JSON here")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()

    data = load_mnist(download=False)
    model = load_model()
    config = QuantConfig()
    batches = calibration_data(data.train, config)
    qnet = quantize_model(model, config, batches)

    rows: list[tuple[str, float]] = []
    rows.append(("float eval, 10k test images", timed(lambda: evaluate(model, data.test), args.repeats)))
    rows.append(("quantized-simulation eval, 10k", timed(lambda: evaluate(qnet, data.test), args.repeats)))
    rows.append(
        ("calibrate + quantize (default, 16x64)", timed(lambda: quantize_model(model, config, batches), args.repeats))
    )
    rows.append(("sweep W=A 2..8 bits (7 evals)", timed(lambda: bit_sweep(model, data, config), 1)))
    if not args.skip_training:
        rows.append(("train 1 epoch, qcore.training.train", timed(lambda: train(data.train, TrainConfig(epochs=1)), 1)))
        rows.append(("train 1 epoch, notebook DataLoader", timed(lambda: notebook_epoch(data_dir(), 1), 1)))

    seconds = dict(rows)
    float_eval = seconds["float eval, 10k test images"]
    ratios = {"quant_eval_over_float_eval": seconds["quantized-simulation eval, 10k"] / float_eval}
    if not args.skip_training:
        ratios["qcore_epoch_over_notebook_epoch"] = (
            seconds["train 1 epoch, qcore.training.train"] / seconds["train 1 epoch, notebook DataLoader"]
        )
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    width = max(len(name) for name, _ in rows)
    print(f"{'measurement':<{width}}  seconds")
    for name, value in rows:
        print(f"{name:<{width}}  {value:8.3f}")
    for name, value in ratios.items():
        print(f"{name:<{width}}  {value:8.3f}x")
    result = {"seconds": seconds, "ratios": ratios, "machine": machine}
    emit(result, args.json_out)


if __name__ == "__main__":
    main()
