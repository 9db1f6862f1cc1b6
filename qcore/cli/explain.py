"""`diagnose`, `explain`, `graph` and `walkthrough`: why a config loses accuracy, one image through the
integers, the model graph, and the classic failures measured."""

from __future__ import annotations

import argparse
import sys

import torch

from qcore.cli.common import (
    UsageError,
    add_common,
    add_quant_flags,
    config_from_args,
    dataset_of,
    float_model_only,
    load_for_quantization,
    percent,
    require_integer_path,
    table,
    whole_number,
    write_output,
)
from qcore.data import Dataset
from qcore.files import check_output_path, shorten
from qcore.lessons.steps import OUTLIER_FACTORS
from qcore.quantize.config import QuantConfig


def add_diagnose(commands: argparse._SubParsersAction) -> None:
    """`diagnose`: per-layer damage and measured fixes."""
    diagnose_cmd = commands.add_parser(
        "diagnose", help="why accuracy dropped: per-layer damage, measured fixes, integer engine vs simulation"
    )
    add_quant_flags(diagnose_cmd)
    add_common(diagnose_cmd)
    diagnose_cmd.add_argument("--html", help="also write a self-contained HTML report to this file")
    diagnose_cmd.add_argument("--force", action="store_true", help="replace --html if it exists")
    diagnose_cmd.set_defaults(run=cmd_diagnose)


def add_explain(commands: argparse._SubParsersAction) -> None:
    """`explain`: one test image through the integer engine."""
    explain_cmd = commands.add_parser("explain", help="one test image through the integer engine, written out")
    add_quant_flags(explain_cmd)
    add_common(explain_cmd)
    explain_cmd.add_argument("--image", type=whole_number, required=True, help="test image index (0 to 9999)")
    explain_cmd.add_argument(
        "--layer", help="the layer or add whose --position is given (the notebook's net: conv1, conv2, fc1 or fc2)"
    )
    explain_cmd.add_argument(
        "--position", help="its output index, channel first: c,row,col for a conv or an add of maps, j for a linear"
    )
    explain_cmd.set_defaults(run=cmd_explain)


def add_graph(commands: argparse._SubParsersAction) -> None:
    """`graph`: the operations every path walks."""
    graph_cmd = commands.add_parser(
        "graph", help="the model graph every path walks: operations, shapes, quantization points, BatchNorm folding"
    )
    add_quant_flags(graph_cmd)
    add_common(graph_cmd)
    graph_cmd.add_argument(
        "--channel", type=whole_number, default=0, help="the output channel shown before and after folding"
    )
    graph_cmd.set_defaults(run=cmd_graph)


def add_walkthrough(commands: argparse._SubParsersAction) -> None:
    """`walkthrough`: a classic failure measured on the model."""
    walk_cmd = commands.add_parser(
        "walkthrough",
        help="a classic failure measured on the model: BatchNorm folding, residual requantization, or an outlier",
    )
    walk_cmd.add_argument("failure", choices=["folding", "residual", "outliers"])
    walk_cmd.add_argument(
        "--outlier-in",
        choices=["weights", "calibration"],
        default="weights",
        help="outliers: the first linear layer's largest weight, or one calibration image (default weights)",
    )
    walk_cmd.add_argument(
        "--factor", type=float, choices=OUTLIER_FACTORS, default=50.0, help="outliers: multiplied by this"
    )
    add_quant_flags(walk_cmd)
    add_common(walk_cmd)
    walk_cmd.set_defaults(run=cmd_walkthrough)


def cmd_diagnose(args: argparse.Namespace) -> dict[str, object]:
    from qcore.analysis.diagnose import diagnose
    from qcore.analysis.report import diagnosis_html
    from qcore.models.checkpoint import fingerprint

    config = config_from_args(args)
    out = check_output_path(args.html, args.force) if args.html else None
    model = float_model_only(args, "diagnose")
    data = dataset_of(args)

    def report(done: int, total: int, what: str) -> None:
        print(f"[{done}/{total}] {what}", file=sys.stderr)

    result = diagnose(model, data, config, on_progress=report)
    if out is not None:
        name = shorten(args.checkpoint) if args.checkpoint else f"bundled {args.model}"
        write_output(out, "--html", diagnosis_html(result, name, fingerprint(model)).encode())
    summary = result.to_dict()
    if not args.json:
        print(
            f"float accuracy {percent(result.float_accuracy)}  quantized {percent(result.quant_accuracy)}"
            f"  ({100 * (result.quant_accuracy - result.float_accuracy):+.2f} points)"
        )
        print(table(summary["layers"]))  # type: ignore[arg-type]
        for suggestion in result.suggestions:
            print(f"try: {suggestion.text}: {percent(suggestion.accuracy)} ({suggestion.gain_points:+.2f} points)")
        gap = result.engine_gap
        if gap.available:
            print(f"integer engine vs simulation: {len(gap.disagreeing_images)} test images predicted differently")
        if out is not None:
            print(f"wrote {out}")
    return summary


def _position(text: str | None, layer_name: str | None, shapes: dict[str, tuple[int, ...]]) -> dict[str, list[int]]:
    if text is None and layer_name is None:
        return {}
    if text is None or layer_name is None:
        raise UsageError("--layer and --position go together")
    if layer_name not in shapes:
        raise UsageError(f"--layer must be one of {', '.join(shapes)} (got {shorten(layer_name)!r})")
    try:
        position = [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--position: expected integers like 3,10,12 (got {shorten(text)!r})") from None
    expected = len(shapes[layer_name])
    if len(position) != expected:
        raise UsageError(f"--position for {layer_name} has {expected} number(s), channel first")
    return {layer_name: position}


def cmd_explain(args: argparse.Namespace) -> dict[str, object]:
    from qcore.graph import model_graph
    from qcore.lessons.walk import LayerWalk, LookupWalk, explain, walk_shapes

    if not 0 <= args.image <= 9999:
        raise UsageError(f"--image must be between 0 and 9999 (got {args.image})")
    model, trained = load_for_quantization(args, "explain")
    positions = _position(args.position, args.layer, walk_shapes(model_graph(model)))
    config = config_from_args(args) if trained is None else trained.config
    require_integer_path("explain (the integer engine)", config)
    data = dataset_of(args)
    try:
        walk = explain(model, data, config, args.image, positions, qnet=None if trained is None else trained.qnet)
    except ValueError as error:
        raise UsageError(str(error)) from error
    if not args.json:
        print(
            f"test image {walk.image}: label {walk.label}, "
            f"integer prediction {walk.prediction}, float {walk.float_prediction}"
        )
        steps = {step.name: step for step in [*walk.layers, *walk.adds, *walk.lookups]}
        for name in walk.order:
            step = steps[name]
            if isinstance(step, LookupWalk):
                print(
                    f"{step.name} at {step.position}: {step.function} by table, input level {step.input_level} "
                    f"({step.input_real:.6g}) -> entry {step.output_level} ({step.output_real:.6g}; "
                    f"{step.function} gives {step.activation_real:.6g}), {step.table_size} entries"
                )
            elif isinstance(step, LayerWalk):
                print(
                    f"{step.name} at {step.position}: {len(step.terms)} terms, "
                    f"accumulator {step.accumulator} (bias {step.bias}), M0 {step.multiplier} "
                    f"shift {step.shift} (M = {step.real_multiplier:.9g}), output {step.output}"
                )
            else:
                print(
                    f"{step.name} at {step.position}: inputs {step.input_values} (zero points "
                    f"{step.input_zero_points}), rescaled {step.rescaled}, sum {step.total}, M0 {step.multiplier} "
                    f"shift {step.shift}, output {step.output}"
                )
        print(f"int32 logits: {walk.logits_int32}")
    return walk.to_dict()


def cmd_graph(args: argparse.Namespace) -> dict[str, object]:
    from qcore.graph import batchnorm_folding, model_graph
    from qcore.quantize.qmodel import config_plan

    model, trained = load_for_quantization(args, "graph")
    config = config_from_args(args) if trained is None else trained.config
    graph = model_graph(model)
    plan = config_plan(graph, config)
    rows = []
    for op in graph.ops:
        if op.name in plan.points:
            where = "point (own scale and zero point)"
        elif op.name in plan.grid:
            where = f"on {plan.grid[op.name]}'s grid"
        else:
            where = ""
        rows.append(
            {
                "op": op.name,
                "kind": op.kind.value,
                "reads": ", ".join(op.inputs),
                "shape": "x".join(map(str, op.shape[1:])),
                "quantized": where,
                "batchnorm folded": graph.folded_batchnorm.get(op.name, ""),
            }
        )
    folds = []
    for layer in graph.folded_batchnorm:
        channels = graph.weight(layer).shape[0]
        if not 0 <= args.channel < channels:
            raise UsageError(f"--channel must be between 0 and {channels - 1} for {layer} (got {args.channel})")
        folds.append(batchnorm_folding(model, layer, args.channel).to_dict())
    if not args.json:
        print(table(rows))
        if not folds:
            print("BatchNorm: none in this model, so nothing is folded")
        for fold in folds:
            print(
                f"{fold['layer']} <- {fold['batchnorm']}, channel {fold['channel']}: weights x {fold['factor']:.4g} "
                f"(gamma / sqrt(var + eps)), bias {fold['bias_before']:.4g} -> {fold['bias_after']:.4g}; "
                f"per-channel weight range spread (largest / smallest) {fold['spread_before']:.3g} -> "
                f"{fold['spread_after']:.3g}"
            )
    return {"config": config.to_dict(), "ops": rows, "points": list(plan.points), "batchnorm_folding": folds}


def cmd_walkthrough(args: argparse.Namespace) -> dict[str, object]:
    from qcore.analysis.tables import quantize_for
    from qcore.graph import OpKind, model_graph
    from qcore.lessons.failures import folding_conclusion, folding_walkthrough, granularity_table, residual_adds

    config = config_from_args(args)
    model = float_model_only(args, f"walkthrough {args.failure}")
    # checked on the graph before any computation, naming the model the user gave (an ONNX file is not --model)
    name = "the imported ONNX model" if args.imported is not None else args.model
    graph = model_graph(model)
    if args.failure == "residual" and not any(op.kind is OpKind.ADD for op in graph.ops):
        raise UsageError(f"{name} has no residual add (try fashion-resnet)")
    if args.failure == "folding" and not graph.folded_batchnorm:
        raise UsageError(f"{name} has no BatchNorm to fold (try fashion-mobilenet or fashion-resnet)")
    data = dataset_of(args)
    if args.failure == "outliers":
        return _walk_outliers(model, data, config, args)
    if args.failure == "residual":
        adds = residual_adds(quantize_for(model, data, config), data)
        if not adds:
            raise UsageError(f"{name} has no residual add with quantized inputs at this config")
        rows = [
            {
                "add": row.add,
                "inputs": " + ".join(row.inputs),
                "input scales": " , ".join(f"{s:.4g}" for s in row.input_scales),
                "output scale": row.output_scale,
                "shared scale": row.shared_scale,
                "SQNR own grids (dB)": row.sqnr_own_db,
                "SQNR shared grid (dB)": row.sqnr_shared_db,
            }
            for row in adds
        ]
        if not args.json:
            print(f"residual adds at A{config.act_bits}, output SQNR on the first test images:")
            print(table(rows))
        return {"config": config.to_dict(), "adds": [row.__dict__ | {"scale_ratio": row.scale_ratio} for row in adds]}

    def report(done: int, total: int, what: str) -> None:
        print(f"[{done + 1}] {what}", file=sys.stderr)

    walk = folding_walkthrough(model, data, config, on_progress=report)
    if not args.json:
        print(table([layer.__dict__ for layer in walk.layers]))
        print(table(granularity_table(walk)))
        print(folding_conclusion(walk))
        print("weights' ranges are their min/max (Nagel et al.'s setting) except in the MSE column")
    return {"config": config.to_dict(), **walk.to_dict()}


def _walk_outliers(
    model: torch.nn.Module, data: Dataset, config: QuantConfig, args: argparse.Namespace
) -> dict[str, object]:
    """The Outliers lesson's table and conclusion (its measurements: qcore.lessons.steps.outlier_lesson)."""
    from qcore.lessons.steps import outlier_conclusion, outlier_lesson

    rows = outlier_lesson(model, data, config, args.outlier_in, args.factor)
    conclusion = outlier_conclusion(rows)
    if not args.json:
        print(
            table(
                [
                    {
                        "setting": r.setting,
                        "outlier": "yes" if r.with_outlier else "no",
                        "levels in the typical range": r.levels_in_typical_range,
                        "SQNR (dB)": round(r.sqnr_db, 2),
                        "accuracy": percent(r.accuracy),
                        "float, same outlier": percent(r.float_accuracy),
                        "quantization's cost (points)": round(r.quantization_cost, 2),
                    }
                    for r in rows
                ]
            )
        )
        print(conclusion)
    return {"config": config.to_dict(), "rows": [r.__dict__ for r in rows], "conclusion": conclusion}
