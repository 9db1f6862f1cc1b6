"""The server's computation gate (ui/gate.py): how many computations to run at once, and with how many
torch threads each, on this machine. Six sessions ask for six different new configs at the same
moment (build_report, as the Accuracy page does); each row gives when the first and the last got
their result and the mean, as multiples of one report computed alone in the same run.

    QCORE_DATA_DIR=../shared/data python bench/bench_gate.py [--sessions 6] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from _common import emit  # noqa: E402

from qcore.analysis.tables import build_report  # noqa: E402
from qcore.data import load_mnist  # noqa: E402
from qcore.inference.evaluate import evaluate  # noqa: E402
from qcore.models.checkpoint import load_model  # noqa: E402
from qcore.quantize.config import QuantConfig  # noqa: E402
from ui.gate import Gate  # noqa: E402


def concurrent_latencies(
    slots: int, threads: int, sessions: int, first_seed: int, data, model, reference
) -> list[float]:
    """Seconds from the common start to each session's result."""
    torch.set_num_threads(threads)
    gate = Gate(slots)
    start = threading.Barrier(sessions + 1)
    latencies = [0.0] * sessions

    def session(index: int) -> None:
        config = QuantConfig(seed=first_seed + index)
        start.wait()
        began = time.perf_counter()
        with gate.turn(("report", config.to_json())):
            build_report(model, data, config, reference)
        latencies[index] = time.perf_counter() - began

    workers = [threading.Thread(target=session, args=(i,)) for i in range(sessions)]
    for worker in workers:
        worker.start()
    start.wait()
    for worker in workers:
        worker.join()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=6)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    data, model = load_mnist(download=False), load_model()
    reference = evaluate(model, data.test)
    build_report(model, data, QuantConfig(seed=999), reference)  # warm-up
    torch.set_num_threads(cores)
    alone = []
    for seed in (1000, 1001):
        began = time.perf_counter()
        build_report(model, data, QuantConfig(seed=seed), reference)
        alone.append(time.perf_counter() - began)
    one = statistics.mean(alone)
    rows = []
    seed = 2000
    for slots in sorted({1, 2, args.sessions}):
        for threads in sorted({1, cores}):
            latencies = concurrent_latencies(slots, threads, args.sessions, seed, data, model, reference)
            seed += args.sessions
            rows.append(
                {
                    "slots": slots,
                    "torch_threads": threads,
                    "first_over_one": min(latencies) / one,
                    "mean_over_one": statistics.mean(latencies) / one,
                    "last_over_one": max(latencies) / one,
                }
            )
    print(f"one report alone ({cores} torch threads): {one:.2f} s; {args.sessions} sessions at once, {cores} cores")
    print(f"{'slots':>5} {'threads':>7} {'first':>7} {'mean':>7} {'last':>7}   (multiples of one alone)")
    for row in rows:
        print(
            f"{row['slots']:>5} {row['torch_threads']:>7} {row['first_over_one']:>7.2f} "
            f"{row['mean_over_one']:>7.2f} {row['last_over_one']:>7.2f}"
        )
    emit({"one_alone_seconds": one, "sessions": args.sessions, "cores": cores, "rows": rows}, args.json_out)


if __name__ == "__main__":
    main()
