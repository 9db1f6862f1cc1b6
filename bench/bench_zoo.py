"""Every zoo model, measured the same way on its own full test set: the README's zoo table.

For each model: float accuracy; PTQ at W8A8, W6A6, W4A4, W3A3 (the default config: per-channel
symmetric MSE weights, MSE activations, 16 calibration batches of 64); W4A4 and W2A4 with the PTQ
methods (equalization, AdaRound, bias correction); per-tensor against per-channel at W8A8; QAT at W4A4
and W2A2 (LSQ, 2 epochs) beside its control (the same fine-tuning without quantizers); the integer
engine's agreement with the simulation at W8A8 and W4A4. Prints a table per model and one JSON object;
--json-out also writes it (after each model, so a long run keeps what it measured).

    QCORE_DATA_DIR=../shared/data python bench/bench_zoo.py --json-out bench/results/zoo.json
    python bench/bench_zoo.py --models fashion-mobilenet --skip-qat   # quicker: PTQ rows only
    python bench/bench_zoo.py --models fashion-resnet --qat-bits W2A2 # one QAT row and its control
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import emit  # noqa: E402
from qcore.analysis.tables import quantize_for  # noqa: E402
from qcore.config import QuantConfig  # noqa: E402
from qcore.data import load_dataset  # noqa: E402
from qcore.inference.evaluate import evaluate  # noqa: E402
from qcore.inference.integer import IntegerNet  # noqa: E402
from qcore.models.checkpoint import load_model  # noqa: E402
from qcore.models.zoo import ZOO, zoo_model  # noqa: E402
from qcore.training.qat import QatConfig, qat, qat_control  # noqa: E402

PTQ_BITS = ((8, 8), (6, 6), (4, 4), (3, 3))
METHOD_BITS = ((4, 4), (2, 4))
METHODS = ("equalization", "adaround", "bias-correction")
AGREEMENT_BITS = (8, 4)


def measure(name: str, qat_bits: tuple[tuple[int, int], ...]) -> dict[str, object]:
    spec = zoo_model(name)
    data = load_dataset(spec.dataset, download=False)
    model = load_model(None, name)
    rows: dict[str, object] = {"model": name, "dataset": spec.dataset}
    started = time.perf_counter()

    def ptq(label: str, **settings: object) -> float:
        began = time.perf_counter()
        accuracy = evaluate(quantize_for(model, data, QuantConfig(**settings)), data.test).accuracy  # type: ignore[arg-type]
        rows[label] = accuracy
        print(f"  {name} {label}: {100 * accuracy:.2f}% ({time.perf_counter() - began:.0f} s)", file=sys.stderr)
        return accuracy

    rows["float"] = evaluate(model, data.test).accuracy
    for w, a in PTQ_BITS:
        ptq(f"W{w}A{a}", weight_bits=w, act_bits=a)
    for w, a in METHOD_BITS:
        ptq(f"W{w}A{a} methods", weight_bits=w, act_bits=a, methods=METHODS)
    ptq("W8A8 per-tensor", granularity="per-tensor")
    agreement = {}
    for bits in AGREEMENT_BITS:
        qnet = quantize_for(model, data, QuantConfig(weight_bits=bits, act_bits=bits))
        simulated = evaluate(qnet, data.test).predictions
        began = time.perf_counter()
        integer = IntegerNet(qnet).predict(data.test.images)
        agreement[f"W{bits}A{bits}"] = float((integer == simulated).float().mean())
        rows[f"integer seconds W{bits}A{bits}"] = time.perf_counter() - began
    rows["integer agreement"] = agreement
    for w, a in qat_bits:
        rows.update(qat_rows(name, model, data, QatConfig(weight_bits=w, act_bits=a, epochs=2)))
    rows["seconds"] = time.perf_counter() - started
    return rows


def qat_rows(name: str, model, data, config: QatConfig) -> dict[str, object]:
    """QAT at `config` and its control (the same fine-tuning without quantizers), both on the test set."""
    began = time.perf_counter()
    bits = f"W{config.weight_bits}A{config.act_bits}"
    trained = qat(model, data, config)
    control = qat_control(model, data, config)
    rows = {
        f"QAT {bits}": evaluate(trained.qnet, data.test).accuracy,
        f"QAT {bits} control": evaluate(control.model, data.test).accuracy,
        f"QAT {bits} seconds per epoch": trained.seconds_per_epoch,
        f"QAT {bits} control seconds per epoch": control.seconds_per_epoch,
    }
    print(
        f"  {name} QAT {bits}: {100 * rows[f'QAT {bits}']:.2f}%, control "  # type: ignore[operator]
        f"{100 * rows[f'QAT {bits} control']:.2f}% ({time.perf_counter() - began:.0f} s)",  # type: ignore[operator]
        file=sys.stderr,
    )
    return rows


def table(rows: dict[str, object]) -> str:
    percent = {k: v for k, v in rows.items() if isinstance(v, float) and "seconds" not in k}
    lines = [f"{rows['model']} ({rows['dataset']})"]
    lines += [f"  {key:<22} {100 * value:6.2f}%" for key, value in percent.items()]
    for bits, value in rows["integer agreement"].items():  # type: ignore[union-attr]
        lines.append(f"  {'integer = simulation ' + bits:<22} {100 * value:6.2f}%")
    return "\n".join(lines)


def _bits(text: str) -> tuple[int, int]:
    weight, _, act = text.upper().removeprefix("W").partition("A")
    if not (weight.isdigit() and act.isdigit()):
        raise SystemExit(f"--qat-bits: {text!r} is not like W2A2")
    return int(weight), int(act)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(ZOO), help="comma-separated zoo names")
    parser.add_argument("--skip-qat", action="store_true")
    parser.add_argument("--qat-bits", default="W4A4,W2A2", help="the QAT rows, comma-separated (e.g. W2A2)")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    names = [name for name in args.models.split(",") if name]
    qat_bits = () if args.skip_qat else tuple(_bits(text) for text in args.qat_bits.split(",") if text)
    for name in names:
        zoo_model(name)  # every name checked before any work
    result: dict[str, object] = {"models": []}
    for name in names:
        rows = measure(name, qat_bits)
        result["models"].append(rows)  # type: ignore[union-attr]
        print(table(rows), flush=True)
        if args.json_out:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(__import__("json").dumps(result, indent=2))
    emit(result, args.json_out)


if __name__ == "__main__":
    main()
