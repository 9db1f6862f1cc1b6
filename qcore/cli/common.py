"""What every command shares: the usage error, the flags for a model and a quantization config, reading
the model and its dataset (an ONNX --checkpoint imported once), tables and atomic output."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import NoReturn

from torch import nn

from qcore.data import (
    DATASETS,
    INPUT_SCALES,
    Dataset,
    load_dataset,
    with_input_scale,
)
from qcore.files import shorten, write_atomic
from qcore.models.checkpoint import (
    MAX_FILE_BYTES,
    CheckpointError,
    load_model,
    model_from_state,
    read_checkpoint,
)
from qcore.models.net import LAYER_NAMES
from qcore.models.onnx_import import import_onnx, is_onnx
from qcore.models.zoo import DEFAULT_MODEL, ZOO, zoo_model
from qcore.quantize.calibrate import OBSERVERS
from qcore.quantize.config import WEIGHT_RANGES, QuantConfig, integer_path_problems, make_config
from qcore.quantize.methods import METHODS
from qcore.quantize.quant import MAX_BITS, MIN_BITS, Granularity, Scheme
from qcore.training.qat import (
    QatCheckpoint,
    checkpoint_from_state,
    claims_qat,
    imported_qat,
    load_checkpoint,
    qat_from_state,
)


class UsageError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


WHOLE_NUMBER = re.compile(r"-?[0-9]{1,100}")  # the settings say which range; int() of 100 digits is cheap


def whole_number(text: str) -> int:
    """An integer flag in ASCII digits only: Python's int() also takes other scripts' digits ('٤' is 4),
    '+7', ' 7' and '7_0', none of which a URL or a config file accepts either."""
    if not WHOLE_NUMBER.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{shorten(text, 30)!r} is not a whole number in ASCII digits")
    return int(text)


def bits_list(text: str) -> list[int]:
    """'2-8' or '2,4,8', each bit-width within MIN_BITS..MAX_BITS (checked before any range is built)."""
    usage = f"expected a range like 2-8 or a list like 2,4,8 of bits {MIN_BITS} to {MAX_BITS} (got {shorten(text)!r})"
    if len(text) > 100:
        raise argparse.ArgumentTypeError(usage)
    try:
        if "-" in text:
            low, high = (whole_number(part) for part in text.split("-", 1))
            bits = [low, high]
        else:
            bits = [whole_number(part) for part in text.split(",") if part]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(usage) from None
    if not bits or any(not MIN_BITS <= b <= MAX_BITS for b in bits) or ("-" in text and bits[0] > bits[1]):
        raise argparse.ArgumentTypeError(usage)
    return list(range(bits[0], bits[1] + 1)) if "-" in text else sorted(set(bits))


def add_common(parser: argparse.ArgumentParser, model: bool = True) -> None:
    parser.add_argument(
        "--data-dir", help="folder holding MNIST/raw and FashionMNIST/raw (default: $QCORE_DATA_DIR or ./data)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    if model:
        parser.add_argument(
            "--model",
            choices=list(ZOO),
            default=DEFAULT_MODEL,
            help="the zoo model (architecture and dataset); --checkpoint replaces its bundled weights",
        )
        parser.add_argument(
            "--dataset",
            choices=list(DATASETS),
            help="the data an ONNX --checkpoint is evaluated on (default mnist); a zoo model has its own",
        )
        parser.add_argument(
            "--input-scale",
            choices=["auto", *INPUT_SCALES],
            help="the pixels an ONNX --checkpoint reads: auto (default: the convention under which it is most "
            "accurate on 1,000 training images), normalized (the dataset's mean and std), raw [0, 1], raw255 "
            "[0, 255] or symmetric [-1, 1]",
        )


EDGE_BITS_HELP = (
    "the first and last layers (weights and inputs) at this many bits, as LSQ (Esser et al. 2019) keeps them "
    "at 8 (0: like the rest)"
)


ADD_BITS_HELP = (
    "the tensors that are no layer's input (a residual add's inputs) at this many bits: they feed no "
    "multiplication (0: the activation bits)"
)


def add_quant_flags(parser: argparse.ArgumentParser) -> None:
    default = QuantConfig()
    parser.add_argument(
        "--checkpoint",
        help=(
            "a state_dict of --model's architecture (torch.save or safetensors), a QAT checkpoint, or your "
            "own model as an ONNX file (told apart by content; default: the model's bundled checkpoint)"
        ),
    )
    parser.add_argument("--weight-bits", type=whole_number, default=default.weight_bits)
    parser.add_argument("--act-bits", type=whole_number, default=default.act_bits)
    parser.add_argument("--calib-batches", type=whole_number, default=default.calib_batches)
    parser.add_argument("--batch-size", type=whole_number, default=default.batch_size, help="calibration batch size")
    parser.add_argument("--observer", choices=list(OBSERVERS), default=default.observer)
    parser.add_argument("--granularity", choices=[g.value for g in Granularity], default=default.granularity)
    parser.add_argument("--scheme", choices=[s.value for s in Scheme], default=default.scheme, help="weights' scheme")
    parser.add_argument("--weight-range", choices=list(WEIGHT_RANGES), default=default.weight_range)
    parser.add_argument("--float-input", action="store_true", help="leave the network's input unquantized")
    parser.add_argument(
        "--float-layers",
        default="",
        help=f"comma-separated layer names (for the notebook's net: {','.join(LAYER_NAMES)})",
    )
    parser.add_argument("--seed", type=whole_number, default=default.seed, help="calibration sample seed")
    parser.add_argument(
        "--methods", default="", help=f"comma-separated, from {','.join(METHODS)} (applied in that order)"
    )
    parser.add_argument(
        "--weight-bits-budget",
        type=float,
        default=default.weight_bits_budget,
        help="mixed precision: average weight bits at most this (0: off)",
    )
    parser.add_argument("--edge-bits", type=whole_number, default=default.edge_bits, help=EDGE_BITS_HELP)
    parser.add_argument("--add-bits", type=whole_number, default=default.add_bits, help=ADD_BITS_HELP)


def model_layers(args: argparse.Namespace) -> tuple[str, ...]:
    """The conv and linear layers of --model's architecture (from its graph; no weights needed)."""
    from qcore.graph import model_graph

    imported = getattr(args, "imported", None)
    return model_graph(imported.module if imported is not None else zoo_model(args.model).build().eval()).layers


def config_from_args(args: argparse.Namespace) -> QuantConfig:
    return make_config(
        model_layers(args),
        weight_bits=args.weight_bits,
        act_bits=args.act_bits,
        calib_batches=args.calib_batches,
        batch_size=args.batch_size,
        observer=args.observer,
        granularity=args.granularity,
        scheme=args.scheme,
        weight_range=args.weight_range,
        quantize_input=not args.float_input,
        float_layers=args.float_layers,
        seed=args.seed,
        methods=args.methods,
        weight_bits_budget=args.weight_bits_budget,
        edge_bits=args.edge_bits,
        add_bits=args.add_bits,
    )


def config_flags(config: QuantConfig) -> list[str]:
    """The quantization flags that give `config` (those that differ from the defaults): config_from_args'
    inverse, so a config found elsewhere (the auto search) can be run again with `evaluate`."""
    default = QuantConfig()
    flags: list[str] = []
    for f in fields(QuantConfig):
        value = getattr(config, f.name)
        if value == getattr(default, f.name):
            continue
        if f.name == "quantize_input":
            flags.append("--float-input")
        elif isinstance(value, tuple):
            flags += [f"--{f.name.replace('_', '-')}", ",".join(value)]
        else:
            flags += [f"--{f.name.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else str(value)]
    return flags


def table(rows: Sequence[dict[str, object]]) -> str:
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", None, "display.float_format", "{:.6g}".format):
        return pd.DataFrame(list(rows)).to_string(index=False)


def percent(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"


def dataset_of(args: argparse.Namespace) -> Dataset:
    """The dataset of --model, from --data-dir; an ONNX --checkpoint's, scaled as it reads images."""
    imported = getattr(args, "imported", None)
    if imported is not None:
        return with_input_scale(
            load_dataset(imported.dataset, args.data_dir), imported.input_scale, imported.input_affine
        )
    dataset = zoo_model(args.model).dataset
    if getattr(args, "dataset", None) not in (None, dataset) or getattr(args, "input_scale", None) not in (
        None,
        "normalized",
    ):
        raise UsageError(f"--dataset and --input-scale describe an ONNX --checkpoint; {args.model} reads {dataset}")
    return load_dataset(dataset, args.data_dir)


def import_onnx_checkpoint(args: argparse.Namespace) -> None:
    """When --checkpoint is an ONNX file (by content), import it once, checked against ONNX Runtime on the
    chosen dataset, into args.imported; every command then uses that model and its data. A QAT
    checkpoint of an ONNX model imports the file it holds, on the data it names, and is loaded once into
    args.imported_qat."""
    args.imported = None
    args.imported_qat = None
    args.checkpoint_state = None  # the file, unpickled once here, when it is a zoo model's checkpoint
    path = getattr(args, "checkpoint", None)
    if path is None:
        return
    try:
        if not Path(path).is_file() or Path(path).stat().st_size > MAX_FILE_BYTES:
            return  # load_checkpoint says why, in its own words
        data = Path(path).read_bytes()
    except OSError:
        return
    if not is_onnx(data):
        _import_qat_checkpoint(args, data)
        return
    if args.model != DEFAULT_MODEL:
        raise UsageError("--model names a zoo architecture; an ONNX --checkpoint brings its own (drop --model)")
    dataset = load_dataset(args.dataset or "mnist", args.data_dir)
    args.imported = import_onnx(data, dataset, args.input_scale or "auto")


def _import_qat_checkpoint(args: argparse.Namespace, data: bytes) -> None:
    try:
        state = read_checkpoint(data)
    except CheckpointError:
        return  # load_checkpoint says why, in its own words
    if not imported_qat(state):
        args.checkpoint_state = state
        return
    if args.model != DEFAULT_MODEL:
        raise UsageError("--model names a zoo architecture; a QAT checkpoint of an ONNX model brings its own")
    checkpoint = qat_from_state(state, args.data_dir)
    assert checkpoint.imported is not None
    for flag, given, own in (
        ("--dataset", getattr(args, "dataset", None), checkpoint.imported.dataset),
        ("--input-scale", getattr(args, "input_scale", None), checkpoint.imported.input_scale),
    ):
        if given not in (None, own, "auto"):
            raise UsageError(f"{flag} {given}: the QAT checkpoint's ONNX model was trained reading {own}")
    args.imported, args.imported_qat = checkpoint.imported, checkpoint


def write_output(out: Path, flag: str, payload: bytes) -> None:
    """Write a file the user asked for, atomically; a failure is a one-line usage error."""
    try:
        write_atomic(out, payload)
    except OSError as error:
        raise UsageError(f"{flag} {shorten(out)}: {error.strerror}; nothing was written") from error


def load_for_quantization(args: argparse.Namespace, what: str) -> tuple[nn.Module, QatCheckpoint | None]:
    """The float model, and the QAT checkpoint when --checkpoint is one. A QAT checkpoint carries its
    own config, so a quantization flag set to neither the default nor the checkpoint's value is refused
    rather than ignored."""
    if args.imported is not None:
        checkpoint = args.imported_qat
        model = args.imported.module if checkpoint is None else checkpoint.model
    elif args.checkpoint_state is not None:
        model, checkpoint = checkpoint_from_state(args.checkpoint_state, args.model, args.data_dir)
    else:
        model, checkpoint = load_checkpoint(args.checkpoint, args.model, args.data_dir)
    if checkpoint is None:
        return model, None
    asked, default = config_from_args(args), QuantConfig()
    if any(
        getattr(asked, f.name) not in (getattr(default, f.name), getattr(checkpoint.config, f.name))
        for f in fields(QuantConfig)
    ):
        raise UsageError(
            f"{what}: {shorten(args.checkpoint)} is a QAT checkpoint trained at W{checkpoint.config.weight_bits}"
            f"A{checkpoint.config.act_bits} with its own quantization; drop the quantization flags"
        )
    return model, checkpoint


def float_model_only(args: argparse.Namespace, what: str) -> nn.Module:
    """For commands that calibrate variants of a config: a QAT checkpoint's grid is its own, so they
    would measure something else than the trained model; say so instead."""
    if args.imported is not None and args.imported_qat is None:
        return args.imported.module
    if args.checkpoint is None:
        return load_model(None, args.model)
    state = args.checkpoint_state if args.checkpoint_state is not None else read_checkpoint(args.checkpoint)
    if claims_qat(state):
        raise UsageError(
            f"{what} calibrates its own variants of a config, which would not be the QAT model "
            f"in {shorten(args.checkpoint)}; use evaluate, sweep, export or explain with it"
        )
    return model_from_state(state, args.model)


def require_integer_path(what: str, config: QuantConfig) -> None:
    problems = integer_path_problems(config)
    if problems:
        raise UsageError(f"{what} cannot run this config: {'; '.join(problems)}")
