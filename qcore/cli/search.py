"""`auto`: the smallest config within an accuracy budget, searched on a validation split, reported on the
test set."""

from __future__ import annotations

import argparse
import sys
import time

from qcore.analysis.auto import (
    DEFAULT_BUDGET_S,
    DEFAULT_MAX_DROP,
    MAX_BUDGET_S,
    MAX_POINTS,
    OBJECTIVES,
    SearchPoint,
    SearchResult,
    SearchSettings,
    auto_search,
    measure_on_test,
)
from qcore.cli.common import (
    UsageError,
    add_common,
    add_quant_flags,
    config_flags,
    config_from_args,
    dataset_of,
    float_model_only,
    percent,
    table,
    whole_number,
)
from qcore.inference.evaluate import evaluate


def add_auto(commands: argparse._SubParsersAction) -> None:
    """`auto`: the search, its frontier and its choice."""
    command = commands.add_parser(
        "auto",
        help="the smallest config within an accuracy budget (searched on training images, reported on the test set)",
    )
    add_quant_flags(command)
    add_common(command)
    command.add_argument(
        "--max-drop",
        type=float,
        default=DEFAULT_MAX_DROP,
        help="the most accuracy you accept to lose, in points below the float model (default 0.5)",
    )
    command.add_argument(
        "--objective",
        choices=list(OBJECTIVES),
        default="bytes",
        help="what to minimize: the weights' bytes, or the weights' and activations' average bits",
    )
    command.add_argument(
        "--integer-only",
        action="store_true",
        help="only configs an integer-only runtime can run (8 bits or fewer, nothing float)",
    )
    command.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"stop searching after this many seconds (default {DEFAULT_BUDGET_S:.0f}, at most {MAX_BUDGET_S:.0f})",
    )
    command.add_argument(
        "--max-configs", type=whole_number, default=MAX_POINTS, help=f"configs measured at most (1 to {MAX_POINTS})"
    )
    command.set_defaults(run=cmd_auto)


def point_summary(point: SearchPoint, test_accuracy: float | None) -> dict[str, object]:
    return {
        "label": point.label,
        "stage": point.stage,
        "config": point.config.to_dict(),
        "cli_flags": config_flags(point.config),
        "validation_accuracy": point.validation_accuracy,
        "test_accuracy": test_accuracy,
        "weight_bytes": point.weight_bytes,
        "average_weight_bits": point.average_weight_bits,
        "average_activation_bits": point.average_activation_bits,
        "found_after_seconds": point.elapsed,
    }


def cmd_auto(args: argparse.Namespace) -> dict[str, object]:
    settings = SearchSettings(args.max_drop, args.objective, args.integer_only, args.budget_s, args.max_configs)
    problems = settings.problems()
    if problems:
        raise UsageError("; ".join(problems))
    config = config_from_args(args)
    model = float_model_only(args, "auto")
    data = dataset_of(args)

    def report(point: SearchPoint, result: SearchResult) -> None:
        if not args.json:
            mark = "within" if result.within_budget(point) else "outside"
            print(
                f"[{len(result.points)}] {point.label}: validation {percent(point.validation_accuracy)} ({mark} the "
                f"budget), {point.weight_bytes} weight bytes, {point.seconds:.1f} s",
                file=sys.stderr,
            )

    try:
        result = auto_search(model, data, config, settings, on_point=report)
    except ValueError as error:
        raise UsageError(f"auto: {error}") from None
    started = time.monotonic()
    frontier, chosen = result.frontier, result.chosen
    tested = measure_on_test(model, data, frontier)  # the chosen point is on the frontier
    float_test = evaluate(model, data.test).accuracy
    summary: dict[str, object] = {
        "settings": settings.to_dict(),
        "float_accuracy": float_test,
        "float_validation_accuracy": result.float_validation_accuracy,
        "validation_images": result.validation_images,
        "float_weight_bytes": result.float_weight_bytes,
        "chosen": None if chosen is None else point_summary(chosen, tested[chosen.config.to_json()]),
        "frontier": [point_summary(p, tested[p.config.to_json()]) for p in frontier],
        "configs_measured": len(result.points),
        "points": [p.to_dict() for p in result.points],
        "stopped_by": result.stopped_by,
        "log": result.log,
        "seconds": result.seconds,
        "test_seconds": time.monotonic() - started,
    }
    if not args.json:
        print(
            f"float accuracy: test {percent(float_test)}, validation {percent(result.float_validation_accuracy)} "
            f"({result.validation_images} training images calibration never sees); budget: validation at least "
            f"{percent(result.target)}"
        )
        print(f"searched {len(result.points)} configs in {result.seconds:.0f} s ({result.stopped_by})")
        rows = [
            {
                "config": p.label,
                "validation": percent(p.validation_accuracy),
                "test": percent(tested[p.config.to_json()]),
                "weight bytes": p.weight_bytes,
                "avg weight bits": round(p.average_weight_bits, 2),
                "avg act bits": round(p.average_activation_bits, 2),
            }
            for p in frontier
        ]
        print("frontier (smallest first):")
        print(table(rows))
        if chosen is None:
            print("no config measured is within the budget")
        else:
            print(
                f"chosen: {chosen.label}: test {percent(tested[chosen.config.to_json()])} "
                f"(float {percent(float_test)}), {chosen.weight_bytes} weight bytes of {result.float_weight_bytes}"
            )
            model = ["--checkpoint", args.checkpoint] if args.checkpoint else ["--model", args.model]
            print("reproduce: python -m qcore evaluate " + " ".join([*model, *config_flags(chosen.config)]))
    return summary
