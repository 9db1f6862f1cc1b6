"""Every zoo model, measured the same way on its own full test set: docs/models.md's zoo table.

For each model: float accuracy; PTQ at W8A8, W6A6, W4A4, W3A3 (the default config: per-channel
symmetric MSE weights, MSE activations, 16 calibration batches of 64); W4A4 and W2A4 with the PTQ
methods (equalization, AdaRound, bias correction); per-tensor against per-channel at W8A8; QAT at W4A4
and W2A2 (LSQ, 2 epochs), and W2A2 with the first and last layers and the residual adds at 8 bits (LSQ's
convention), beside the control (the same fine-tuning without quantizers; one per model, since it has no
bits); the integer engine's agreement with the simulation at W8A8 to W4A4 and for each QAT model.
Prints a table per model and one JSON object; --json-out also writes it (after each model, so a long
run keeps what it measured).

    QCORE_DATA_DIR=../shared/data python bench/bench_zoo.py --json-out bench/results/zoo.json
    python bench/bench_zoo.py --models fashion-mobilenet --skip-qat   # quicker: PTQ rows only
    python bench/bench_zoo.py --models fashion-resnet --qat-bits W2A2:edges8:adds8   # one QAT row and the control

QAT's recipe here: LSQ, 2 epochs, Adam at lr 2e-3 with a cosine decay, batch 128 (the CLI's and the
app's defaults are lr 1e-3 and batch 256; on fashion-resnet at W2A2 with 8-bit edges, these scored
89.38% (batch 128) and 89.65% (lr 2e-3 as well) against 88.96% for the defaults, one run each).

A QAT spec is W<w>A<a>, optionally followed by :edges<b> (the first and last layers at b bits) and
:adds<b> (the tensors that are no layer's input, a residual add's inputs, at b bits).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import emit  # noqa: E402
from qcore.analysis.tables import quantize_for  # noqa: E402
from qcore.data import load_dataset  # noqa: E402
from qcore.inference.evaluate import evaluate  # noqa: E402
from qcore.inference.integer import IntegerNet  # noqa: E402
from qcore.models.checkpoint import load_model  # noqa: E402
from qcore.models.zoo import ZOO, zoo_model  # noqa: E402
from qcore.quantize.config import QuantConfig  # noqa: E402
from qcore.training.qat import QatConfig, qat, qat_control  # noqa: E402

PTQ_BITS = ((8, 8), (6, 6), (4, 4), (3, 3))
METHOD_BITS = ((4, 4), (2, 4))
METHODS = ("equalization", "adaround", "bias-correction")
AGREEMENT_BITS = (8, 7, 6, 5, 4)
QAT_SPECS = "W4A4,W2A2,W2A2:edges8:adds8"


def measure(name: str, qat_configs: tuple[QatConfig, ...], skip_ptq: bool = False) -> dict[str, object]:
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
    for w, a in () if skip_ptq else PTQ_BITS:
        ptq(f"W{w}A{a}", weight_bits=w, act_bits=a)
    for w, a in () if skip_ptq else METHOD_BITS:
        ptq(f"W{w}A{a} methods", weight_bits=w, act_bits=a, methods=METHODS)
    if not skip_ptq:
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
    controls: dict[tuple[object, ...], float] = {}
    for config in qat_configs:
        rows.update(qat_rows(name, model, data, config, controls))
    rows["seconds"] = time.perf_counter() - started
    return rows


def qat_rows(
    name: str, model, data, config: QatConfig, controls: dict[tuple[object, ...], float] | None = None
) -> dict[str, object]:
    """QAT at `config` and the control (the same fine-tuning without quantizers), both on the test set,
    and how often the integer engine predicts as the trained model's simulation. The control has no
    bits, so `controls` keeps it for the next config with the same training settings."""
    began = time.perf_counter()
    bits = config.quant_config().bits_label
    trained = qat(model, data, config)
    simulated = evaluate(trained.qnet, data.test)
    integer = IntegerNet(trained.qnet).predict(data.test.images)
    rows: dict[str, object] = {
        f"QAT {bits}": simulated.accuracy,
        f"QAT {bits} seconds per epoch": trained.seconds_per_epoch,
        f"QAT {bits} integer agreement": float((integer == simulated.predictions).float().mean()),
    }
    controls = {} if controls is None else controls
    training = (config.epochs, config.lr, config.batch_size, config.seed, config.train_samples)
    if training not in controls:
        control = qat_control(model, data, config)
        controls[training] = evaluate(control.model, data.test).accuracy
        rows["QAT control"] = controls[training]
        rows["QAT control seconds per epoch"] = control.seconds_per_epoch
    rows[f"QAT {bits} drop vs control (points)"] = 100 * (controls[training] - simulated.accuracy)
    print(
        f"  {name} QAT {bits}: {100 * simulated.accuracy:.2f}%, control {100 * controls[training]:.2f}% "
        f"({time.perf_counter() - began:.0f} s)",
        file=sys.stderr,
    )
    return rows


def table(rows: dict[str, object]) -> str:
    percent = {k: v for k, v in rows.items() if isinstance(v, float) and "seconds" not in k and "points" not in k}
    points = {k: v for k, v in rows.items() if isinstance(v, float) and "points" in k}
    lines = [f"{rows['model']} ({rows['dataset']})"]
    lines += [f"  {key:<22} {100 * value:6.2f}%" for key, value in percent.items()]
    lines += [f"  {key:<22} {value:6.2f}" for key, value in points.items()]
    for bits, value in rows["integer agreement"].items():  # type: ignore[union-attr]
        lines.append(f"  {'integer = simulation ' + bits:<22} {100 * value:6.2f}%")
    return "\n".join(lines)


def qat_config(spec: str, batch_size: int, lr: float) -> QatConfig:
    """W2A2, W2A2:edges8, W2A2:edges8:adds8 as a 2-epoch LSQ QatConfig."""
    bits, *extras = spec.split(":")
    weight, _, act = bits.upper().removeprefix("W").partition("A")
    wide = {"edges": 0, "adds": 0}
    for extra in extras:
        key = extra.rstrip("0123456789")
        if key not in wide or not extra[len(key) :].isdigit():
            raise SystemExit(f"--qat-bits: {spec!r}: {extra!r} is not edges<bits> or adds<bits>")
        wide[key] = int(extra[len(key) :])
    if not (weight.isdigit() and act.isdigit()):
        raise SystemExit(f"--qat-bits: {spec!r} is not like W2A2")
    config = QatConfig(
        weight_bits=int(weight),
        act_bits=int(act),
        edge_bits=wide["edges"],
        add_bits=wide["adds"],
        epochs=2,
        batch_size=batch_size,
        lr=lr,
    )
    problems = config.problems()
    if problems:
        raise SystemExit(f"--qat-bits: {spec!r}: {'; '.join(problems)}")
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(ZOO), help="comma-separated zoo names")
    parser.add_argument("--skip-qat", action="store_true")
    parser.add_argument("--skip-ptq", action="store_true", help="no PTQ and methods rows (agreement and QAT only)")
    parser.add_argument("--qat-bits", default=QAT_SPECS, help="the QAT rows, comma-separated (see above)")
    parser.add_argument("--qat-batch-size", type=int, default=128, help="QAT's (and the control's) batch size")
    parser.add_argument("--qat-lr", type=float, default=2e-3, help="QAT's (and the control's) Adam lr")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    names = [name for name in args.models.split(",") if name]
    specs = () if args.skip_qat else [text for text in args.qat_bits.split(",") if text]
    qat_configs = tuple(qat_config(spec, args.qat_batch_size, args.qat_lr) for spec in specs)
    for name in names:
        zoo_model(name)  # every name checked before any work
    result: dict[str, object] = {"models": []}
    for name in names:
        rows = measure(name, qat_configs, args.skip_ptq)
        result["models"].append(rows)  # type: ignore[union-attr]
        print(table(rows), flush=True)
        if args.json_out:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(__import__("json").dumps(result, indent=2))
    emit(result, args.json_out)


if __name__ == "__main__":
    main()
