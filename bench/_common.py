"""Shared by the benchmark scripts: print the result as one JSON line and optionally save it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from qcore.data import Split


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


def float_onnx(model: torch.nn.Module, opset: int) -> bytes:
    """The float model as ONNX for the peers that quantize ONNX files (NNCF, ONNX Runtime): input 'input',
    a dynamic batch."""
    import io
    import warnings

    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(1, 1, 28, 28),), buffer, dynamo=False, opset_version=opset, input_names=["input"],
            output_names=["output"], dynamic_axes={"input": {0: "N"}, "output": {0: "N"}},
        )  # fmt: skip
    return buffer.getvalue()


def onnx_evaluator(model_bytes: bytes, batch: int = 500) -> Callable[[Split], float]:
    """One ONNX Runtime session for the file; the accuracy in [0, 1] it gets on a split."""
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def accuracy(split: Split) -> float:
        correct = 0
        for start in range(0, len(split), batch):
            output = session.run(None, {name: split.images[start : start + batch].numpy()})[0]
            correct += int((output.argmax(1) == split.labels[start : start + batch].numpy()).sum())
        return correct / len(split)

    return accuracy
