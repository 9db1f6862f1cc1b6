"""`data` and `models`: the datasets' files checked, the zoo listed."""

from __future__ import annotations

import argparse

from qcore.cli.common import (
    UsageError,
    add_common,
    percent,
    table,
)
from qcore.data import (
    DATASETS,
    data_dir,
    load_dataset,
)
from qcore.models.checkpoint import (
    load_model,
)
from qcore.models.zoo import DEFAULT_MODEL, ZOO


def add_data(commands: argparse._SubParsersAction) -> None:
    """`data`: check a dataset's files."""
    data_cmd = commands.add_parser("data", help="check a dataset's files (every idx file validated)")
    data_cmd.add_argument(
        "--download", action="store_true", help="fetch it with torchvision first when files are missing (online)"
    )
    data_cmd.add_argument("--dataset", choices=list(DATASETS), default="mnist")
    add_common(data_cmd, model=False)
    data_cmd.set_defaults(run=cmd_data)


def add_models(commands: argparse._SubParsersAction) -> None:
    """`models`: the model zoo."""
    models_cmd = commands.add_parser("models", help="the model zoo: each model's dataset, accuracy, size and ops")
    add_common(models_cmd, model=False)
    models_cmd.set_defaults(run=cmd_models)


def add_peers(commands: argparse._SubParsersAction) -> None:
    """`peers`: what the tools engineers use instead measured on a zoo model, beside the lab."""
    peers_cmd = commands.add_parser(
        "peers",
        help="a zoo model quantized by AIMET, Brevitas, NNCF, ONNX Runtime and torchao beside the lab "
        "(bench/bench_peers.py's shipped result)",
    )
    peers_cmd.add_argument("--model", choices=list(ZOO), default=DEFAULT_MODEL, help="the zoo model")
    peers_cmd.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    peers_cmd.set_defaults(run=cmd_peers, data_dir=None, checkpoint=None)


def cmd_peers(args: argparse.Namespace) -> dict[str, object]:
    from qcore.models.peers import comparison_rows, peer_comparison

    comparison = peer_comparison(args.model)
    if comparison is None:
        raise UsageError(f"no peers result is shipped for {args.model}: run bench/bench_peers.py --ship")
    rows = comparison_rows(comparison)
    if not args.json:
        print(
            f"{args.model} (float {comparison.float_accuracy:.2f}%), each tool's best setting per column chosen on "
            f"validation images; test accuracy (bench/bench_peers.py at {comparison.commit}):"
        )
        print(table(rows))
    return {"model": args.model, "float_accuracy": comparison.float_accuracy, "commit": comparison.commit, "rows": rows}


def cmd_data(args: argparse.Namespace) -> dict[str, object]:
    folder = data_dir(args.data_dir).resolve()
    data = load_dataset(args.dataset, folder, download=args.download)
    summary = {
        "dataset": data.spec.name,
        "folder": str(folder),
        "train_images": len(data.train),
        "test_images": len(data.test),
    }
    if not args.json:
        print(f"{data.spec.title} in {folder}: {len(data.train)} training and {len(data.test)} test images, all valid")
    return summary


def cmd_models(args: argparse.Namespace) -> dict[str, object]:
    from qcore.graph import model_graph

    rows = []
    for spec in ZOO.values():
        model = load_model(None, spec.name)
        rows.append(
            {
                "name": spec.name,
                "dataset": spec.dataset,
                "float_accuracy": spec.float_accuracy,
                "parameters": sum(parameter.numel() for parameter in model.parameters()),
                "ops": model_graph(model).op_kinds(),
                "checkpoint": spec.checkpoint.name,
                "description": spec.description,
            }
        )
    if not args.json:
        shown = [{**row, "float_accuracy": percent(row["float_accuracy"]), "ops": ",".join(row["ops"])} for row in rows]
        print(
            table(
                [{key: row[key] for key in ("name", "dataset", "float_accuracy", "parameters", "ops")} for row in shown]
            )
        )
    return {"models": rows}
