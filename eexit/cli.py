"""The ``eexit`` command line: ``fit``, ``sweep``, ``evaluate``, ``push`` and ``demo``.

Every command exits with 0 on success and with 2 and a one-line reason on bad input (``eexit: error: ...``).
``fit`` and ``sweep`` run under ``accelerate launch`` / ``torchrun`` as well as alone (see :func:`eexit.fit`);
``evaluate`` and ``push`` do their work on rank 0 only.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

from .errors import EexitError

__all__ = ["build_parser", "main"]


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices, got {text!r}") from err


def _kwargs(text: str) -> dict[str, Any]:
    """``img_size=224,drop_path_rate=0.1`` -> a dict; values read as int, float, bool or else str."""
    out: dict[str, Any] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, raw = pair.partition("=")
        if not sep or not key.isidentifier():
            raise argparse.ArgumentTypeError(f"expected key=value pairs separated by commas, got {pair!r}")
        value: Any = {"true": True, "false": False}.get(raw.lower(), raw)
        for kind in (int, float):
            if isinstance(value, str):
                try:
                    value = kind(raw)
                except ValueError:
                    pass
        out[key] = value
    return out


def _add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backbone")
    g.add_argument("--model", required=True, help="timm:NAME (e.g. timm:vit_small_patch16_224) or hf:PATH_OR_REPO")
    g.add_argument(
        "--model-kwargs",
        type=_kwargs,
        default={},
        help="timm.create_model arguments, e.g. img_size=32,patch_size=8 (timm models only)",
    )
    g.add_argument("--checkpoint", help="backbone weights as a .safetensors file (timm models are built without)")
    g.add_argument("--num-classes", type=int, help="classes of the backbone's head (default: the model's own)")


def _add_data(p: argparse.ArgumentParser, test: bool = False) -> None:
    g = p.add_argument_group("data (imagefolder:PATH, parquet:PATH, arrow:PATH, hub:NAME or a folder)")
    g.add_argument("--dataset", required=True, help="training data")
    g.add_argument("--split", help="split of --dataset (default: train)")
    g.add_argument("--val-dataset", required=True, help="validation data: gate fitting, r_j, epoch selection")
    g.add_argument("--val-split", help="split of --val-dataset (default: train, i.e. the folder's only split)")
    if test:
        g.add_argument("--test-dataset", help="test data: each λ also gets a test report")
        g.add_argument("--test-split", help="split of --test-dataset")
    g.add_argument("--batch-size", type=int, default=64, help="images per batch (default: %(default)s)")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: %(default)s)")
    g.add_argument("--cache-dir", help="feature cache folder (default: $EEXIT_CACHE or ~/.cache/eexit/features)")


def _add_training(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("exits and training (see eexit.ExitConfig and eexit.FitConfig)")
    g.add_argument("--gates", choices=["hazard", "paper"], default="hazard", help="gate kind (default: %(default)s)")
    g.add_argument("--exit-blocks", type=_ints, help="blocks to put exits after, e.g. 3,6,9 (default: every block)")
    g.add_argument("--head", choices=["linear", "mlp"], default="linear", help="IM kind (default: %(default)s)")
    g.add_argument("--epochs", type=int, default=15, help="training epochs (default: %(default)s)")
    g.add_argument("--warmup-epochs", type=int, default=3, help="IM-only epochs first (default: %(default)s)")
    g.add_argument("--lr", type=float, default=0.01, help="exit learning rate (default: %(default)s)")
    g.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help="exit optimiser (default: %(default)s)")
    g.add_argument("--train-backbone", action="store_true", help="fine-tune the backbone too (no feature cache)")
    g.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no", help="backbone autocast")
    g.add_argument(
        "--seed", type=int, default=0, help="seed of the exits' initialisation and shuffling (default: %(default)s)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command (``eexit <command> --help`` explains each flag)."""
    parser = argparse.ArgumentParser(
        prog="eexit",
        description="Early exits for pretrained vision transformers: train them (JEI-DNN), evaluate, share.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{fit,sweep,evaluate,export,push,demo}")

    fit = sub.add_parser("fit", help="train exits for one λ; writes the adapter, results.json and a plot to --out")
    _add_model(fit)
    _add_data(fit)
    _add_training(fit)
    fit.add_argument("--lam", type=float, default=0.5, help="λ, the price of computation (default: %(default)s)")
    fit.add_argument("--out", required=True, help="run folder: adapter, run.json, results.json, plot, checkpoints")
    fit.add_argument("--resume", action="store_true", help="continue from the last epoch checkpoint in --out")

    sweep = sub.add_parser("sweep", help="train one adapter per λ on one feature cache; writes the curve to --out")
    _add_model(sweep)
    _add_data(sweep, test=True)
    _add_training(sweep)
    sweep.add_argument("--lams", type=_floats, required=True, help="λ values, e.g. 0.01,0.1,0.3,1")
    sweep.add_argument("--out", required=True, help="folder: one adapter per λ (lam_<λ>/), results.json, plot")

    ev = sub.add_parser("evaluate", help="accuracy, cost, exit rates, calibration of a run's adapter on a dataset")
    ev.add_argument("run", help="the --out folder of `eexit fit`")
    ev.add_argument("--dataset", required=True, help="data to evaluate on (same forms as fit's --dataset)")
    ev.add_argument("--split", help="split of --dataset (default: train, i.e. the folder's only split)")
    ev.add_argument("--budget", type=float, help="average cost as a fraction of the backbone's, met on validation")
    ev.add_argument("--threshold", type=float, help="gate threshold (default: the adapter's, 0.5 unless changed)")
    ev.add_argument("--calibration-dataset", help="held-out data for --budget and conformal sets (default: fit's val)")
    ev.add_argument("--alpha", type=float, default=0.1, help="conformal miscoverage level (default: %(default)s)")
    ev.add_argument("--batch-size", type=int, default=64, help="images per batch (default: %(default)s)")
    ev.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: %(default)s)")

    exp = sub.add_parser("export", help="one graph per exit segment + manifest, for ONNX Runtime or torch.export")
    exp.add_argument("run", help="the --out folder of `eexit fit`")
    exp.add_argument("out", help="folder to write (must not exist, unless --overwrite replaces an earlier export)")
    exp.add_argument("--format", choices=["onnx", "torch"], default="onnx", help="graph format (default: %(default)s)")
    exp.add_argument("--threshold", type=float, help="gate threshold stored as the default (default: the adapter's)")
    exp.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT")

    push = sub.add_parser("push", help="upload a run's adapter to the Hugging Face Hub")
    push.add_argument("run", help="the --out folder of `eexit fit`")
    push.add_argument("repo_id", help="Hub repo, e.g. me/vit-small-exits")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", help="branch to commit to (default: main)")
    push.add_argument("--token", help="Hub token (default: the logged-in one)")

    demo = sub.add_parser("demo", help="train a small ViT on the bundled digits, attach eexit, compare methods")
    demo.add_argument(
        "--out", default="outputs/demo", help="folder for adapter, plot and results (default: %(default)s)"
    )
    demo.add_argument("--lams", default="0.01,0.1,0.3,1.0", type=_floats, help="λ values (default: %(default)s)")
    demo.add_argument("--quick", action="store_true", help="a much shorter run, for smoke tests")
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of the data split and every training (default: %(default)s)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (2 with a one-line reason on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except EexitError as err:
        print(f"eexit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a folder that cannot be written, a full disk: not a bug, one line is enough
        print(f"eexit {args.command}: error: {err}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    from . import commands

    if args.command == "demo":
        from .demo import run_demo

        run_demo(out_dir=args.out, lams=args.lams, quick=args.quick, seed=args.seed)
        return 0
    _check_numbers(args)
    if args.command in ("evaluate", "export", "push") and int(os.environ.get("RANK", "0")) != 0:
        return 0  # one process's work: under a launcher, the other ranks would only write the same files again
    run = {
        "fit": commands.fit,
        "sweep": commands.sweep,
        "evaluate": commands.evaluate,
        "export": commands.export,
        "push": commands.push,
    }
    return run[args.command](args)


def _check_numbers(args: argparse.Namespace) -> None:
    from .errors import EexitValueError

    checks: dict[str, Any] = {
        "batch_size": lambda v: v >= 1,
        "workers": lambda v: v >= 0,
        "epochs": lambda v: v >= 1,
        "num_classes": lambda v: v >= 2,
        "lam": lambda v: math.isfinite(v) and v >= 0,
        "budget": lambda v: 0 < v <= 1,
        "threshold": lambda v: 0 < v <= 1,
        "alpha": lambda v: 0 < v < 1,
    }
    for name, ok in checks.items():
        value = getattr(args, name, None)
        if value is not None and not ok(value):
            flag = "--" + name.replace("_", "-")
            raise EexitValueError(f"{flag} {value} is out of range; see `eexit {args.command} --help`.")
    if getattr(args, "budget", None) is not None and getattr(args, "threshold", None) is not None:
        raise EexitValueError("give --budget or --threshold, not both.")
    out = getattr(args, "out", None)
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise EexitValueError(f"--out {out} is a file; give a folder.")
