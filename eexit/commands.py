"""What each ``eexit`` command does (:mod:`eexit.cli` parses the flags and turns errors into exit codes)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ._runs import RUN_FILE, load_backbone, read_run, write_json
from .attaching import attach, from_pretrained
from .distributed import Dist, current
from .errors import EexitValueError
from .evaluation import CollectedOutputs, collect_outputs, evaluate_outputs
from .feature_store import default_cache_dir, disk_cache
from .image_data import load_image_dataset
from .inference import decide_exits
from .model import EarlyExitModel

__all__ = ["evaluate", "fit", "push", "sweep"]

_THRESHOLDS = [0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 1.0]


def _loader(dataset: Any, args: argparse.Namespace, shuffle: bool = False) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(getattr(args, "seed", 0))
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=shuffle, num_workers=args.workers, generator=generator
    )


def _device() -> torch.device:
    """This process's accelerator (its launcher's LOCAL_RANK picks the GPU), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def _attach(args: argparse.Namespace) -> tuple[EarlyExitModel, torch.nn.Module]:
    current()  # under a launcher: join the process group (and bind this rank's GPU) before anything runs
    backbone = load_backbone(args.model, args.checkpoint, args.num_classes, args.model_kwargs)
    torch.manual_seed(args.seed)
    extra = {"exit_blocks": args.exit_blocks} if args.exit_blocks else {}
    ee = attach(backbone, gates=args.gates, head=args.head, **extra)
    return ee.to(_device()), backbone


def _run_record(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    checkpoint = str(Path(args.checkpoint).resolve()) if args.checkpoint else None
    return {
        "model": args.model,
        "model_kwargs": args.model_kwargs,
        "checkpoint": checkpoint,
        "num_classes": args.num_classes,
        "dataset": args.dataset,
        "split": args.split,
        "val_dataset": args.val_dataset,
        "val_split": args.val_split,
        **extra,
    }


def _fit_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "epochs": args.epochs,
        "warmup_epochs": min(args.warmup_epochs, args.epochs),
        "lr": args.lr,
        "min_lr": min(2e-4, args.lr),
        "optimizer": args.optimizer,
        "train_backbone": args.train_backbone,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "mixed_precision": None if args.mixed_precision == "no" else args.mixed_precision,
    }


def _threshold_curve(ee: EarlyExitModel, out: CollectedOutputs) -> list[dict[str, float]]:
    """Accuracy and cost of the trained gates at several thresholds (one adapter, many operating points)."""
    fractions = torch.tensor(ee.cost_table.fraction_of_backbone())
    points = []
    for t in _THRESHOLDS:
        taken = decide_exits(out.logits, out.gate_logits, ee.default_policy(t))
        correct = out.logits[taken, torch.arange(taken.shape[0])].argmax(-1) == out.labels
        points.append(
            {"threshold": t, "cost_fraction": float(fractions[taken].mean()), "accuracy": float(correct.float().mean())}
        )
    return points


def _plot(curves: dict[str, list[tuple[float, float]]], backbone_accuracy: float, path: Path, title: str) -> None:
    from .plots import plot_accuracy_cost

    plot_accuracy_cost(
        curves, path, reference=(1.0, backbone_accuracy), title=title, xlabel="fraction of the backbone's FLOPs"
    )


def _val_outputs(ee: EarlyExitModel, val: Any, args: argparse.Namespace, cache_dir: Path) -> CollectedOutputs:
    if args.train_backbone:
        return collect_outputs(ee, _loader(val, args), progress=True, name="val")
    cache = disk_cache(ee, val, cache_dir, name="val", batch_size=args.batch_size, progress=False, dist=Dist())
    return collect_outputs(ee, cache)


def fit(args: argparse.Namespace) -> int:
    """``eexit fit``: one λ; the adapter, ``run.json``, ``results.json`` and ``accuracy_cost.png`` in ``--out``."""
    from .train import fit as fit_exits

    out = Path(args.out)
    if ((out / RUN_FILE).exists() or (out / "checkpoints" / "latest.json").exists()) and not args.resume:
        raise EexitValueError(f"--out {out} already holds a run; pass --resume to continue it, or another folder.")
    dist = current()
    ee, backbone = _attach(args)
    train = load_image_dataset(args.dataset, backbone, ee.num_classes, split=args.split)
    val = load_image_dataset(args.val_dataset, backbone, ee.num_classes, split=args.val_split)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    settings = _fit_settings(args)
    history = fit_exits(
        ee,
        _loader(train, args, shuffle=args.train_backbone),
        _loader(val, args),
        lam=args.lam,
        cache_dir=None if args.train_backbone else cache_dir,
        checkpoint_dir=out / "checkpoints",
        resume=args.resume,
        **settings,
    )
    if dist.is_main:
        val_out = _val_outputs(ee, val, args, cache_dir)
        report = evaluate_outputs(ee, val_out, decide_exits(val_out.logits, val_out.gate_logits, ee.default_policy()))
        ee.evaluation = report.to_dict()
        if args.train_backbone:
            warnings.warn(
                "the backbone was fine-tuned: save its weights too; the adapter records their fingerprint.",
                stacklevel=2,
            )
        ee.save_pretrained(out)
        curve = _threshold_curve(ee, val_out)
        write_json(out / RUN_FILE, _run_record(args, lam=args.lam, fit=settings, gates=args.gates))
        write_json(out / "results.json", {"history": history, "val": report.to_dict(), "val_thresholds": curve})
        _plot(
            {f"gates (λ={args.lam:g}), thresholds": [(p["cost_fraction"], p["accuracy"]) for p in curve]},
            report.backbone_accuracy,
            out / "accuracy_cost.png",
            "validation",
        )
        print(report.to_markdown())
        print(f"\nadapter, run.json, results.json and accuracy_cost.png written to {out}")
    return 0


def sweep(args: argparse.Namespace) -> int:
    """``eexit sweep``: one adapter per λ on one feature cache; ``lam_<λ>/`` run folders, results and the curve."""
    from .sweep import sweep_lambda

    if args.train_backbone:
        raise EexitValueError(
            "sweep shares one pass of a frozen backbone; --train-backbone needs one `eexit fit` per λ."
        )
    out = Path(args.out)
    dist = current()
    ee, backbone = _attach(args)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    caches = {}
    for name, spec, split in (
        ("train", args.dataset, args.split),
        ("val", args.val_dataset, args.val_split),
        ("test", args.test_dataset, args.test_split),
    ):
        if spec is not None:
            data = load_image_dataset(spec, backbone, ee.num_classes, split=split)
            autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
            caches[name] = disk_cache(
                ee, data, cache_dir, name=name, batch_size=args.batch_size, autocast=autocast, dist=dist
            )
    settings = _fit_settings(args)
    settings.pop("mixed_precision")  # the backbone ran once, for the caches above
    settings.pop("train_backbone")
    result = sweep_lambda(ee, caches["train"], caches["val"], args.lams, test_loader=caches.get("test"), **settings)
    if dist.is_main:
        split = "test" if "test" in caches else "val"
        points = []
        for point in result.points:
            folder = out / f"lam_{point.lam:g}"
            ee.set_adapter(point.adapter)
            ee.evaluation = (point.test or point.val).to_dict()
            ee.save_pretrained(folder, adapter_name=point.adapter)
            write_json(folder / RUN_FILE, _run_record(args, lam=point.lam, fit=settings, gates=args.gates))
            report = getattr(point, split)
            points.append(
                {
                    "lam": point.lam,
                    "adapter": str(folder),
                    "val": point.val.to_dict(),
                    "test": point.test and point.test.to_dict(),
                }
            )
            print(
                f"λ={point.lam:<8g} {split} accuracy {100 * report.accuracy:6.2f} %  "
                f"cost {100 * report.cost_fraction:5.1f} % of the backbone"
            )
        write_json(out / "results.json", {"split": split, "points": points})
        backbone_accuracy = getattr(result.points[0], split).backbone_accuracy
        _plot({"gates, one adapter per λ": result.curve(split)}, backbone_accuracy, out / "accuracy_cost.png", split)
        print(f"\n{len(points)} adapters, results.json and accuracy_cost.png written to {out}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """``eexit evaluate RUN``: the adapter of a run folder on a dataset, at a budget or threshold."""
    from .sweep import budget_threshold

    run = read_run(args.run)
    backbone = load_backbone(run["model"], run["checkpoint"], run["num_classes"], run.get("model_kwargs"))
    ee = from_pretrained(backbone, args.run).to(_device())
    data = load_image_dataset(args.dataset, backbone, ee.num_classes, split=args.split)
    cal_spec = args.calibration_dataset or run["val_dataset"]
    cal_split = run["val_split"] if args.calibration_dataset is None else None
    cal = load_image_dataset(cal_spec, backbone, ee.num_classes, split=cal_split)
    fractions = ee.cost_table.fraction_of_backbone()
    if args.budget is not None and not fractions[0] <= args.budget <= fractions[-1]:
        raise EexitValueError(
            f"--budget {args.budget:g} is outside what these exits can spend: from {fractions[0]:.4f} (every "
            f"sample at the first exit) to {fractions[-1]:.4f} (every sample at the last)."
        )
    cal_out = collect_outputs(ee, _loader(cal, args), progress=True, name="calibration data")
    threshold = args.threshold
    if args.budget is not None:
        threshold = budget_threshold(ee, cal_out, args.budget)
    test_out = collect_outputs(ee, _loader(data, args), progress=True, name="--dataset")
    policy = ee.default_policy(threshold)
    taken = decide_exits(test_out.logits, test_out.gate_logits, policy)
    calibration = (cal_out, decide_exits(cal_out.logits, cal_out.gate_logits, policy))
    report = evaluate_outputs(ee, test_out, taken, calibration=calibration, alpha=args.alpha)
    report.extra.update({"threshold": policy.threshold, "budget": args.budget, "dataset": args.dataset})
    stem = "evaluation" + (f"-budget{args.budget:g}" if args.budget is not None else "")
    write_json(Path(args.run) / f"{stem}.json", report.to_dict())
    from .plots import plot_exit_histogram

    plot_exit_histogram({"gates": report.exit_rates}, Path(args.run) / f"{stem}-exits.png")
    print(report.to_markdown())
    print(f"\nthreshold {policy.threshold:.4g}; {stem}.json and {stem}-exits.png written to {args.run}")
    return 0


def export(args: argparse.Namespace) -> int:
    """``eexit export RUN OUT``: the run's adapter on its backbone, as graphs per segment + manifest (``ee.export``)."""
    run = read_run(args.run)
    backbone = load_backbone(run["model"], run["checkpoint"], run["num_classes"], run.get("model_kwargs"))
    ee = from_pretrained(backbone, args.run)
    if args.threshold is not None:
        ee.config = dataclasses.replace(ee.config, threshold=args.threshold)  # validated by ExitConfig
    folder = ee.export(args.out, format=args.format, overwrite=args.overwrite)
    print(f"{ee.num_exits} segments ({args.format}) and eexit_export.json written to {folder}")
    return 0


def push(args: argparse.Namespace) -> int:
    """``eexit push RUN REPO``: upload a run's adapter (after loading it onto its backbone, fingerprint checked)."""
    run = read_run(args.run)
    backbone = load_backbone(run["model"], run["checkpoint"], run["num_classes"], run.get("model_kwargs"))
    ee = from_pretrained(backbone, args.run)
    base = run["model"].partition(":")[2] if run["model"].startswith("hf:") else None
    info = ee.push_to_hub(
        args.repo_id, private=args.private or None, token=args.token, revision=args.revision, base_model=base
    )
    print(f"pushed to {getattr(info, 'commit_url', args.repo_id)}")
    return 0
