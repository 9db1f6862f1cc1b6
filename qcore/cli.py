"""`python -m qcore`: train, evaluate, sweep and sensitivity from the command line.

Every command prints readable tables, or one JSON object with --json. Bad flags, bad files and
missing data end with exit code 2 and a one-line error on stderr; every argument is checked before
any work starts. Files are written atomically and never replace an existing file without --force.
Ctrl-C exits 130 with one line and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import NoReturn

from torch import nn

from qcore.data import (
    DATASETS,
    INPUT_SCALES,
    DataError,
    Dataset,
    data_dir,
    load_dataset,
    view_spec,
    with_input_scale,
)
from qcore.export.deploy import ENGINES
from qcore.files import OutputPathError, check_output_path, shorten, write_atomic
from qcore.graph import GraphError
from qcore.models.checkpoint import (
    MAX_FILE_BYTES,
    CheckpointError,
    checkpoint_bytes,
    load_model,
    model_from_state,
    read_checkpoint,
)
from qcore.models.net import LAYER_NAMES
from qcore.models.onnx_import import import_onnx, is_onnx
from qcore.models.zoo import DEFAULT_MODEL, ZOO, UnknownModelError, zoo_model
from qcore.quantize.calibrate import OBSERVERS
from qcore.quantize.config import WEIGHT_RANGES, ConfigError, QuantConfig, integer_path_problems, make_config
from qcore.quantize.methods import METHODS
from qcore.quantize.quant import MAX_BITS, MIN_BITS, Granularity, Scheme
from qcore.training.qat import QAT_METHODS, QatCheckpoint, QatConfig, QatError, QatProgress, claims_qat, load_checkpoint
from qcore.training.train import OPTIMIZERS, SCHEDULES, TrainConfig, TrainProgress, train

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class UsageError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


_WHOLE_NUMBER = re.compile(r"-?[0-9]{1,100}")  # the settings say which range; int() of 100 digits is cheap


def _whole_number(text: str) -> int:
    """An integer flag in ASCII digits only: Python's int() also takes other scripts' digits ('٤' is 4),
    '+7', ' 7' and '7_0', none of which a URL or a config file accepts either."""
    if not _WHOLE_NUMBER.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{shorten(text, 30)!r} is not a whole number in ASCII digits")
    return int(text)


def _bits_list(text: str) -> list[int]:
    """'2-8' or '2,4,8', each bit-width within MIN_BITS..MAX_BITS (checked before any range is built)."""
    usage = f"expected a range like 2-8 or a list like 2,4,8 of bits {MIN_BITS} to {MAX_BITS} (got {shorten(text)!r})"
    if len(text) > 100:
        raise argparse.ArgumentTypeError(usage)
    try:
        if "-" in text:
            low, high = (_whole_number(part) for part in text.split("-", 1))
            bits = [low, high]
        else:
            bits = [_whole_number(part) for part in text.split(",") if part]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(usage) from None
    if not bits or any(not MIN_BITS <= b <= MAX_BITS for b in bits) or ("-" in text and bits[0] > bits[1]):
        raise argparse.ArgumentTypeError(usage)
    return list(range(bits[0], bits[1] + 1)) if "-" in text else sorted(set(bits))


def _add_common(parser: argparse.ArgumentParser, model: bool = True) -> None:
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


def _add_quant_flags(parser: argparse.ArgumentParser) -> None:
    default = QuantConfig()
    parser.add_argument(
        "--checkpoint",
        help=(
            "a state_dict of --model's architecture (torch.save or safetensors), a QAT checkpoint, or your "
            "own model as an ONNX file (told apart by content; default: the model's bundled checkpoint)"
        ),
    )
    parser.add_argument("--weight-bits", type=_whole_number, default=default.weight_bits)
    parser.add_argument("--act-bits", type=_whole_number, default=default.act_bits)
    parser.add_argument("--calib-batches", type=_whole_number, default=default.calib_batches)
    parser.add_argument("--batch-size", type=_whole_number, default=default.batch_size, help="calibration batch size")
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
    parser.add_argument("--seed", type=_whole_number, default=default.seed, help="calibration sample seed")
    parser.add_argument(
        "--methods", default="", help=f"comma-separated, from {','.join(METHODS)} (applied in that order)"
    )
    parser.add_argument(
        "--weight-bits-budget",
        type=float,
        default=default.weight_bits_budget,
        help="mixed precision: average weight bits at most this (0: off)",
    )
    parser.add_argument("--edge-bits", type=_whole_number, default=default.edge_bits, help=EDGE_BITS_HELP)
    parser.add_argument("--add-bits", type=_whole_number, default=default.add_bits, help=ADD_BITS_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m qcore", description="Quantization Lab: quantizing small CNNs on MNIST and Fashion-MNIST"
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train_cmd = commands.add_parser(
        "train", help="train a zoo model from scratch by its recipe (the notebook's for the notebook's net)"
    )
    train_cmd.add_argument("--out", default="model.pt", help="where to write the state_dict")
    train_cmd.add_argument("--force", action="store_true", help="replace --out if it exists")
    # defaults: the --model's recipe (qcore.models.zoo), else TrainConfig's
    train_cmd.add_argument("--epochs", type=_whole_number)
    train_cmd.add_argument("--batch-size", type=_whole_number)
    train_cmd.add_argument("--lr", type=float, help="the learning rate (the peak with --schedule one-cycle)")
    train_cmd.add_argument("--momentum", type=float)
    train_cmd.add_argument("--optimizer", choices=list(OPTIMIZERS))
    train_cmd.add_argument("--weight-decay", type=float)
    train_cmd.add_argument("--schedule", choices=list(SCHEDULES))
    train_cmd.add_argument("--seed", type=_whole_number)
    train_cmd.add_argument("--train-samples", type=_whole_number, default=None, help="train on the first N images only")
    train_cmd.add_argument("--device", choices=["auto", "cpu", "cuda"], default=TrainConfig().device)
    _add_common(train_cmd)

    qat_defaults = QatConfig()
    qat_cmd = commands.add_parser("qat", help="quantization-aware training from a float model; writes a QAT checkpoint")
    qat_cmd.add_argument("--checkpoint", help="the float weights to start from (default: the model's bundled ones)")
    qat_cmd.add_argument(
        "--out", help="where to write the QAT checkpoint (required for the notebook's net, which alone has one)"
    )
    qat_cmd.add_argument("--force", action="store_true", help="replace --out if it exists")
    qat_cmd.add_argument("--weight-bits", type=_whole_number, default=qat_defaults.weight_bits)
    qat_cmd.add_argument("--act-bits", type=_whole_number, default=qat_defaults.act_bits)
    qat_cmd.add_argument("--edge-bits", type=_whole_number, default=qat_defaults.edge_bits, help=EDGE_BITS_HELP)
    qat_cmd.add_argument("--add-bits", type=_whole_number, default=qat_defaults.add_bits, help=ADD_BITS_HELP)
    qat_cmd.add_argument("--epochs", type=_whole_number, default=qat_defaults.epochs)
    qat_cmd.add_argument("--method", choices=list(QAT_METHODS), default=qat_defaults.method)
    qat_cmd.add_argument("--lr", type=float, default=qat_defaults.lr)
    qat_cmd.add_argument("--batch-size", type=_whole_number, default=qat_defaults.batch_size)
    qat_cmd.add_argument("--seed", type=_whole_number, default=qat_defaults.seed)
    qat_cmd.add_argument("--train-samples", type=_whole_number, default=None, help="train on the first N images only")
    qat_cmd.add_argument("--device", choices=["auto", "cpu", "cuda"], default=qat_defaults.device)
    qat_cmd.add_argument(
        "--control",
        action="store_true",
        help="also fine-tune the float model the same way without quantizers, and report QAT's drop against it",
    )
    _add_common(qat_cmd)

    for name, text in (
        ("evaluate", "float vs quantized accuracy and per-layer details for one config"),
        ("sweep", "accuracy by bit-width"),
        ("sensitivity", "accuracy with one layer quantized at a time"),
    ):
        command = commands.add_parser(name, help=text)
        _add_quant_flags(command)
        _add_common(command)
        if name == "evaluate":
            command.add_argument(
                "--engine",
                choices=list(ENGINES),
                default="simulate",
                help="the inference path whose quant_accuracy is reported",
            )
        if name == "sweep":
            command.add_argument("--bits", type=_bits_list, default=list(range(2, 9)), help="e.g. 2-8 or 2,4,8")
            command.add_argument("--target", choices=["both", "weights", "activations"], default="both")
    diagnose_cmd = commands.add_parser(
        "diagnose", help="why accuracy dropped: per-layer damage, measured fixes, integer engine vs simulation"
    )
    _add_quant_flags(diagnose_cmd)
    _add_common(diagnose_cmd)
    diagnose_cmd.add_argument("--html", help="also write a self-contained HTML report to this file")
    diagnose_cmd.add_argument("--force", action="store_true", help="replace --html if it exists")
    explain_cmd = commands.add_parser("explain", help="one test image through the integer engine, written out")
    _add_quant_flags(explain_cmd)
    _add_common(explain_cmd)
    explain_cmd.add_argument("--image", type=_whole_number, required=True, help="test image index (0 to 9999)")
    explain_cmd.add_argument(
        "--layer", help="the layer or add whose --position is given (the notebook's net: conv1, conv2, fc1 or fc2)"
    )
    explain_cmd.add_argument(
        "--position", help="its output index, channel first: c,row,col for a conv or an add of maps, j for a linear"
    )
    graph_cmd = commands.add_parser(
        "graph", help="the model graph every path walks: operations, shapes, quantization points, BatchNorm folding"
    )
    _add_quant_flags(graph_cmd)
    _add_common(graph_cmd)
    graph_cmd.add_argument(
        "--channel", type=_whole_number, default=0, help="the output channel shown before and after folding"
    )
    data_cmd = commands.add_parser("data", help="check a dataset's files (every idx file validated)")
    data_cmd.add_argument(
        "--download", action="store_true", help="fetch it with torchvision first when files are missing (online)"
    )
    data_cmd.add_argument("--dataset", choices=list(DATASETS), default="mnist")
    _add_common(data_cmd, model=False)
    walk_cmd = commands.add_parser(
        "walkthrough", help="a classic failure measured on the model: BatchNorm folding, or residual requantization"
    )
    walk_cmd.add_argument("failure", choices=["folding", "residual"])
    _add_quant_flags(walk_cmd)
    _add_common(walk_cmd)
    models_cmd = commands.add_parser("models", help="the model zoo: each model's dataset, accuracy, size and ops")
    _add_common(models_cmd, model=False)
    export = commands.add_parser("export", help="write the quantized model as integer tensors or ONNX (QDQ)")
    _add_quant_flags(export)
    _add_common(export)
    export.add_argument("--format", choices=["qtensors", "onnx"], required=True)
    export.add_argument("--out", required=True, help="file to write")
    export.add_argument("--force", action="store_true", help="replace --out if it exists")
    return parser


def _model_layers(args: argparse.Namespace) -> tuple[str, ...]:
    """The conv and linear layers of --model's architecture (from its graph; no weights needed)."""
    from qcore.graph import model_graph

    imported = getattr(args, "imported", None)
    return model_graph(imported.module if imported is not None else zoo_model(args.model).build().eval()).layers


def config_from_args(args: argparse.Namespace) -> QuantConfig:
    return make_config(
        _model_layers(args),
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


def _table(rows: Sequence[dict[str, object]]) -> str:
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", None, "display.float_format", "{:.6g}".format):
        return pd.DataFrame(list(rows)).to_string(index=False)


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"


def _dataset(args: argparse.Namespace) -> Dataset:
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


def _import_onnx_checkpoint(args: argparse.Namespace) -> None:
    """When --checkpoint is an ONNX file (by content), import it once, checked against ONNX Runtime on the
    chosen dataset, into args.imported; every command then uses that model and its data."""
    args.imported = None
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
        return
    if args.model != DEFAULT_MODEL:
        raise UsageError("--model names a zoo architecture; an ONNX --checkpoint brings its own (drop --model)")
    dataset = load_dataset(args.dataset or "mnist", args.data_dir)
    args.imported = import_onnx(data, dataset, args.input_scale or "auto")


def cmd_train(args: argparse.Namespace) -> dict[str, object]:
    spec = zoo_model(args.model)
    flags = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "momentum": args.momentum,
        "optimizer": args.optimizer,
        "weight_decay": args.weight_decay,
        "schedule": args.schedule,
        "seed": args.seed,
    }
    recipe = {**spec.recipe, **{key: value for key, value in flags.items() if value is not None}}
    config = TrainConfig(**recipe, train_samples=args.train_samples, device=args.device)  # type: ignore[arg-type]
    try:
        config.validate()
    except ValueError as error:
        raise UsageError(str(error)) from error
    out = check_output_path(args.out, args.force)
    data = _dataset(args)

    def report(progress: TrainProgress) -> None:
        if progress.step % 100 == 0 or progress.step == progress.steps_per_epoch:
            print(
                f"epoch {progress.epoch}/{progress.epochs} step {progress.step}/{progress.steps_per_epoch} "
                f"loss {progress.loss:.4f} running acc {_percent(progress.running_accuracy)}",
                file=sys.stderr,
            )

    started = time.perf_counter()
    result = train(data.train, config, on_progress=report, build=spec.build)
    seconds = time.perf_counter() - started
    _write(out, "--out", checkpoint_bytes(result.model))
    from qcore.inference.evaluate import evaluate

    test = evaluate(result.model, data.test)
    summary = {
        "checkpoint": args.out,
        "model": spec.name,
        "dataset": spec.dataset,
        "config": asdict(config),
        "seconds": seconds,
        **test.to_dict(),
    }
    if not args.json:
        print(
            f"wrote {args.out} ({spec.name} on {spec.dataset}): test accuracy {_percent(test.accuracy)}, "
            f"loss {test.loss:.4f}, {seconds:.1f} s"
        )
    return summary


def cmd_qat(args: argparse.Namespace) -> dict[str, object]:
    from qcore.inference.evaluate import evaluate
    from qcore.inference.integer import IntegerNet
    from qcore.training.qat import qat, qat_bytes

    config = QatConfig(
        weight_bits=args.weight_bits,
        act_bits=args.act_bits,
        edge_bits=args.edge_bits,
        add_bits=args.add_bits,
        epochs=args.epochs,
        method=args.method,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        train_samples=args.train_samples,
        device=args.device,
    )
    try:
        config.validate()
    except QatError as error:
        raise UsageError(str(error)) from error
    keeps_checkpoint = zoo_model(args.model).is_notebook_net and args.imported is None
    if keeps_checkpoint and args.out is None:
        raise UsageError("qat: --out is required (where to write the QAT checkpoint)")
    if not keeps_checkpoint and args.out is not None:
        model_name = "an ONNX --checkpoint" if args.imported is not None else f"--model {args.model}"
        raise UsageError(
            f"qat with {model_name}: QAT checkpoints are saved for the notebook's net only; drop --out "
            "to train and measure this model"
        )
    out = check_output_path(args.out, args.force) if args.out is not None else None
    model = _float_model_only(args, "qat (it starts from a float model)")
    data = _dataset(args)

    def report(progress: QatProgress) -> None:
        if progress.held_out_accuracy is not None:
            print(
                f"epoch {progress.epoch}/{progress.epochs} step {progress.step}/{progress.steps_per_epoch} "
                f"loss {progress.loss:.4f} held-out quantized accuracy {_percent(progress.held_out_accuracy)}",
                file=sys.stderr,
            )

    float_accuracy = evaluate(model, data.test).accuracy
    result = qat(model, data, config, on_progress=report)
    assert result.ptq is not None  # qat() always starts from a PTQ calibration
    ptq_accuracy = evaluate(result.ptq, data.test).accuracy
    if out is not None:
        _write(out, "--out", qat_bytes(result))
    simulated = evaluate(result.qnet, data.test)
    integer = IntegerNet(result.qnet).predict(data.test.images)
    summary = {
        "checkpoint": args.out,
        "model": "onnx" if args.imported is not None else args.model,
        "config": asdict(config),
        "float_accuracy": float_accuracy,
        "ptq_accuracy": ptq_accuracy,
        "qat_accuracy": simulated.accuracy,
        "drop_points": 100 * (float_accuracy - simulated.accuracy),
        "integer_accuracy": float((integer == data.test.labels).float().mean()),
        "integer_agreement": float((integer == simulated.predictions).float().mean()),
        "seconds_per_epoch": result.seconds_per_epoch,
        "held_out": result.held_out,
    }
    if args.control:
        from qcore.training.qat import qat_control

        control = qat_control(model, data, config)
        summary["control_accuracy"] = evaluate(control.model, data.test).accuracy
        summary["drop_points_vs_control"] = 100 * (summary["control_accuracy"] - simulated.accuracy)
    if not args.json:
        bits = config.quant_config().bits_label
        print(
            f"{'wrote ' + args.out if out is not None else args.model}: {bits} {config.method}, "
            f"{config.epochs} epoch(s): float {_percent(float_accuracy)}, "
            f"PTQ {_percent(ptq_accuracy)}, QAT {_percent(simulated.accuracy)} "
            f"({-summary['drop_points']:+.2f} points vs float); "
            f"integer engine {_percent(summary['integer_accuracy'])}, "
            f"same prediction on {_percent(summary['integer_agreement'])}; "
            f"{', '.join(f'{t:.1f}' for t in result.seconds_per_epoch)} s per epoch"
            + (
                f"; the control (same fine-tuning, no quantizer) {_percent(summary['control_accuracy'])}, "
                f"QAT {-summary['drop_points_vs_control']:+.2f} points against it"
                if args.control
                else ""
            )
        )
    return summary


def _write(out: Path, flag: str, payload: bytes) -> None:
    """Write a file the user asked for, atomically; a failure is a one-line usage error."""
    try:
        write_atomic(out, payload)
    except OSError as error:
        raise UsageError(f"{flag} {shorten(out)}: {error.strerror}; nothing was written") from error


def _load_for_quantization(args: argparse.Namespace, what: str) -> tuple[nn.Module, QatCheckpoint | None]:
    """The float model, and the QAT checkpoint when --checkpoint is one. A QAT checkpoint carries its
    own config, so a quantization flag set to neither the default nor the checkpoint's value is refused
    rather than ignored."""
    if args.imported is not None:
        return args.imported.module, None
    model, checkpoint = load_checkpoint(args.checkpoint, args.model)
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


def _float_model_only(args: argparse.Namespace, what: str) -> nn.Module:
    """For commands that calibrate variants of a config: a QAT checkpoint's grid is its own, so they
    would measure something else than the trained model; say so instead."""
    if args.imported is not None:
        return args.imported.module
    if args.checkpoint is None:
        return load_model(None, args.model)
    state = read_checkpoint(args.checkpoint)
    if claims_qat(state):
        raise UsageError(
            f"{what} calibrates its own variants of a config, which would not be the QAT model "
            f"in {shorten(args.checkpoint)}; use evaluate, sweep, export or explain with it"
        )
    return model_from_state(state, args.model)


def _require_integer_path(what: str, config: QuantConfig) -> None:
    problems = integer_path_problems(config)
    if problems:
        raise UsageError(f"{what} cannot run this config: {'; '.join(problems)}")


def cmd_evaluate(args: argparse.Namespace) -> dict[str, object]:
    from qcore.analysis.tables import build_report

    model, trained = _load_for_quantization(args, "evaluate")
    config = config_from_args(args) if trained is None else trained.config
    if args.engine in ("integer", "onnxruntime"):
        _require_integer_path(f"--engine {args.engine}", config)
    if trained is not None and args.engine == "torch-int8":
        raise UsageError("--engine torch-int8 calibrates its own ranges, so it cannot run a QAT checkpoint's")
    data = _dataset(args)
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
            f"float accuracy {_percent(report.float_result.accuracy)}"
            f"  quantized {_percent(report.quant_result.accuracy)}"
            f"  difference {100 * -report.accuracy_drop:+.2f} points"
            f"  (loss {report.float_result.loss:.4f} -> {report.quant_result.loss:.4f})"
        )
        print(_table([row.summary() for row in report.layers]))
        methods = report.qnet.methods
        if config.methods or config.weight_bits_budget:
            print(
                f"weight bits per layer: {methods.weight_bits}; method seconds: "
                + ", ".join(f"{k} {v:.1f}" for k, v in methods.seconds.items())
            )
        if args.engine != "simulate":
            print(
                f"engine {args.engine}: accuracy {_percent(result['quant_accuracy'])}, same prediction as the "
                f"simulation on {_percent(result['agreement_with_simulation'])} of test images"
            )
    return result


def cmd_sweep(args: argparse.Namespace) -> dict[str, object]:
    from qcore.analysis.tables import bit_sweep
    from qcore.inference.evaluate import evaluate

    model, trained = _load_for_quantization(args, "sweep")
    config = config_from_args(args)
    data = _dataset(args)
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
        print(f"float accuracy {_percent(float_accuracy)}; sweeping {args.target} over bits {args.bits} (PTQ)")
        print(_table(rows))
        if trained is not None:
            qat = summary["qat"]
            assert isinstance(qat, dict)
            print(
                f"QAT checkpoint at W{qat['weight_bits']}A{qat['act_bits']}: {_percent(qat['accuracy'])} "
                "(the sweep above calibrates its float weights afresh)"
            )
    return {**summary, "points": rows}


def cmd_sensitivity(args: argparse.Namespace) -> dict[str, object]:
    from qcore.analysis.tables import layer_sensitivity
    from qcore.inference.evaluate import evaluate

    config = config_from_args(args)
    model = _float_model_only(args, "sensitivity")
    data = _dataset(args)
    float_accuracy = evaluate(model, data.test).accuracy
    rows = [asdict(row) for row in layer_sensitivity(model, data, config, float_accuracy)]
    if not args.json:
        print(f"float accuracy {_percent(float_accuracy)}; one layer quantized at a time")
        print(_table(rows))
    return {"config": config.to_dict(), "float_accuracy": float_accuracy, "layers": rows}


def cmd_export(args: argparse.Namespace) -> dict[str, object]:
    from qcore.analysis.tables import quantize_for
    from qcore.export.formats import export_onnx, input_step_of, qtensors_bytes
    from qcore.inference.integer import IntegerEngineError, IntegerNet

    model, trained = _load_for_quantization(args, "export")
    config = config_from_args(args) if trained is None else trained.config
    _require_integer_path(f"export --format {args.format}", config)
    out = check_output_path(args.out, args.force)
    qnet = quantize_for(model, _dataset(args), config) if trained is None else trained.qnet
    try:
        engine = IntegerNet(qnet)  # both formats: a model the integer engine cannot run is not exported
        if args.format == "qtensors":
            payload = qtensors_bytes(engine)
        elif args.imported is None:
            payload = export_onnx(qnet, _dataset(args).spec)
        else:  # the file's own input: its layout, type and pixel convention, then its input step
            spec = view_spec(load_dataset(args.imported.dataset, args.data_dir).spec, args.imported.input_scale)
            payload = export_onnx(qnet, spec, input_step_of(args.imported))
    except (IntegerEngineError, ValueError) as error:
        raise UsageError(f"export {args.format}: {error}") from error
    _write(out, "--out", payload)
    if not args.json:
        print(f"wrote {args.out} ({len(payload)} bytes, {args.format}) for {config.to_json()}")
    return {"out": args.out, "format": args.format, "bytes": len(payload), "config": config.to_dict()}


def cmd_diagnose(args: argparse.Namespace) -> dict[str, object]:
    from qcore.analysis.diagnose import diagnose
    from qcore.analysis.report import diagnosis_html
    from qcore.models.checkpoint import fingerprint

    config = config_from_args(args)
    out = check_output_path(args.html, args.force) if args.html else None
    model = _float_model_only(args, "diagnose")
    data = _dataset(args)

    def report(done: int, total: int, what: str) -> None:
        print(f"[{done}/{total}] {what}", file=sys.stderr)

    result = diagnose(model, data, config, on_progress=report)
    if out is not None:
        name = shorten(args.checkpoint) if args.checkpoint else f"bundled {args.model}"
        _write(out, "--html", diagnosis_html(result, name, fingerprint(model)).encode())
    summary = result.to_dict()
    if not args.json:
        print(
            f"float accuracy {_percent(result.float_accuracy)}  quantized {_percent(result.quant_accuracy)}"
            f"  ({100 * (result.quant_accuracy - result.float_accuracy):+.2f} points)"
        )
        print(_table(summary["layers"]))  # type: ignore[arg-type]
        for suggestion in result.suggestions:
            print(f"try: {suggestion.text}: {_percent(suggestion.accuracy)} ({suggestion.gain_points:+.2f} points)")
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
    model, trained = _load_for_quantization(args, "explain")
    positions = _position(args.position, args.layer, walk_shapes(model_graph(model)))
    config = config_from_args(args) if trained is None else trained.config
    _require_integer_path("explain (the integer engine)", config)
    data = _dataset(args)
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
    from qcore.models.checkpoint import load_model

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
        shown = [
            {**row, "float_accuracy": _percent(row["float_accuracy"]), "ops": ",".join(row["ops"])} for row in rows
        ]
        print(
            _table(
                [{key: row[key] for key in ("name", "dataset", "float_accuracy", "parameters", "ops")} for row in shown]
            )
        )
    return {"models": rows}


def cmd_graph(args: argparse.Namespace) -> dict[str, object]:
    from qcore.graph import batchnorm_folding, model_graph
    from qcore.quantize.qmodel import config_plan

    model, trained = _load_for_quantization(args, "graph")
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
        print(_table(rows))
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
    from qcore.lessons.failures import FAILURE_POINTS, folding_walkthrough, residual_adds

    config = config_from_args(args)
    model = _float_model_only(args, f"walkthrough {args.failure}")
    # checked on the graph before any computation, naming the model the user gave (an ONNX file is not --model)
    name = "the imported ONNX model" if args.imported is not None else args.model
    graph = model_graph(model)
    if args.failure == "residual" and not any(op.kind is OpKind.ADD for op in graph.ops):
        raise UsageError(f"{name} has no residual add (try fashion-resnet)")
    if args.failure == "folding" and not graph.folded_batchnorm:
        raise UsageError(f"{name} has no BatchNorm to fold (try fashion-mobilenet or fashion-resnet)")
    data = _dataset(args)
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
            print(_table(rows))
        return {"config": config.to_dict(), "adds": [row.__dict__ | {"scale_ratio": row.scale_ratio} for row in adds]}

    def report(done: int, total: int, what: str) -> None:
        print(f"[{done + 1}] {what}", file=sys.stderr)

    walk = folding_walkthrough(model, data, config, on_progress=report)
    if not args.json:
        print(_table([layer.__dict__ for layer in walk.layers]))
        print(f"float accuracy {_percent(walk.float_accuracy)}")
        print(
            _table(
                [
                    {
                        "bits": f"W{row.weight_bits}A{row.act_bits}",
                        "per-channel": _percent(row.per_channel),
                        "per-tensor": _percent(row.per_tensor),
                        "per-tensor + equalization": _percent(row.per_tensor_equalized),
                        "per-tensor, MSE weights": _percent(row.per_tensor_mse),
                        "recovered": "-" if row.recovered is None else f"{100 * row.recovered:.0f}%",
                    }
                    for row in walk.rows
                ]
            )
        )
        if walk.failure_bits is None:
            print(f"per-tensor never lost {FAILURE_POINTS} points against float down to 2 weight bits")
        else:
            print(f"per-tensor alone first loses {FAILURE_POINTS} points at W{walk.failure_bits[0]}A8")
        print("weights' ranges are their min/max (Nagel et al.'s setting) except in the MSE column")
    return {"config": config.to_dict(), **walk.to_dict()}


COMMANDS = {
    "walkthrough": cmd_walkthrough,
    "data": cmd_data,
    "models": cmd_models,
    "graph": cmd_graph,
    "diagnose": cmd_diagnose,
    "explain": cmd_explain,
    "train": cmd_train,
    "qat": cmd_qat,
    "evaluate": cmd_evaluate,
    "sweep": cmd_sweep,
    "sensitivity": cmd_sensitivity,
    "export": cmd_export,
}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.data_dir is not None and not data_dir(args.data_dir).is_dir():
            raise UsageError(f"--data-dir {args.data_dir}: no such folder")
        _import_onnx_checkpoint(args)
        result = COMMANDS[args.command](args)
    except (
        UsageError,
        ConfigError,
        CheckpointError,
        DataError,
        OutputPathError,
        GraphError,
        UnknownModelError,
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
