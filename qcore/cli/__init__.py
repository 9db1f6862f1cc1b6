"""`python -m qcore`: every command the dashboard has a page for, from the command line.

Every command prints readable tables, or one JSON object with --json. Bad flags, bad files and
missing data end with exit code 2 and a one-line error on stderr; every argument is checked before
any work starts. Files are written atomically and never replace an existing file without --force.
Ctrl-C exits 130 with one line and writes nothing.

One module per command group (training, measure, explain, search, catalog, export), each with its flags and
its run; this entry assembles them in the order --help lists them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from qcore.cli import catalog, explain, export, measure, prepare, search, training
from qcore.cli.common import Parser, UsageError, import_onnx_checkpoint
from qcore.data import DataError, data_dir
from qcore.files import OutputPathError, shorten
from qcore.graph import GraphError
from qcore.models.checkpoint import CheckpointError
from qcore.models.peers import PeersFileError
from qcore.models.zoo import UnknownModelError
from qcore.quantize.config import ConfigError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

# In --help's order
COMMANDS = (
    training.add_train,
    training.add_qat,
    measure.add_evaluate,
    measure.add_sweep,
    measure.add_sensitivity,
    explain.add_diagnose,
    search.add_auto,
    explain.add_explain,
    explain.add_graph,
    catalog.add_data,
    explain.add_walkthrough,
    catalog.add_models,
    catalog.add_peers,
    export.add_export,
    prepare.add_prepare,
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m qcore", description="Quantization Lab: quantizing small CNNs on MNIST and Fashion-MNIST"
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.data_dir is not None and not data_dir(args.data_dir).is_dir():
            raise UsageError(f"--data-dir {args.data_dir}: no such folder")
        import_onnx_checkpoint(args)
        result = args.run(args)
    except (
        UsageError,
        ConfigError,
        CheckpointError,
        DataError,
        OutputPathError,
        GraphError,
        UnknownModelError,
        PeersFileError,
    ) as error:
        print(f"qcore: error: {shorten(error, 1000)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("qcore: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as Unix tools do
        sys.stderr.close()
        return 0
    if args.json:
        print(json.dumps(result, default=str))
    return 0
