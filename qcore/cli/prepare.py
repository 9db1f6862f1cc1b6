"""`prepare`: everything a class will ask of one zoo model, computed ahead into the server's result store
(qcore.lessons.prepare does the work; this parses, prints progress and refuses in one line)."""

from __future__ import annotations

import argparse
import os
import re
import sys

from qcore.cli.common import UsageError, add_common, dataset_of
from qcore.lessons.prepare import StoreFailed, prepare_class
from qcore.models.checkpoint import bundled_identity, load_model
from qcore.quantize.config import QuantConfig
from qcore.store import STORE_ENV, ResultStore, StoreConfigError, checked_store_folder, store_size_bytes

BITS_LABEL = re.compile(r"W([2-8])A([2-8])")


def add_prepare(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser(
        "prepare",
        help="compute what a class will ask of a zoo model (the tour, the lessons, diagnoses) into the "
        "server's result store, ahead of the class",
    )
    add_common(command)
    command.add_argument(
        "--store",
        help=f"the result store's folder, as deploy/serve's --store (default: ${STORE_ENV})",
    )
    command.add_argument("--tour", action="store_true", help="the guided tour's steps")
    command.add_argument("--lessons", action="store_true", help="the lessons at the default settings")
    command.add_argument(
        "--diagnose",
        type=diagnose_configs,
        default=[],
        metavar="CONFIGS",
        help="diagnoses at these bit-widths, comma-separated, each W<weight bits>A<activation bits> with the "
        "other settings at their defaults (for example W4A4,W2A8)",
    )
    command.set_defaults(run=cmd_prepare)


def diagnose_configs(text: str) -> list[QuantConfig]:
    """'W4A4,W2A8' as configs; any other text is refused in one line."""
    configs = []
    for label in text.split(","):
        match = BITS_LABEL.fullmatch(label.strip())
        if match is None:
            raise argparse.ArgumentTypeError(
                f"{label.strip()[:20]!r} is not W<2-8>A<2-8> (a comma-separated list like W4A4,W2A8)"
            )
        configs.append(QuantConfig(weight_bits=int(match[1]), act_bits=int(match[2])))
    return configs


def cmd_prepare(args: argparse.Namespace) -> dict[str, object]:
    folder = args.store or os.environ.get(STORE_ENV, "").strip()
    if not folder:
        raise UsageError(f"prepare: name the server's result store with --store or ${STORE_ENV}")
    try:
        store = ResultStore(checked_store_folder(folder, "--store"), store_size_bytes())
    except StoreConfigError as error:
        raise UsageError(f"prepare: {error}") from None
    tour, lessons = args.tour, args.lessons
    if not (tour or lessons or args.diagnose):
        tour = lessons = True  # nothing named: what a class follows
    data = dataset_of(args)
    model = load_model(None, args.model)
    identity = bundled_identity(args.model, model)

    def show(done: int, total: int, what: str, stored_before: bool, seconds: float) -> None:
        state = "already in the store" if stored_before else f"computed in {seconds:.1f} s"
        print(f"[{done}/{total}] {what}: {state}", file=sys.stderr)

    try:
        prepared = prepare_class(
            store, identity, model, data, tour, lessons, args.diagnose, None if args.json else show
        )
    except StoreFailed as error:
        raise UsageError(f"prepare: {error}") from None
    if not args.json:
        print(
            f"prepared {args.model}: {len(prepared.log)} results in the store ({prepared.computed} computed now) "
            f"in {prepared.seconds:.0f} s"
        )
    return {"model": args.model, "identity": identity, "results": prepared.log, "seconds": prepared.seconds}
