"""`export`: the quantized model written as integer tensors or ONNX (QDQ)."""

from __future__ import annotations

import argparse

from qcore.cli.common import (
    UsageError,
    add_common,
    add_quant_flags,
    config_from_args,
    dataset_of,
    load_for_quantization,
    require_integer_path,
    write_output,
)
from qcore.files import check_output_path


def add_export(commands: argparse._SubParsersAction) -> None:
    """`export`: integer tensors or ONNX (QDQ)."""
    export = commands.add_parser("export", help="write the quantized model as integer tensors or ONNX (QDQ)")
    add_quant_flags(export)
    add_common(export)
    export.add_argument("--format", choices=["qtensors", "onnx"], required=True)
    export.add_argument("--out", required=True, help="file to write")
    export.add_argument("--force", action="store_true", help="replace --out if it exists")
    export.set_defaults(run=cmd_export)


def cmd_export(args: argparse.Namespace) -> dict[str, object]:
    from qcore.analysis.tables import quantize_for
    from qcore.export.formats import export_onnx_for, qtensors_bytes
    from qcore.inference.integer import IntegerEngineError, IntegerNet

    model, trained = load_for_quantization(args, "export")
    config = config_from_args(args) if trained is None else trained.config
    require_integer_path(f"export --format {args.format}", config)
    out = check_output_path(args.out, args.force)
    qnet = quantize_for(model, dataset_of(args), config) if trained is None else trained.qnet
    try:
        engine = IntegerNet(qnet)  # both formats: a model the integer engine cannot run is not exported
        if args.format == "qtensors":
            payload = qtensors_bytes(engine)
        else:  # an imported model's reads the file's own input
            payload = export_onnx_for(qnet, dataset_of(args).spec, args.imported)
    except (IntegerEngineError, ValueError) as error:
        raise UsageError(f"export {args.format}: {error}") from error
    write_output(out, "--out", payload)
    if not args.json:
        print(f"wrote {args.out} ({len(payload)} bytes, {args.format}) for {config.to_json()}")
    return {"out": args.out, "format": args.format, "bytes": len(payload), "config": config.to_dict()}
