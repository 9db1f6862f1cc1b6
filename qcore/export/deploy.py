"""Run the quantized model on each inference path and compare them, for the CLI, the Deploy page
and the benchmark: float torch, the fake-quant simulation, our integer engine, PyTorch's int8
kernels and ONNX Runtime on the QDQ export."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from qcore.data import Dataset
from qcore.inference.evaluate import evaluate
from qcore.quantize.qmodel import QuantizedNet, calibration_data

ENGINES = ("simulate", "integer", "torch-int8", "onnxruntime")


@dataclass(frozen=True)
class EngineResult:
    engine: str
    accuracy: float
    agreement_with_simulation: float  # fraction of test images with the same prediction
    seconds: float  # one pass over the test set, after a warm-up batch
    images_per_second: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def predictor(
    engine: str, model: nn.Module, data: Dataset, qnet: QuantizedNet
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function images -> predictions for `engine` ("float" is the unquantized model)."""
    if engine in ("float", "simulate"):
        module = model if engine == "float" else qnet

        def run_module(images: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return torch.cat([module(images[i : i + 1000]).argmax(1) for i in range(0, len(images), 1000)])

        return run_module
    if engine == "integer":
        from qcore.inference.integer import IntegerNet

        return IntegerNet(qnet).predict
    if engine == "torch-int8":
        from qcore.inference.torch_int8 import torch_int8_model

        int8 = torch_int8_model(model, calibration_data(data.train, qnet.config))

        def run_int8(images: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return torch.cat([int8(images[i : i + 1000]).argmax(1) for i in range(0, len(images), 1000)])

        return run_int8
    if engine == "onnxruntime":
        from qcore.export.formats import OnnxRunner, export_onnx

        return OnnxRunner(export_onnx(qnet), threads=torch.get_num_threads()).predict
    raise ValueError(f"unknown engine {engine!r}; choose from float, {', '.join(ENGINES)}")


def run_engine(
    engine: str, model: nn.Module, data: Dataset, qnet: QuantizedNet, reference: torch.Tensor | None = None
) -> EngineResult:
    """Accuracy on the full test set, agreement with `reference` (the simulation's predictions,
    computed when not given) and the time of one pass."""
    predict = predictor(engine, model, data, qnet)
    images, labels = data.test.images, data.test.labels
    predict(images[:100])  # warm-up: first-call allocations and kernel selection
    started = time.perf_counter()
    predictions = predict(images)
    seconds = time.perf_counter() - started
    if reference is None:
        reference = evaluate(qnet, data.test).predictions
    return EngineResult(
        engine,
        float((predictions == labels).float().mean()),
        float((predictions == reference).float().mean()),
        seconds,
        len(images) / seconds,
    )


def compare_engines(
    model: nn.Module, data: Dataset, qnet: QuantizedNet, engines: tuple[str, ...] = ("float",) + ENGINES
) -> list[EngineResult]:
    """Every engine in one run, so the throughputs are comparable."""
    reference = evaluate(qnet, data.test).predictions
    return [run_engine(engine, model, data, qnet, reference) for engine in engines]
