"""`train` and `qat`: a float model trained by its recipe; quantization-aware training."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict

from qcore.cli.common import (
    ADD_BITS_HELP,
    EDGE_BITS_HELP,
    UsageError,
    add_common,
    dataset_of,
    float_model_only,
    percent,
    whole_number,
    write_output,
)
from qcore.files import check_output_path, shorten
from qcore.models.checkpoint import (
    CheckpointError,
    checkpoint_bytes,
)
from qcore.models.zoo import zoo_model
from qcore.training.qat import QAT_METHODS, QatConfig, QatError, QatProgress
from qcore.training.train import OPTIMIZERS, SCHEDULES, TrainConfig, TrainProgress, train


def add_train(commands: argparse._SubParsersAction) -> None:
    """`train`: a zoo model from scratch by its recipe."""
    train_cmd = commands.add_parser(
        "train", help="train a zoo model from scratch by its recipe (the notebook's for the notebook's net)"
    )
    train_cmd.add_argument("--out", default="model.pt", help="where to write the state_dict")
    train_cmd.add_argument("--force", action="store_true", help="replace --out if it exists")
    # defaults: the --model's recipe (qcore.models.zoo), else TrainConfig's
    train_cmd.add_argument("--epochs", type=whole_number)
    train_cmd.add_argument("--batch-size", type=whole_number)
    train_cmd.add_argument("--lr", type=float, help="the learning rate (the peak with --schedule one-cycle)")
    train_cmd.add_argument("--momentum", type=float)
    train_cmd.add_argument("--optimizer", choices=list(OPTIMIZERS))
    train_cmd.add_argument("--weight-decay", type=float)
    train_cmd.add_argument("--schedule", choices=list(SCHEDULES))
    train_cmd.add_argument("--seed", type=whole_number)
    train_cmd.add_argument("--train-samples", type=whole_number, default=None, help="train on the first N images only")
    train_cmd.add_argument("--device", choices=["auto", "cpu", "cuda"], default=TrainConfig().device)
    add_common(train_cmd)
    train_cmd.set_defaults(run=cmd_train)


def add_qat(commands: argparse._SubParsersAction) -> None:
    """`qat`: quantization-aware training from a float model."""
    qat_defaults = QatConfig()
    qat_cmd = commands.add_parser("qat", help="quantization-aware training from a float model; writes a QAT checkpoint")
    qat_cmd.add_argument("--checkpoint", help="the float weights to start from (default: the model's bundled ones)")
    qat_cmd.add_argument(
        "--out", help="where to write the QAT checkpoint (any model; without it, QAT trains and measures only)"
    )
    qat_cmd.add_argument("--force", action="store_true", help="replace --out if it exists")
    qat_cmd.add_argument("--weight-bits", type=whole_number, default=qat_defaults.weight_bits)
    qat_cmd.add_argument("--act-bits", type=whole_number, default=qat_defaults.act_bits)
    qat_cmd.add_argument("--edge-bits", type=whole_number, default=qat_defaults.edge_bits, help=EDGE_BITS_HELP)
    qat_cmd.add_argument("--add-bits", type=whole_number, default=qat_defaults.add_bits, help=ADD_BITS_HELP)
    qat_cmd.add_argument("--epochs", type=whole_number, default=qat_defaults.epochs)
    qat_cmd.add_argument("--method", choices=list(QAT_METHODS), default=qat_defaults.method)
    qat_cmd.add_argument("--lr", type=float, default=qat_defaults.lr)
    qat_cmd.add_argument("--batch-size", type=whole_number, default=qat_defaults.batch_size)
    qat_cmd.add_argument("--seed", type=whole_number, default=qat_defaults.seed)
    qat_cmd.add_argument("--train-samples", type=whole_number, default=None, help="train on the first N images only")
    qat_cmd.add_argument("--device", choices=["auto", "cpu", "cuda"], default=qat_defaults.device)
    qat_cmd.add_argument(
        "--control",
        action="store_true",
        help="also fine-tune the float model the same way without quantizers, and report QAT's drop against it",
    )
    add_common(qat_cmd)
    qat_cmd.set_defaults(run=cmd_qat)


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
    data = dataset_of(args)

    def report(progress: TrainProgress) -> None:
        if progress.step % 100 == 0 or progress.step == progress.steps_per_epoch:
            print(
                f"epoch {progress.epoch}/{progress.epochs} step {progress.step}/{progress.steps_per_epoch} "
                f"loss {progress.loss:.4f} running acc {percent(progress.running_accuracy)}",
                file=sys.stderr,
            )

    started = time.perf_counter()
    result = train(data.train, config, on_progress=report, build=spec.build)
    seconds = time.perf_counter() - started
    write_output(out, "--out", checkpoint_bytes(result.model))
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
            f"wrote {args.out} ({spec.name} on {spec.dataset}): test accuracy {percent(test.accuracy)}, "
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
    out = check_output_path(args.out, args.force) if args.out is not None else None
    model = float_model_only(args, "qat (it starts from a float model)")
    data = dataset_of(args)

    def report(progress: QatProgress) -> None:
        if progress.held_out_accuracy is not None:
            print(
                f"epoch {progress.epoch}/{progress.epochs} step {progress.step}/{progress.steps_per_epoch} "
                f"loss {progress.loss:.4f} held-out quantized accuracy {percent(progress.held_out_accuracy)}",
                file=sys.stderr,
            )

    float_accuracy = evaluate(model, data.test).accuracy
    result = qat(model, data, config, on_progress=report)
    assert result.ptq is not None  # qat() always starts from a PTQ calibration
    ptq_accuracy = evaluate(result.ptq, data.test).accuracy
    if out is not None:
        try:
            payload = qat_bytes(result, args.imported if args.imported is not None else args.model)
        except CheckpointError as error:
            raise UsageError(f"--out {shorten(out)}: {error}; nothing was written") from None
        write_output(out, "--out", payload)
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
            f"{config.epochs} epoch(s): float {percent(float_accuracy)}, "
            f"PTQ {percent(ptq_accuracy)}, QAT {percent(simulated.accuracy)} "
            f"({-summary['drop_points']:+.2f} points vs float); "
            f"integer engine {percent(summary['integer_accuracy'])}, "
            f"same prediction on {percent(summary['integer_agreement'])}; "
            f"{', '.join(f'{t:.1f}' for t in result.seconds_per_epoch)} s per epoch"
            + (
                f"; the control (same fine-tuning, no quantizer) {percent(summary['control_accuracy'])}, "
                f"QAT {-summary['drop_points_vs_control']:+.2f} points against it"
                if args.control
                else ""
            )
        )
    return summary
