"""`data` and `models`: the datasets' files checked, the zoo listed."""

from __future__ import annotations

import argparse

from qcore.cli.common import (
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
from qcore.models.zoo import ZOO


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
