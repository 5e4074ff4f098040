"""The embedded default job: early exits on real handwritten digits, on a CPU, in a few minutes.

1. train a small timm ViT on scikit-learn's digits (fixed train / val / test split);
2. attach eexit and train its default exits (hazard gates) for several λ (one named adapter per λ);
3. on the same IMs, fit the plain max-probability threshold exit with the MSDNet budgeted-batch protocol;
4. attach the JEI-DNN paper's gates instead and train them for the same λ;
5. print accuracy, mean GFLOPs, fraction of the backbone's cost and the exit histogram of every method beside
   the full backbone; save the default adapter and an accuracy-vs-cost plot.

360 test digits cannot resolve differences under ~2.5 points: the comparison that decides is the Fashion-MNIST
benchmark (``benchmarks/accuracy_cost.py --dataset fashion-mnist``, results in the README).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .attaching import attach
from .baselines.thresholds import budgeted_curve
from .config import ExitConfig
from .digits import load_digits_splits, make_digits_vit, train_classifier
from .evaluation import collect_outputs, evaluate
from .inference import ThresholdPolicy
from .plots import plot_accuracy_cost
from .train import fit

__all__ = ["run_demo"]


def _row(name: str, acc: float, gflops: float, frac: float, hist: list[float]) -> str:
    hist_s = " ".join(f"{100 * h:3.0f}" for h in hist)
    return f"| {name:<24} | {100 * acc:6.2f} | {gflops:9.5f} | {100 * frac:5.1f} % | {hist_s} |"


def run_demo(
    out_dir: str | Path = "outputs/demo", lams: list[float] | None = None, quick: bool = False, seed: int = 0
) -> dict:
    """Run the demo and return its results (also written to ``out_dir/results.json``)."""
    start = time.time()
    torch.manual_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lams = lams or [0.01, 0.1, 0.3, 1.0]
    splits = load_digits_splits(seed=seed)
    train_loader, val_loader, test_loader = splits.loaders(batch_size=64, seed=seed)

    backbone = make_digits_vit(seed=seed)
    train_classifier(backbone, train_loader, epochs=5 if quick else 100)

    ee = attach(backbone)
    table = ee.cost_table
    print(
        f"\nattached {ee.num_exits} exits; cumulative cost per exit (% of backbone): "
        + ", ".join(f"{100 * f:.0f}" for f in table.fraction_of_backbone())
    )
    initial = ee.adapter_state_dict()
    fit_kwargs = dict(
        epochs=4 if quick else 60,
        warmup_epochs=2 if quick else 15,
        phase_batches=10,
        optimizer="adamw",
        lr=2e-2,  # gates need a larger step than Adam at 5e-3 gives them in a few hundred steps
        weight_decay=1e-4,
        min_lr=1e-4,
        seed=seed,
    )

    header = "| method                   | acc %  | GFLOPs    | cost    | exit histogram (% per exit) |"
    rows = [header, "|" + "---|" * 5]
    results: dict = {"lams": {}, "paper": {}, "threshold": [], "cost_table": table.to_dict()}
    default, paper = "eexit default (λ sweep)", "JEI-DNN paper gates (λ sweep)"
    points: dict[str, list[tuple[float, float]]] = {default: [], paper: [], "max-prob threshold (MSDNet)": []}

    for i, lam in enumerate(lams):
        ee.load_adapter_state_dict(initial)
        fit(ee, train_loader, val_loader, lam=lam, **fit_kwargs)
        report = evaluate(ee, test_loader, calibration_loader=val_loader, alpha=0.1)
        if i == 0:
            rows.insert(
                2,
                _row(
                    "full backbone",
                    report.backbone_accuracy,
                    report.backbone_gflops,
                    1.0,
                    [0.0] * (ee.num_exits - 1) + [1.0],
                ),
            )
        rows.append(
            _row(
                f"eexit default λ={lam:g}", report.accuracy, report.mean_gflops, report.cost_fraction, report.exit_rates
            )
        )
        points[default].append((report.mean_gflops, report.accuracy))
        results["lams"][str(lam)] = report.to_dict()
        ee.evaluation = report.to_dict()  # saved with this λ's adapter (evaluate itself changes nothing)
        ee.add_adapter(f"lam_{lam:g}")

    # The threshold baseline on the same IMs: those of the middle λ's adapter.
    base_name = f"lam_{lams[len(lams) // 2]:g}"
    ee.set_adapter(base_name)
    val_out, test_out = collect_outputs(ee, val_loader), collect_outputs(ee, test_loader)
    curve = budgeted_curve(val_out.logits, test_out.logits, test_out.labels, table.exit_flops)
    for point in curve:
        points["max-prob threshold (MSDNet)"].append((point.cost / 1e9, point.accuracy))
    # Show the threshold points whose cost is closest to each JEI-DNN point (matched cost).
    for gflops, _ in points[default]:
        point = min(curve, key=lambda p: abs(p.cost / 1e9 - gflops))
        report = evaluate(ee, test_loader, policy=ThresholdPolicy(torch.tensor(point.thresholds[:-1])))
        rows.append(
            _row(
                f"threshold p={point.p:g} ({base_name})",
                report.accuracy,
                report.mean_gflops,
                report.cost_fraction,
                report.exit_rates,
            )
        )
        results["threshold"].append(report.to_dict())

    # The paper's gates, trained the same way from the same initial IMs (issue 8: the ablation baseline).
    adapter_dir = out / "adapter"
    ee.set_adapter(base_name)
    ee.save_pretrained(adapter_dir)
    backbone = ee.detach()
    ee = attach(backbone, config=ExitConfig(gates="paper"))
    paper_initial = ee.adapter_state_dict()
    paper_initial.update({k: v for k, v in initial.items() if k.startswith("heads.")})
    for lam in lams:
        ee.load_adapter_state_dict(paper_initial)
        fit(ee, train_loader, val_loader, lam=lam, **fit_kwargs)
        report = evaluate(ee, test_loader, calibration_loader=val_loader, alpha=0.1)
        rows.append(
            _row(
                f"JEI-DNN paper λ={lam:g}", report.accuracy, report.mean_gflops, report.cost_fraction, report.exit_rates
            )
        )
        points[paper].append((report.mean_gflops, report.accuracy))
        results["paper"][str(lam)] = report.to_dict()

    print("\nDigits test set (" + f"{len(splits.test)} images), every method on the same test split:\n")
    print("\n".join(rows))
    full = (table.backbone_flops / 1e9, results["lams"][str(lams[0])]["backbone_accuracy"])
    plot_accuracy_cost(points, out / "accuracy_cost.png", reference=full, title="eexit on digits (test split)")
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    print(
        f"\nsaved the {base_name} adapter to {adapter_dir}, the plot to {out / 'accuracy_cost.png'}, "
        f"results to {out / 'results.json'} ({time.time() - start:.0f} s)"
    )
    return results
