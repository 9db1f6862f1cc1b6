"""`evaluate`, `sweep` and `sensitivity`: accuracy measured for one config, by bit-width, by layer."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from qcore.cli.common import (
    UsageError,
    add_common,
    add_quant_flags,
    bits_list,
    config_from_args,
    dataset_of,
    float_model_only,
    load_for_quantization,
    percent,
    require_integer_path,
    table,
)
from qcore.export.deploy import ENGINES
from qcore.models.zoo import zoo_model
from qcore.quantize.config import ConfigError


def _add_measure(commands: argparse._SubParsersAction, name: str, text: str) -> argparse.ArgumentParser:
    command = commands.add_parser(name, help=text)
    add_quant_flags(command)
    add_common(command)
    return command


def add_evaluate(commands: argparse._SubParsersAction) -> None:
    """`evaluate`: one config's accuracy, float against quantized, on the engine asked for."""
    command = _add_measure(commands, "evaluate", "float vs quantized accuracy and per-layer details for one config")
    command.add_argument(
        "--engine",
        choices=list(ENGINES),
        default="simulate",
        help="the inference path whose quant_accuracy is reported",
    )
    command.set_defaults(run=cmd_evaluate)


def add_sweep(commands: argparse._SubParsersAction) -> None:
    """`sweep`: accuracy by bit-width."""
    command = _add_measure(commands, "sweep", "accuracy by bit-width")
    command.add_argument("--bits", type=bits_list, default=list(range(2, 9)), help="e.g. 2-8 or 2,4,8")
    command.add_argument("--target", choices=["both", "weights", "activations"], default="both")
    command.set_defaults(run=cmd_sweep)


def add_sensitivity(commands: argparse._SubParsersAction) -> None:
    """`sensitivity`: accuracy with one layer quantized at a time."""
    _add_measure(commands, "sensitivity", "accuracy with one layer quantized at a time").set_defaults(
        run=cmd_sensitivity
    )


def cmd_evaluate(args: argparse.Namespace) -> dict[str, object]:
    from qcore.analysis.tables import build_report

    model, trained = load_for_quantization(args, "evaluate")
    config = config_from_args(args) if trained is None else trained.config
    if args.engine in ("integer", "onnxruntime"):
        require_integer_path(f"--engine {args.engine}", config)
    if trained is not None and args.engine == "torch-int8":
        raise UsageError("--engine torch-int8 calibrates its own ranges, so it cannot run a QAT checkpoint's")
    data = dataset_of(args)
    report = build_report(model, data, config, qnet=None if trained is None else trained.qnet)
    checkpoint = args.checkpoint or str(zoo_model(args.model).checkpoint)
    result = {"checkpoint": checkpoint, "model": args.model, **report.to_dict(), "engine": args.engine}
    if args.imported is not None:
        result["model"] = "onnx"
        result["onnx"] = {
            key: getattr(args.imported, key)
            for key in ("producer", "opset", "nodes", "parameters", "dataset", "input_scale", "agreement_images")
        } | {
            "largest_difference": args.imported.largest_difference,
            "input_scale_chosen_by": "measured" if args.imported.scale_measured else "named",
            "input_scale_accuracies": dict(args.imported.scale_accuracies),
            "input_layout": list(args.imported.input_layout),
            "input_steps": list(args.imported.input_steps),
            "input_affine": list(args.imported.input_affine),
        }
    if trained is not None:
        result["qat"] = True  # quant_accuracy is the trained model's; float_accuracy its float weights'

    if args.engine != "simulate":
        from qcore.export.deploy import run_engine
        from qcore.inference.integer import IntegerEngineError

        try:
            engine = run_engine(args.engine, model, data, report.qnet, report.quant_result.predictions)
        except (IntegerEngineError, ValueError) as error:
            raise UsageError(f"--engine {args.engine}: {error}") from error
        result["simulated_accuracy"] = report.quant_result.accuracy
        result["quant_accuracy"] = engine.accuracy
        result["agreement_with_simulation"] = engine.agreement_with_simulation
        result["engine_seconds"] = engine.seconds
    if not args.json:
        if trained is not None:
            print(f"QAT checkpoint: its own quantization, {config.bits_label}, no calibration")
        print(f"config: {config.to_json()}")
        print(
            f"float accuracy {percent(report.float_result.accuracy)}"
            f"  quantized {percent(report.quant_result.accuracy)}"
            f"  difference {100 * -report.accuracy_drop:+.2f} points"
            f"  (loss {report.float_result.loss:.4f} -> {report.quant_result.loss:.4f})"
        )
        print(table([row.summary() for row in report.layers]))
        methods = report.qnet.methods
        if config.methods or config.weight_bits_budget:
            print(
                f"weight bits per layer: {methods.weight_bits}; method seconds: "
                + ", ".join(f"{k} {v:.1f}" for k, v in methods.seconds.items())
            )
        if methods.blocks:
            from qcore.analysis.tables import block_rows

            print("block reconstruction:")
            print(table(block_rows(methods.blocks)))
        if args.engine != "simulate":
            print(
                f"engine {args.engine}: accuracy {percent(result['quant_accuracy'])}, same prediction as the "
                f"simulation on {percent(result['agreement_with_simulation'])} of test images"
            )
    return result


def cmd_sweep(args: argparse.Namespace) -> dict[str, object]:
    from qcore.analysis.tables import bit_sweep
    from qcore.inference.evaluate import evaluate

    model, trained = load_for_quantization(args, "sweep")
    config = config_from_args(args)
    data = dataset_of(args)
    float_accuracy = evaluate(model, data.test).accuracy
    try:
        points = bit_sweep(model, data, config, args.bits, args.target)
    except ConfigError as error:
        raise UsageError(str(error)) from error
    rows = [asdict(point) for point in points]
    summary: dict[str, object] = {"config": config.to_dict(), "target": args.target, "float_accuracy": float_accuracy}
    if trained is not None:  # the PTQ sweep is of its float weights; the trained model is one more point
        summary["qat"] = {
            "weight_bits": trained.config.weight_bits,
            "act_bits": trained.config.act_bits,
            "accuracy": evaluate(trained.qnet, data.test).accuracy,
        }
    if not args.json:
        print(f"float accuracy {percent(float_accuracy)}; sweeping {args.target} over bits {args.bits} (PTQ)")
        print(table(rows))
        if trained is not None:
            qat = summary["qat"]
            assert isinstance(qat, dict)
            print(
                f"QAT checkpoint at W{qat['weight_bits']}A{qat['act_bits']}: {percent(qat['accuracy'])} "
                "(the sweep above calibrates its float weights afresh)"
            )
    return {**summary, "points": rows}


def cmd_sensitivity(args: argparse.Namespace) -> dict[str, object]:
    from qcore.analysis.tables import layer_sensitivity
    from qcore.inference.evaluate import evaluate

    config = config_from_args(args)
    model = float_model_only(args, "sensitivity")
    data = dataset_of(args)
    float_accuracy = evaluate(model, data.test).accuracy
    rows = [asdict(row) for row in layer_sensitivity(model, data, config, float_accuracy)]
    if not args.json:
        print(f"float accuracy {percent(float_accuracy)}; one layer quantized at a time")
        print(table(rows))
    return {"config": config.to_dict(), "float_accuracy": float_accuracy, "layers": rows}
