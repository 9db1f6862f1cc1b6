"""Against what a user would pick instead: PyTorch 2 export quantization (torchao's PT2E flow) at W8A8
on every zoo model, beside ours and beside torch's eager int8 path, in one run.

For each model, on its full test set and with the same calibration images as ours (16 batches of 64
training images, `qcore.quantize.qmodel.calibration_data`):
- ours: the default W8A8 config's simulated accuracy, and the seconds our integer engine takes;
- PT2E: `torch.export` -> `prepare_pt2e` with `X86InductorQuantizer`'s default static config
  (per-channel symmetric int8 weights, per-tensor uint8 activations from a histogram observer) ->
  calibration -> `convert_pt2e`; its accuracy (the Q/DQ reference graph), then its int8 inference
  seconds after `torch.compile` lowers it to oneDNN's int8 kernels (freezing on, as torchao's
  x86 tutorial does); `--skip-compile` leaves the compile out (it takes minutes on 2 cores);
- torch eager int8 (`qcore.inference.torch_int8`, fbgemm/oneDNN: an eager module built from our graph,
  calibrated on the same images);
- the float model's seconds, the yardstick every speed is divided by.

torchao is a development dependency (requirements-dev.txt), not the product's.

    QCORE_DATA_DIR=../shared/data python bench/bench_pt2e.py --json-out bench/results/pt2e.json
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import emit  # noqa: E402
from qcore.analysis.tables import quantize_for  # noqa: E402
from qcore.data import load_dataset  # noqa: E402
from qcore.inference.integer import IntegerNet  # noqa: E402
from qcore.models.checkpoint import load_model  # noqa: E402
from qcore.models.zoo import ZOO, zoo_model  # noqa: E402
from qcore.quantize.config import QuantConfig  # noqa: E402
from qcore.quantize.qmodel import calibration_data  # noqa: E402

BATCH = 1000


def _predict(module, images: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Predictions over the test set in batches of 1000, and the seconds they took."""
    began = time.perf_counter()
    with torch.no_grad():
        predictions = torch.cat([module(images[i : i + BATCH]).argmax(1) for i in range(0, len(images), BATCH)])
    return predictions, time.perf_counter() - began


def pt2e_model(model: torch.nn.Module, batches: list[torch.Tensor]) -> torch.nn.Module:
    """torchao's PT2E W8A8 model for x86, calibrated on `batches`."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    example = (batches[0][:BATCH],)
    # a dynamic batch, so that calibration batches of 64 and test batches of 1000 share one graph
    batch = torch.export.Dim("batch", min=1, max=BATCH)
    exported = torch.export.export(model.eval(), example, dynamic_shapes=({0: batch},)).module()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for images in batches:
            prepared(images)
    return convert_pt2e(prepared)


def measure(name: str, skip_compile: bool) -> dict[str, object]:
    spec = zoo_model(name)
    data = load_dataset(spec.dataset, download=False)
    model = load_model(None, name).eval()
    images, labels = data.test.images, data.test.labels
    batches = calibration_data(data.train, QuantConfig())
    rows: dict[str, object] = {"model": name, "dataset": spec.dataset}

    def accuracy(predictions: torch.Tensor) -> float:
        return float((predictions == labels).float().mean())

    _predict(model, images)  # warm-up
    float_predictions, rows["float seconds"] = _predict(model, images)
    rows["float"] = accuracy(float_predictions)

    qnet = quantize_for(model, data, QuantConfig())
    ours, _ = _predict(qnet, images)
    rows["ours W8A8"] = accuracy(ours)
    began = time.perf_counter()
    integer = IntegerNet(qnet).predict(images)
    rows["ours integer seconds"] = time.perf_counter() - began
    rows["ours integer W8A8"] = accuracy(integer)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export and torchao announce their prototype status
        converted = pt2e_model(model, batches)
        reference, rows["pt2e reference seconds"] = _predict(converted, images)
        rows["pt2e W8A8"] = accuracy(reference)
        rows["pt2e agrees with ours"] = float((reference == ours).float().mean())
        if not skip_compile:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True  # constant weights: what lets inductor pick int8 kernels
            began = time.perf_counter()
            compiled = torch.compile(converted)
            _predict(compiled, images[:BATCH])
            rows["pt2e compile seconds"] = time.perf_counter() - began
            lowered, rows["pt2e int8 seconds"] = _predict(compiled, images)
            rows["pt2e int8 W8A8"] = accuracy(lowered)
    from qcore.inference.torch_int8 import torch_int8_model

    eager = torch_int8_model(model, batches)
    eager_predictions, rows["torch eager int8 seconds"] = _predict(eager, images)
    rows["torch eager int8 W8A8"] = accuracy(eager_predictions)
    return rows


def table(rows: dict[str, object]) -> str:
    lines = [f"{rows['model']} ({rows['dataset']})"]
    for key, value in rows.items():
        if not isinstance(value, float):
            continue
        if "seconds" in key:
            ratio = value / rows["float seconds"]  # type: ignore[operator]
            lines.append(f"  {key:<28} {value:8.2f} s  ({ratio:.2f}x float)")
        else:
            lines.append(f"  {key:<28} {100 * value:8.2f}%")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(ZOO), help="comma-separated zoo names")
    parser.add_argument("--skip-compile", action="store_true", help="accuracy only: no torch.compile lowering")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    names = [name for name in args.models.split(",") if name]
    for name in names:
        zoo_model(name)  # every name checked before any work
    result: dict[str, object] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "models": []}
    for name in names:
        rows = measure(name, args.skip_compile)
        result["models"].append(rows)  # type: ignore[union-attr]
        print(table(rows), flush=True)
    emit(result, args.json_out)


if __name__ == "__main__":
    main()
