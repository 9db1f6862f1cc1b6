"""The auto search against what engineers would run instead, on every zoo model and the same budget.

For each model: the same 1,024 calibration images (the default config's sample), the same 5,000 validation
images (training images calibration never sees: qcore.analysis.auto.validation_split), the same allowed drop
below the float model's validation accuracy, and the full test set for the chosen model. Rows:
- the lab: `auto_search` with its time budget;
- NNCF 3.4 `quantize_with_accuracy_control` on the lab's float ONNX export (its ONNX backend; NNCF's torch
  backend has no accuracy control): INT8, then the quantized operations that cost the most reverted to
  float until the drop holds;
- AIMET AutoQuant's recipe: aimet-torch 2.42 ships no AutoQuant (aimet_torch/common/auto_quant.py holds
  only its Diagnostics helper), so its documented steps are run with aimet's own pieces at its defaults
  (W8A8, the tf_enhanced range scheme): BatchNorm folding, evaluate; if the drop misses, cross-layer
  equalization, evaluate. (AdaRound, its third step, is not run: no row needed it; a miss says so.)
Each row: weight bytes (conv and linear weights; a float weight 4 bytes), average weight bits, validation
and test accuracy, and the tool's seconds. A tool that cannot run a model gets a row that says why.

The peers are not in requirements.txt (they pull in hundreds of MB): install them beside the lab,
    python -m venv --system-site-packages .peers && .peers/bin/pip install -r requirements-peers.txt
then run
    QCORE_DATA_DIR=../shared/data PYTHONPATH=. .peers/bin/python bench/bench_auto.py [--models ...]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import emit, float_onnx, onnx_evaluator  # noqa: E402
from qcore.analysis.auto import SearchSettings, auto_search, choose, measure_on_test, validation_split  # noqa: E402
from qcore.data import Dataset, Split, load_dataset  # noqa: E402
from qcore.inference.evaluate import evaluate  # noqa: E402
from qcore.models.checkpoint import load_model  # noqa: E402
from qcore.models.zoo import ZOO, zoo_model  # noqa: E402
from qcore.quantize.config import QuantConfig  # noqa: E402
from qcore.quantize.qmodel import calibration_data  # noqa: E402


def onnx_weight_sizes(model_bytes: bytes) -> tuple[int, float]:
    """Weight bytes and average bits of a QDQ ONNX file: a Conv's or Gemm's weight fed by a
    DequantizeLinear of an 8-bit initializer counts 8 bits a value, a float initializer 32."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(model_bytes).graph
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    produced = {out: node for node in graph.node for out in node.output}
    total_bits = values = 0
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        source = node.input[1]
        maker = produced.get(source)
        if maker is not None and maker.op_type == "DequantizeLinear":
            weight = initializers[maker.input[0]]
            bits = 8 * weight.dtype.itemsize
        elif maker is not None and maker.op_type == "Transpose":  # Gemm weights exported transposed
            weight = initializers[maker.input[0]]
            bits = 32
        else:
            weight = initializers[source]
            bits = 32
        total_bits += weight.size * bits
        values += weight.size
    return total_bits // 8, total_bits / values


def lab_rows(model: nn.Module, data: Dataset, settings: SearchSettings, peer_seconds: float) -> list[dict[str, object]]:
    """The search's choice, and (the search being anytime) what it had chosen when the slowest peer was done."""
    result = auto_search(model, data, QuantConfig(), settings)
    rows = []
    early = [p for p in result.points if p.elapsed <= peer_seconds]
    for tool, chosen in (
        ("lab auto", result.chosen),
        (f"lab auto, cut at {peer_seconds:.0f} s", choose(early, result.target, settings.objective)),
    ):
        if chosen is None:
            rows.append({"tool": tool, "note": "nothing within the budget yet", "seconds": result.seconds})
            continue
        rows.append(
            {
                "tool": tool,
                "choice": chosen.label,
                "weight_bytes": chosen.weight_bytes,
                "average_weight_bits": round(chosen.average_weight_bits, 3),
                "validation_accuracy": chosen.validation_accuracy,
                "test_accuracy": measure_on_test(model, data, [chosen])[chosen.config.to_json()],
                "seconds": chosen.elapsed if tool != "lab auto" else result.seconds,
                "found_after_seconds": chosen.elapsed,
                "configs": len(result.points),
                "stopped_by": result.stopped_by,
            }
        )
    return rows


def nncf_row(model: nn.Module, calibration: list[torch.Tensor], validation: Split, test: Split, max_drop: float):
    try:
        import nncf
        import onnx
    except ImportError as error:
        return {"tool": "NNCF accuracy control", "note": f"not installed ({error.name}); see this file's docstring"}
    float_bytes = float_onnx(model, opset=17)
    images = torch.cat(calibration)
    calibration_set = nncf.Dataset([images[i : i + 1].numpy() for i in range(len(images))], lambda x: {"input": x})
    batches = [
        (validation.images[s : s + 500].numpy(), validation.labels[s : s + 500].numpy())
        for s in range(0, len(validation), 500)
    ]
    validation_set = nncf.Dataset(batches, lambda item: {"input": item[0]})

    def validate(candidate: onnx.ModelProto, items) -> tuple[float, None]:  # noqa: ANN001 - NNCF's iterable
        import onnxruntime as ort

        session = ort.InferenceSession(candidate.SerializeToString(), providers=["CPUExecutionProvider"])
        correct = total = 0
        for images_np, labels_np in items:
            output = session.run(None, {"input": images_np})[0]
            correct += int((output.argmax(1) == labels_np).sum())
            total += len(labels_np)
        return correct / total, None

    started = time.perf_counter()
    quantized = nncf.quantize_with_accuracy_control(
        onnx.load_from_string(float_bytes),
        calibration_set,
        validation_set,
        validate,
        max_drop=max_drop / 100,
        subset_size=len(images),
    )
    seconds = time.perf_counter() - started
    quantized_bytes = quantized.SerializeToString()
    weight_bytes, bits = onnx_weight_sizes(quantized_bytes)
    validation_accuracy = validate(quantized, batches)[0]
    return {
        "tool": "NNCF accuracy control",
        "choice": "INT8, the costliest operations reverted to float" if bits > 8 else "INT8",
        "weight_bytes": weight_bytes,
        "average_weight_bits": round(bits, 3),
        "validation_accuracy": validation_accuracy,
        "test_accuracy": onnx_evaluator(quantized_bytes)(test),
        "seconds": seconds,
    }


def aimet_row(model: nn.Module, calibration: list[torch.Tensor], validation: Split, test: Split, target: float):
    try:
        from aimet_torch.batch_norm_fold import fold_all_batch_norms
        from aimet_torch.common.defs import QuantScheme
        from aimet_torch.cross_layer_equalization import equalize_model
        from aimet_torch.quantsim import QuantizationSimModel
    except ImportError as error:
        return {"tool": "AIMET AutoQuant's recipe", "note": f"not installed ({error.name}); see this file's docstring"}
    started = time.perf_counter()
    shape = (1, 1, 28, 28)
    prepared = copy.deepcopy(model).eval()
    steps = []
    for step in ("BatchNorm folding", "cross-layer equalization"):
        if step == "BatchNorm folding":
            fold_all_batch_norms(prepared, input_shapes=shape)
        else:
            equalize_model(prepared, input_shapes=shape)
        sim = QuantizationSimModel(
            prepared, torch.zeros(shape), quant_scheme=QuantScheme.post_training_tf_enhanced,
            default_param_bw=8, default_output_bw=8,
        )  # fmt: skip

        def calibrate(quantized: nn.Module) -> None:
            with torch.no_grad():
                for batch in calibration:
                    quantized(batch)

        sim.compute_encodings(calibrate)
        accuracy = evaluate(sim.model, validation).accuracy
        steps.append(step)
        if accuracy >= target:
            break
    seconds = time.perf_counter() - started
    parameters = sum(m.weight.numel() for m in prepared.modules() if isinstance(m, nn.Conv2d | nn.Linear))
    return {
        "tool": "AIMET AutoQuant's recipe",
        "choice": "W8A8 after " + ", ".join(steps) + ("" if accuracy >= target else " (still outside the budget)"),
        "weight_bytes": parameters,
        "average_weight_bits": 8.0,
        "validation_accuracy": accuracy,
        "test_accuracy": evaluate(sim.model, test).accuracy,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=list(ZOO))
    parser.add_argument("--max-drop", type=float, default=0.5, help="points below the float model's accuracy")
    parser.add_argument("--budget-s", type=float, default=120.0, help="the lab's time budget per model")
    parser.add_argument("--json-out", help="also write the JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    np.random.seed(0)
    rows = []
    for name in args.models:
        model = load_model(None, name).eval()
        data = load_dataset(zoo_model(name).dataset)
        config = QuantConfig()
        calibration = calibration_data(data.train, config)
        validation = validation_split(data.train, config)
        float_validation = evaluate(model, validation).accuracy
        float_test = evaluate(model, data.test).accuracy
        target = float_validation - args.max_drop / 100
        float_bytes = 4 * sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear))
        settings = SearchSettings(max_drop=args.max_drop, budget_s=args.budget_s)
        peers = [
            nncf_row(model, calibration, validation, data.test, args.max_drop),
            aimet_row(model, calibration, validation, data.test, target),
        ]
        peer_seconds = max((float(row.get("seconds", 0.0)) for row in peers), default=0.0)  # type: ignore[arg-type]
        for row in [*lab_rows(model, data, settings, max(peer_seconds, 1.0)), *peers]:
            row.update(model=name, float_validation_accuracy=float_validation, float_test_accuracy=float_test)
            row["float_weight_bytes"] = float_bytes
            rows.append(row)
            print(
                f"{name:18s} {row['tool']:26s} {row.get('choice', row.get('note', '')):60.60s} "
                f"{row.get('weight_bytes', '-')!s:>8} bytes  validation "
                f"{100 * row.get('validation_accuracy', float('nan')):.2f}%  test "
                f"{100 * row.get('test_accuracy', float('nan')):.2f}% (float {100 * float_test:.2f}%)  "
                f"{row.get('seconds', float('nan')):.0f} s",
                flush=True,
            )
    emit({"bench": "auto", "max_drop": args.max_drop, "budget_s": args.budget_s, "rows": rows}, args.json_out)


if __name__ == "__main__":
    main()
