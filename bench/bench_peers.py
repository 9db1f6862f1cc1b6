"""The lab beside the tools engineers use, on the same models, images and bit-widths, in one run.

For each model: the same 1,024 calibration images (the default config's sample, 16 x 64 training
images), the same 5,000 validation images (training images calibration never sees:
qcore.analysis.auto.validation_split), and the full test set. Columns W8A8, W4A8, W4A4, W3A3, W2A4
(per-channel weights unless a tool cannot). Rows, each tool at each of its settings:
- lab: its default (nearest rounding), the same under the peers' conventions (min/max ranges; asymmetric
  weights, which have 4 levels at 2 bits where symmetric ones have 3), and its methods (equalization +
  AdaRound + bias correction; block reconstruction, with either weights);
- lab (peers' conventions): the lab again under the peers' looser conventions, so that the comparison is
  fair both ways: residual adds kept in float (their inputs at 16 bits; Brevitas and torchao leave them
  float), alone, with Brevitas's percentile activation ranges, and with block reconstruction. Shown
  beside the lab's row, never counted as it;
- AIMET (aimet-torch v2 QuantizationSimModel after its BatchNorm folding, per-channel config): the
  min_max and tf_enhanced range schemes, tf_enhanced after cross-layer equalization, and its AdaRound;
- Brevitas (brevitas_examples' PTQ, layerwise): calibration, then bias correction, then GPTQ;
- NNCF `nncf.quantize` (ONNX backend, on the lab's float ONNX export): its INT8 preset;
- ONNX Runtime `quantize_static` (QDQ, per-channel, on the same export): MinMax, Entropy and
  Percentile calibration, 8-bit and its 4-bit integer types;
- torchao PT2E (X86InductorQuantizer's default static config): int8.
Then each tool's best row per column, chosen on the validation images (never the test set): the
courtesy the lab's own recipe gets. A setting a tool cannot run gets a cell that says why.

The peers are this bench's dependencies, not the lab's: install them into their own environment,
    python -m venv --system-site-packages .peers && .peers/bin/pip install -r requirements-peers.txt
then
    QCORE_DATA_DIR=../shared/data PYTHONPATH=. .peers/bin/python bench/bench_peers.py \
        [--models mnist-net ...] [--bits W8A8,W4A4] [--tools lab,AIMET,...] [--json-out FILE] [--ship [--merge]]
`--ship` writes each model's result beside its checkpoint (qcore/models/pretrained/<model>.peers.json),
which the Methods page and `python -m qcore peers` read; with `--merge`, the tools measured replace
their own rows in the shipped result (each row keeps the commit it was measured at) and the rest stay.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import emit, float_onnx, onnx_evaluator  # noqa: E402
from qcore.analysis.auto import validation_split  # noqa: E402
from qcore.data import Split, load_dataset  # noqa: E402
from qcore.inference.evaluate import evaluate  # noqa: E402
from qcore.models.checkpoint import load_model  # noqa: E402
from qcore.models.peers import BITS, LAB, LAB_UNDER_PEERS, PEERS, TOOLS, peers_path  # noqa: E402
from qcore.models.zoo import ZOO, zoo_model  # noqa: E402
from qcore.quantize.config import QuantConfig  # noqa: E402
from qcore.quantize.qmodel import calibration_data, quantize_model  # noqa: E402

BATCH = 500
THREE_METHODS = ("equalization", "adaround", "bias-correction")
AIMET_ADAROUND_ITERATIONS = 1000  # the lab's AdaRound runs 1,000 per layer (methods.ADAROUND_ITERATIONS)


class CannotRun(Exception):
    """A setting a tool does not offer: the cell says why."""


@dataclass
class Inputs:
    """What every tool gets, identical for all of them."""

    model: nn.Module
    calibration: list[torch.Tensor]
    validation: Split
    test: Split
    float_onnx: bytes = b""
    scratch: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bench_peers_")))


# One setting of one tool: run(inputs, weight_bits, act_bits) quantizes and returns its evaluator.
# The evaluator maps a split to its accuracy in [0, 1].
Evaluator = Callable[[Split], float]
Runner = Callable[[Inputs, int, int], Evaluator]


@dataclass(frozen=True)
class Setting:
    tool: str
    name: str
    run: Runner


def torch_evaluator(module: nn.Module) -> Evaluator:
    """Accuracy of a module in eval mode (an exported PT2E module refuses eval(): it has no train mode)."""
    with contextlib.suppress(NotImplementedError):
        module.eval()

    def accuracy(split: Split) -> float:
        correct = 0
        with torch.no_grad():
            for start in range(0, len(split), BATCH):
                output = module(split.images[start : start + BATCH])
                correct += int((output.argmax(1) == split.labels[start : start + BATCH]).sum())
        return correct / len(split)

    return accuracy


# --- the lab -------------------------------------------------------------------------------------


def lab(methods: tuple[str, ...] = (), **convention: object) -> Runner:
    def run(inputs: Inputs, weight_bits: int, act_bits: int) -> Evaluator:
        config = QuantConfig(weight_bits=weight_bits, act_bits=act_bits, methods=methods, **convention)  # type: ignore[arg-type]
        qnet = quantize_model(inputs.model, config.validate(None), inputs.calibration)
        return lambda split: evaluate(qnet, split).accuracy

    return run


# --- AIMET ---------------------------------------------------------------------------------------


def aimet(scheme: str, equalize: bool = False, adaround: bool = False) -> Runner:
    def run(inputs: Inputs, weight_bits: int, act_bits: int) -> Evaluator:
        import aimet_torch
        from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters
        from aimet_torch.batch_norm_fold import fold_all_batch_norms
        from aimet_torch.common.defs import QuantScheme
        from aimet_torch.cross_layer_equalization import equalize_model
        from aimet_torch.quantsim import QuantizationSimModel

        if adaround and weight_bits < 4:
            raise CannotRun("AIMET's AdaRound takes 4 to 31 weight bits")
        quant_scheme = {"min_max": QuantScheme.post_training_tf, "tf_enhanced": QuantScheme.post_training_tf_enhanced}
        config_file = str(Path(aimet_torch.__file__).parent / "common/quantsim_config/default_config_per_channel.json")
        shape = (1, 1, 28, 28)
        prepared = copy.deepcopy(inputs.model).eval()
        if equalize:
            equalize_model(prepared, input_shapes=shape)  # folds BatchNorm itself
        else:
            fold_all_batch_norms(prepared, input_shapes=shape)
        if adaround:
            parameters = AdaroundParameters(
                data_loader=inputs.calibration, num_batches=len(inputs.calibration),
                default_num_iterations=AIMET_ADAROUND_ITERATIONS, forward_fn=lambda module, batch: module(batch),
            )  # fmt: skip
            with quiet():
                prepared = Adaround.apply_adaround(
                    prepared, torch.zeros(shape), parameters, path=str(inputs.scratch), filename_prefix="adaround",
                    default_param_bw=weight_bits, default_quant_scheme=quant_scheme[scheme],
                    default_config_file=config_file,
                )  # fmt: skip
        sim = QuantizationSimModel(
            prepared, torch.zeros(shape), quant_scheme=quant_scheme[scheme], default_param_bw=weight_bits,
            default_output_bw=act_bits, config_file=config_file,
        )  # fmt: skip
        if adaround:
            sim.set_and_freeze_param_encodings(str(inputs.scratch / "adaround.encodings"))

        def calibrate(quantized: nn.Module) -> None:
            with torch.no_grad():
                for batch in inputs.calibration:
                    quantized(batch)

        with quiet():
            sim.compute_encodings(calibrate)
        return torch_evaluator(sim.model)

    return run


# --- Brevitas ------------------------------------------------------------------------------------


def brevitas(bias_correction: bool = False, gptq: bool = False, activations: str = "sym") -> Runner:
    def run(inputs: Inputs, weight_bits: int, act_bits: int) -> Evaluator:
        from brevitas.graph.quantize import preprocess_for_quantize
        from brevitas_examples.imagenet_classification.ptq import ptq_common

        # as its ImageNet example does: trace, fold BatchNorm into the convolutions, then quantize
        with quiet():
            traced = preprocess_for_quantize(copy.deepcopy(inputs.model).eval())
        quantized = ptq_common.quantize_model(
            traced, backend="layerwise", weight_bit_width=weight_bits,
            act_bit_width=act_bits, bias_bit_width=32, weight_quant_granularity="per_channel",
            act_quant_percentile=99.999, act_quant_type=activations, scale_factor_type="float_scale",
            quant_format="int",
            layerwise_first_last_bit_width=weight_bits,
        )  # fmt: skip
        loader = [(batch, torch.zeros(len(batch), dtype=torch.long)) for batch in inputs.calibration]
        with quiet(), torch.no_grad():
            quantized(inputs.calibration[0])  # initializes the weight quantizers, as its example does
            ptq_common.calibrate(loader, quantized)
            if gptq:
                ptq_common.apply_gptq(loader, quantized, create_weight_orig=True)
            if bias_correction:
                ptq_common.apply_bias_correction(loader, quantized)
        return torch_evaluator(quantized)

    return run


# --- NNCF ----------------------------------------------------------------------------------------


def nncf_int8(inputs: Inputs, weight_bits: int, act_bits: int) -> Evaluator:
    if (weight_bits, act_bits) != (8, 8):
        raise CannotRun("nncf.quantize has INT8 presets only (its 4-bit mode compresses LLMs' weights only)")
    import nncf
    import onnx

    images = torch.cat(inputs.calibration)
    dataset = nncf.Dataset([images[i : i + 1].numpy() for i in range(len(images))], lambda x: {"input": x})
    with quiet():
        quantized = nncf.quantize(onnx.load_from_string(inputs.float_onnx), dataset, subset_size=len(images))
    return onnx_evaluator(quantized.SerializeToString())


# --- ONNX Runtime --------------------------------------------------------------------------------


def onnxruntime_static(method: str) -> Runner:
    def run(inputs: Inputs, weight_bits: int, act_bits: int) -> Evaluator:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        types = {8: (QuantType.QInt8, QuantType.QUInt8), 4: (QuantType.QInt4, QuantType.QUInt4)}
        if weight_bits not in types or act_bits not in types:
            raise CannotRun("ONNX Runtime's integer types are 16, 8 and 4 bits")

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter(inputs.calibration)

            def get_next(self) -> dict | None:
                batch = next(self.batches, None)
                return None if batch is None else {"input": batch.numpy()}

        source, target = inputs.scratch / "float.onnx", inputs.scratch / "quantized.onnx"
        source.write_bytes(inputs.float_onnx)
        with quiet():
            quantize_static(
                str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                weight_type=types[weight_bits][0], activation_type=types[act_bits][1],
                calibrate_method=getattr(CalibrationMethod, method),
            )  # fmt: skip
        return onnx_evaluator(target.read_bytes())

    return run


# --- torchao PT2E --------------------------------------------------------------------------------


def torchao_pt2e(inputs: Inputs, weight_bits: int, act_bits: int) -> Evaluator:
    if (weight_bits, act_bits) != (8, 8):
        raise CannotRun("X86InductorQuantizer is int8 only")
    from bench.bench_pt2e import pt2e_model

    return torch_evaluator(pt2e_model(inputs.model, inputs.calibration))


SETTINGS: tuple[Setting, ...] = (
    Setting("lab", "default (nearest rounding)", lab()),
    Setting("lab", "min/max ranges (the peers' calibration)", lab(observer="minmax", weight_range="minmax")),
    Setting("lab", "equalization + AdaRound + bias correction", lab(THREE_METHODS)),
    Setting("lab", "asymmetric weights (4 levels at 2 bits, as Brevitas's)", lab(scheme="asymmetric")),
    Setting("lab", "block reconstruction", lab(("block-reconstruction",))),
    Setting("lab", "block reconstruction, asymmetric weights", lab(("block-reconstruction",), scheme="asymmetric")),
    Setting(LAB_UNDER_PEERS, "float adds (Brevitas's and torchao's)", lab(add_bits=16)),
    Setting(LAB_UNDER_PEERS, "float adds, percentile ranges (Brevitas's)", lab(observer="percentile", add_bits=16)),
    Setting(LAB_UNDER_PEERS, "float adds, block reconstruction", lab(("block-reconstruction",), add_bits=16)),
    Setting(
        LAB_UNDER_PEERS,
        "float adds, block reconstruction, asymmetric weights",
        lab(("block-reconstruction",), scheme="asymmetric", add_bits=16),
    ),
    Setting("AIMET", "min_max", aimet("min_max")),
    Setting("AIMET", "tf_enhanced", aimet("tf_enhanced")),
    Setting("AIMET", "tf_enhanced + CLE", aimet("tf_enhanced", equalize=True)),
    Setting("AIMET", "tf_enhanced + AdaRound", aimet("tf_enhanced", adaround=True)),
    Setting("Brevitas", "calibration", brevitas()),
    Setting("Brevitas", "calibration + bias correction", brevitas(bias_correction=True)),
    Setting("Brevitas", "calibration + GPTQ", brevitas(gptq=True)),
    Setting("Brevitas", "asymmetric activations", brevitas(activations="asym")),
    Setting("Brevitas", "asymmetric activations + GPTQ", brevitas(gptq=True, activations="asym")),
    Setting("NNCF", "nncf.quantize INT8", nncf_int8),
    Setting("ONNX Runtime", "quantize_static MinMax", onnxruntime_static("MinMax")),
    Setting("ONNX Runtime", "quantize_static Entropy", onnxruntime_static("Entropy")),
    Setting("ONNX Runtime", "quantize_static Percentile", onnxruntime_static("Percentile")),
    Setting("torchao", "PT2E X86InductorQuantizer", torchao_pt2e),
)
assert {s.tool for s in SETTINGS} == set(TOOLS)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The peers print progress bars and warnings by the hundred; the bench prints one line a cell."""
    with warnings.catch_warnings(), open(os.devnull, "w") as null:
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            with contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
                yield
        finally:
            logging.disable(logging.NOTSET)


def measure_cell(setting: Setting, inputs: Inputs, weight_bits: int, act_bits: int) -> dict[str, object]:
    """One tool at one setting and bit-width: validation and test accuracy in percent and its seconds,
    or why it could not run (a peer's own error, one line, is a result too)."""
    started = time.perf_counter()
    try:
        with quiet():
            accuracy_of = setting.run(inputs, weight_bits, act_bits)
            seconds = time.perf_counter() - started
            return {
                "validation_accuracy": round(100 * accuracy_of(inputs.validation), 2),
                "accuracy": round(100 * accuracy_of(inputs.test), 2),
                "seconds": round(seconds, 1),
            }
    except CannotRun as reason:
        return {"why": str(reason)}
    except ImportError as error:
        return {"why": f"not installed ({error.name}): pip install -r requirements-peers.txt"}
    except Exception as error:  # noqa: BLE001 - a peer failing on a setting is a measurement: record it
        return {"why": f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"}


def best_rows(rows: list[dict[str, object]], bits: list[str]) -> list[dict[str, object]]:
    """Each tool's best setting per column, by validation accuracy (the test set chooses nothing)."""
    best = []
    for tool in TOOLS:
        cells: dict[str, dict[str, object]] = {}
        for label in bits:
            measured = [
                {**row["cells"][label], "setting": row["setting"]}  # type: ignore[index]
                for row in rows
                if row["tool"] == tool and "accuracy" in row["cells"][label]  # type: ignore[index]
            ]
            if measured:
                cells[label] = max(measured, key=lambda cell: float(cell["validation_accuracy"]))
            else:
                reasons = [row["cells"][label]["why"] for row in rows if row["tool"] == tool]  # type: ignore[index]
                cells[label] = {"why": reasons[0] if reasons else "not run"}
        if any(row["tool"] == tool for row in rows):
            best.append({"tool": tool, "setting": "best on validation", "cells": cells})
    return best


def measure_model(
    name: str,
    bits: list[str],
    tools: list[str],
    test_images: int | None = None,
    settings: tuple[Setting, ...] = SETTINGS,
) -> dict[str, object]:
    spec = zoo_model(name)
    measured_at = commit()  # one git call a model: every row of this run is of the same code
    data = load_dataset(spec.dataset, download=False)
    model = load_model(None, name).eval()
    config = QuantConfig()
    test = data.test if test_images is None else data.test.subset(test_images)
    inputs = Inputs(model, calibration_data(data.train, config), validation_split(data.train, config), test)
    if set(tools) & {"NNCF", "ONNX Runtime"}:
        inputs.float_onnx = float_onnx(model, opset=21)  # ONNX Runtime's 4-bit Q/DQ types need 21
    torch.manual_seed(0)
    float_accuracy = round(100 * evaluate(model, test).accuracy, 2)
    print(f"{name}: float {float_accuracy:.2f}% on {len(test)} test images", flush=True)
    rows = []
    for setting in settings:
        if setting.tool not in tools:
            continue
        cells = {}
        for label in bits:
            torch.manual_seed(0)
            cells[label] = measure_cell(setting, inputs, *BITS[label])
            cell = cells[label]
            shown = f"{cell['accuracy']:6.2f}%  {cell['seconds']:6.1f} s" if "accuracy" in cell else cell["why"]
            print(f"  {setting.tool:12} {setting.name:45.45} {label}  {shown}", flush=True)
        rows.append({"tool": setting.tool, "setting": setting.name, "commit": measured_at, "cells": cells})
    return {
        "model": name,
        "dataset": spec.dataset,
        "float_accuracy": float_accuracy,
        "test_images": len(test),
        "calibration_images": sum(len(batch) for batch in inputs.calibration),
        "validation_images": len(inputs.validation),
        "commit": measured_at,
        "rows": rows,
        "best": best_rows(rows, bits),
    }


def merged(shipped: dict[str, object], measured: dict[str, object], tools: list[str]) -> dict[str, object]:
    """The shipped result with the measured tools' rows replaced (the others stay, with the commit they
    were measured at) and each tool's best chosen again: re-measuring one tool need not re-run the rest.
    Only for the same images: the test, calibration and validation counts must match."""
    for key in ("model", "test_images", "calibration_images", "validation_images"):
        if shipped.get(key) != measured[key]:
            raise SystemExit(f"--merge: the shipped result's {key} is {shipped.get(key)!r}, not {measured[key]!r}")
    kept = [row for row in shipped["rows"] if row["tool"] not in tools]  # type: ignore[union-attr]
    for row in kept:
        row.setdefault("commit", shipped["commit"])  # rows from before rows had their own
    rows = kept + measured["rows"]  # type: ignore[operator]
    rows.sort(key=lambda row: TOOLS.index(row["tool"]))  # type: ignore[arg-type]
    bits = [label for label in BITS if all(label in row["cells"] for row in rows)]  # type: ignore[index]
    commits = sorted({str(row["commit"]) for row in rows})
    return {**shipped, "commit": ", ".join(commits), "rows": rows, "best": best_rows(rows, bits)}


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def table(result: dict[str, object]) -> str:
    """Markdown: each tool's best on validation, test accuracy per column (the setting it chose)."""
    bits = list(result["best"][0]["cells"]) if result["best"] else []  # type: ignore[index]
    lines = [
        f"{result['model']} (float {result['float_accuracy']:.2f}%)",
        "| tool | " + " | ".join(bits) + " |",
        "| --- |" + " --- |" * len(bits),
    ]
    for row in result["best"]:  # type: ignore[union-attr]
        shown = []
        for label in bits:
            cell = row["cells"][label]
            shown.append(f"{cell['accuracy']:.2f}% ({cell['setting']})" if "accuracy" in cell else "n/a")
        lines.append(f"| {row['tool']} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def summary_table(results: list[dict[str, object]]) -> str:
    """Markdown, one row per model: per column the lab's best recipe and the best peer's, test accuracy,
    each chosen on validation images (the README's table)."""
    bits = [label for label in BITS if all(label in result["best"][0]["cells"] for result in results)]  # type: ignore[index]
    lines = ["| model (float) | " + " | ".join(bits) + " |", "| --- |" + " --- |" * len(bits)]
    for result in results:
        best = {row["tool"]: row["cells"] for row in result["best"]}  # type: ignore[union-attr]
        shown = []
        for label in bits:
            lab = best[LAB][label]
            peers = [
                (cells[label]["accuracy"], tool)
                for tool, cells in best.items()
                if tool in PEERS and "accuracy" in cells[label]
            ]
            top, tool = max(peers) if peers else (None, "")
            text = f"lab {lab['accuracy']:.2f}%"
            if top is not None:
                text += f", {tool} {top:.2f}% ({lab['accuracy'] - top:+.2f})"
            shown.append(text)
        lines.append(f"| {result['model']} ({result['float_accuracy']:.2f}%) | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=list(ZOO))
    parser.add_argument("--bits", default=",".join(BITS), help=f"from {','.join(BITS)}")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"from {','.join(TOOLS)}")
    parser.add_argument("--test-images", type=int, help="the first N test images only (a quick look; not shipped)")
    parser.add_argument("--ship", action="store_true", help="write each model's result beside its checkpoint")
    parser.add_argument(
        "--merge", action="store_true", help="with --ship: replace only the measured tools' rows in the shipped result"
    )
    parser.add_argument(
        "--tables", action="store_true", help="measure nothing: print the docs' tables from the shipped results"
    )
    parser.add_argument("--json-out", help="also write the JSON here")
    args = parser.parse_args()
    bits, tools = args.bits.split(","), args.tools.split(",")
    unknown = [b for b in bits if b not in BITS] + [t for t in tools if t not in TOOLS]
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)}")
    if args.ship and args.test_images:
        parser.error("--ship needs the full test set")
    if args.merge and not args.ship:
        parser.error("--merge only changes what --ship writes")
    if args.tables:
        shipped = [json.loads(peers_path(name).read_text()) for name in args.models if peers_path(name).is_file()]
        print("\n\n".join([summary_table(shipped), *(table(result) for result in shipped)]))
        return
    results = []
    for name in args.models:
        result = measure_model(name, bits, tools, args.test_images)
        print(table(result), flush=True)
        if args.merge and peers_path(name).is_file():
            result = merged(json.loads(peers_path(name).read_text()), result, tools)
        if args.ship:
            peers_path(name).write_text(json.dumps(result, indent=1) + "\n")
        results.append(result)
    emit({"bench": "peers", "results": results}, args.json_out)


if __name__ == "__main__":
    main()
