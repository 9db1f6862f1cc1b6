"""Shared by the benchmark scripts: print the result as one JSON line and optionally save it."""

from __future__ import annotations

import json
from pathlib import Path


def float_eval_seconds(repeats: int) -> list[float]:
    """Seconds of qcore's float eval of the 10k test set, `repeats` times after one warm-up run: the
    yardstick every benchmark ratio is measured against, in the same run."""
    import time

    from qcore.data import load_mnist
    from qcore.inference.evaluate import evaluate
    from qcore.models.checkpoint import load_model

    data, model = load_mnist(download=False), load_model()
    evaluate(model, data.test)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        evaluate(model, data.test)
        seconds.append(time.perf_counter() - started)
    return seconds


def emit(result: dict[str, object], json_out: str | None) -> None:
    print(json.dumps(result))
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=2))
