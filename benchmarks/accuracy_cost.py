"""Accuracy at matched cost on the real digits: JEI-DNN against the baselines, over seeds (issue 3).

    python benchmarks/accuracy_cost.py                 # 3 seeds, writes benchmarks/accuracy_cost.{md,png,json}
    python benchmarks/accuracy_cost.py --quick         # a smoke run (1 seed, few epochs)

Per seed (the train / val / test split of scikit-learn's digits is fixed; the seed drives the backbone's and the
exits' initialisation and shuffling):

1. train a small timm ViT on the training split (stage 0); attach eexit (an IM after each block but the last,
   the ViT's own head as the last exit); cache every exit's features once per split;
2. warm-up: train the IMs alone on depth-weighted CE. These IMs are the start of every JEI-DNN run, and the
   IMs of the confidence-threshold baselines (max probability, entropy, margin);
3. JEI-DNN: one adapter per λ (sweep_lambda), for im_weighting "gate" and "uniform", for "gate" with IC priced
   by depth fraction instead of measured FLOPs (the ablation), and for "gate" without the gate BCE's positive
   weights r_j (pos_weight_cap=1);
4. BoostedNet and L2W-DEN: IMs trained from the same initial state, evaluated with budgeted thresholds.

**Operating points are chosen on validation, for every method the same way.** For a budget f (a fraction of
the backbone's FLOPs), each method offers candidates measured on the validation split: JEI-DNN, for each λ, the
deterministic rule at 0.5 and the gate threshold budget mode sets for each budget of the grid; threshold
methods one per MSDNet budget knob p (a fine grid), thresholds fitted on validation. The candidate with the best
validation accuracy among those costing at most f is applied unchanged to the test split, which reports
accuracy, its realised cost, ECE, and split-conformal coverage / set size at α = 0.1. The 360 validation
images are cut in two fixed stratified halves: "validation" (180: fit()'s validation data, threshold fitting,
budget mode, selection) and "calibration" (180, used only for the conformal quantiles, so that selection on
validation cannot bias them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import eexit
from eexit.baselines import (
    SCORES,
    apply_thresholds,
    fit_budgeted_thresholds,
    geometric_exit_distribution,
    train_boosted,
    train_l2w,
)
from eexit.data import FeatureCache
from eexit.digits import load_digits_splits, make_digits_vit, train_classifier
from eexit.errors import EexitValueError
from eexit.evaluate import CollectedOutputs, EvaluationReport, evaluate_outputs
from eexit.inference import GatePolicy, decide_exits
from eexit.metrics import expected_cost
from eexit.plots import plot_exit_histogram, plot_per_exit_accuracy
from eexit.sweep import budget_threshold, outputs_from_cache, sweep_lambda

TARGETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
ALPHA = 0.1
PS = [p / 4 for p in range(2, 161)]  # MSDNet budget knobs 0.5 .. 40 (base 20), finer than the usual 1..39


@dataclass
class Setup:
    lams: tuple[float, ...] = (0.0, 0.01, 0.03, 0.1, 0.2, 0.4, 0.7, 1.0)
    backbone_epochs: int = 150
    warmup_epochs: int = 30
    jei_epochs: int = 25
    baseline_epochs: int = 30
    meta_interval: int = 5


QUICK = Setup(lams=(0.0, 0.3), backbone_epochs=3, warmup_epochs=2, jei_epochs=2, baseline_epochs=2, meta_interval=2)
# One optimiser for every method, chosen on seed 0's validation split for JEI-DNN: with AdamW at the demo's 5e-3 the
# gates barely move (Adam moves a gate's bias by about lr per step, and a gate sees ~100 steps here).
OPT = dict(optimizer="adamw", lr=2e-2, weight_decay=1e-4, min_lr=1e-4, batch_size=64)


@dataclass
class Candidate:
    """One operating point measured on validation; ``test()`` applies it unchanged to the test split."""

    val_cost: float
    val_accuracy: float
    test: Callable[[], EvaluationReport]


def _outputs(logits: torch.Tensor, labels: torch.Tensor) -> CollectedOutputs:
    return CollectedOutputs(logits, logits.new_zeros(0, logits.shape[1]), labels)


Splits = tuple[CollectedOutputs, CollectedOutputs, CollectedOutputs]  # validation, calibration, test


def threshold_candidates(ee, splits: Splits, score: str) -> list[Candidate]:
    """MSDNet budgeted thresholds on ``score``, one candidate per knob p (logits may be BoostedNet's)."""
    val, cal, test = splits
    table, e = ee.cost_table, val.logits.shape[0]
    val_scores, cal_scores, test_scores = (SCORES[score](s.logits) for s in splits)  # [E, N] each
    out = []
    for p in PS:
        thresholds = fit_budgeted_thresholds(val_scores, geometric_exit_distribution(p, e))
        val_exit = apply_thresholds(val_scores, thresholds)  # [Nv]
        report = evaluate_outputs(ee, val, val_exit)

        def test_report(thresholds=thresholds) -> EvaluationReport:
            calibration = (cal, apply_thresholds(cal_scores, thresholds))
            taken = apply_thresholds(test_scores, thresholds)
            return evaluate_outputs(ee, test, taken, calibration=calibration, alpha=ALPHA)

        cost = expected_cost(val_exit, table.exit_flops) / table.backbone_flops
        out.append(Candidate(cost, report.accuracy, test_report))
    return out


def jei_candidates(ee, outputs: dict[str, Splits]) -> list[Candidate]:
    """Per λ adapter: the deterministic rule at 0.5, and the threshold budget mode picks for every budget."""
    out = []
    for name, (val, cal, test) in outputs.items():
        ee.set_adapter(name)
        thresholds = {0.5}
        for target in TARGETS:
            try:
                thresholds.add(budget_threshold(ee, val, target))
            except EexitValueError:
                continue  # these gates cannot exit early enough for this budget
        for threshold in sorted(thresholds):
            policy = GatePolicy(threshold)
            val_exit = decide_exits(val.logits, val.gate_logits, policy)
            report = evaluate_outputs(ee, val, val_exit)

            def test_report(name=name, cal=cal, test=test, policy=policy) -> EvaluationReport:
                ee.set_adapter(name)
                calibration = (cal, decide_exits(cal.logits, cal.gate_logits, policy))
                taken = decide_exits(test.logits, test.gate_logits, policy)
                return evaluate_outputs(ee, test, taken, calibration=calibration, alpha=ALPHA)

            out.append(Candidate(report.cost_fraction, report.accuracy, test_report))
    return out


def select(candidates: list[Candidate], target: float) -> EvaluationReport | None:
    """Best validation accuracy among the candidates that spend at most ``target`` on validation."""
    within = [c for c in candidates if c.val_cost <= target + 1e-9]
    if not within:
        return None
    return max(within, key=lambda c: (c.val_accuracy, c.val_cost)).test()


def _summary(report: EvaluationReport | None) -> dict | None:
    if report is None:
        return None
    return {
        "accuracy": report.accuracy,
        "cost_fraction": report.cost_fraction,
        "ece_width": report.ece_width,
        "ece_mass": report.ece_mass,
        "coverage": report.conformal["coverage"],
        "set_size": report.conformal["mean_set_size"],
        "exit_rates": report.exit_rates,
        "exit_accuracy_all": report.exit_accuracy_all,
    }


def _halves(data: TensorDataset) -> tuple[TensorDataset, TensorDataset]:
    """The validation split cut in two fixed stratified halves: selection, and conformal calibration."""
    from sklearn.model_selection import train_test_split

    images, labels = data.tensors
    first, second = train_test_split(range(len(labels)), test_size=0.5, stratify=labels.numpy(), random_state=0)
    first, second = torch.as_tensor(first), torch.as_tensor(second)
    return TensorDataset(images[first], labels[first]), TensorDataset(images[second], labels[second])


def run_seed(seed: int, setup: Setup) -> dict:
    start = time.time()
    torch.manual_seed(seed)
    splits = load_digits_splits(seed=0)  # the split is fixed; the seed drives training
    train_loader, _, test_loader = splits.loaders(batch_size=64, seed=seed)
    backbone = make_digits_vit(depth=6, embed_dim=32, num_heads=2, seed=seed)
    train_classifier(backbone, train_loader, epochs=setup.backbone_epochs, lr=4e-3, progress=False)
    backbone.eval()
    t_backbone = time.time() - start
    ee = eexit.attach(backbone)
    val_part, cal_part = _halves(splits.val)
    caches = {
        "train": FeatureCache.collect(ee, train_loader, "train", progress=False),
        "val": FeatureCache.collect(ee, DataLoader(val_part, batch_size=64), "val", progress=False),
        "cal": FeatureCache.collect(ee, DataLoader(cal_part, batch_size=64), "cal", progress=False),
        "test": FeatureCache.collect(ee, test_loader, "test", progress=False),
    }

    def outputs(transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Splits:
        triple = tuple(outputs_from_cache(ee, caches[k]) for k in ("val", "cal", "test"))
        if transform is None:
            return triple  # type: ignore[return-value]
        return tuple(_outputs(transform(o.logits), o.labels) for o in triple)  # type: ignore[return-value]

    initial = ee.adapter_state_dict()
    fit_kwargs = dict(phase_batches=10, seed=seed, progress=False, **OPT)

    # Warm-up IMs: the threshold baselines' IMs and the start of every JEI-DNN run.
    w = setup.warmup_epochs
    eexit.fit(ee, caches["train"], caches["val"], lam=0.0, epochs=w, warmup_epochs=w, **fit_kwargs)
    warm = outputs()
    results: dict[str, dict] = {}
    jei = {
        "JEI-DNN gate": dict(im_weighting="gate"),
        "JEI-DNN uniform": dict(im_weighting="uniform"),
        "JEI-DNN gate, IC=depth": dict(im_weighting="gate", ic="depth"),
        "JEI-DNN gate, r_j = 1": dict(im_weighting="gate", pos_weight_cap=1.0),
    }
    native: dict[str, list] = {}
    for k, (method, extra) in enumerate(jei.items()):
        sweep = sweep_lambda(
            ee, caches["train"], caches["val"], setup.lams, test_loader=caches["test"], adapter_prefix=f"m{k}_",
            epochs=setup.jei_epochs, warmup_epochs=0, **fit_kwargs, **extra,
        )  # fmt: skip
        native[method] = [(p.lam, p.test.cost_fraction, p.test.accuracy) for p in sweep.points]
        per_adapter = {}
        for point in sweep.points:
            ee.set_adapter(point.adapter)
            per_adapter[point.adapter] = outputs()
        candidates = jei_candidates(ee, per_adapter)
        results[method] = {f: _summary(select(candidates, f)) for f in TARGETS}
        ee.set_adapter("default")
    for score, label in (("max_probability", "max-prob"), ("negative_entropy", "entropy"), ("margin", "margin")):
        candidates = threshold_candidates(ee, warm, score)
        results[f"threshold {label} (warm-up IMs)"] = {f: _summary(select(candidates, f)) for f in TARGETS}

    ee.load_adapter_state_dict(initial)
    base = dict(epochs=setup.baseline_epochs, seed=seed, **OPT)
    net = train_boosted(ee, caches["train"], caches["val"], gamma=0.5, **base)
    candidates = threshold_candidates(ee, outputs(net.logits), "max_probability")
    results["BoostedNet (γ=0.5)"] = {f: _summary(select(candidates, f)) for f in TARGETS}

    ee.load_adapter_state_dict(initial)
    train_l2w(ee, caches["train"], caches["val"], meta_interval=setup.meta_interval, **base)
    candidates = threshold_candidates(ee, outputs(), "max_probability")
    results["L2W-DEN"] = {f: _summary(select(candidates, f)) for f in TARGETS}

    backbone_acc = float((caches["test"].final_logits.argmax(-1) == caches["test"].labels).double().mean())
    info = {
        "seed": seed,
        "seconds": time.time() - start,
        "backbone_seconds": t_backbone,
        "backbone_test_accuracy": backbone_acc,
        "ic_measured": ee.cost_table.ic.tolist(),
        "cost_fractions": ee.cost_table.fraction_of_backbone(),
        "warmup_exit_test_accuracy": [float((warm[2].logits[k].argmax(-1) == warm[2].labels).double().mean())
                                      for k in range(ee.num_exits)],
        "jei_native_points": native,
    }  # fmt: skip
    print(f"seed {seed}: backbone {100 * backbone_acc:.1f} % in {t_backbone:.0f} s, total {info['seconds']:.0f} s")
    return {"info": info, "results": results}


def _mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "—"
    mean = statistics.mean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _collect(runs: list[dict], method: str, target: float, key: str) -> list[float]:
    values = [run["results"][method][target] for run in runs]
    return [v[key] for v in values if v is not None]


def markdown(runs: list[dict], seconds: float) -> str:
    methods = list(runs[0]["results"])
    seeds = len(runs)
    lines = [
        f"Test accuracy (%) at matched cost, mean ± std over {seeds} seed(s); operating points chosen on validation "
        "(at most the budget on validation), applied unchanged to test. A dash: no operating point of the method "
        "fits the budget on validation.",
        "",
        "| method | " + " | ".join(f"≤ {int(100 * f)} %" for f in TARGETS) + " | mean |",
        "|---|" + "---|" * (len(TARGETS) + 1),
    ]
    for m in methods:
        cells = [_mean_std(_collect(runs, m, f, "accuracy")) for f in TARGETS]
        means = [statistics.mean([run["results"][m][f]["accuracy"] for f in TARGETS]) for run in runs
                 if all(run["results"][m][f] is not None for f in TARGETS)]  # fmt: skip
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {_mean_std(means)} |")
    lines += [
        "",
        "Realised test cost (% of the backbone's FLOPs) of those operating points:",
        "",
        "| method | " + " | ".join(f"≤ {int(100 * f)} %" for f in TARGETS) + " |",
        "|---|" + "---|" * len(TARGETS),
    ]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(_mean_std(_collect(runs, m, f, "cost_fraction")) for f in TARGETS) + " |")
    for f in (0.5, 0.7):
        lines += [
            "",
            f"Calibration and conformal sets at budget ≤ {int(100 * f)} % (ECE: 15 bins, on the whole test split; "
            f"split conformal at α = {ALPHA}, per-exit quantiles from the held-out calibration half):",
            "",
            "| method | accuracy % | ECE equal-width % | ECE equal-mass % | coverage % | mean set size |",
            "|---|---|---|---|---|---|",
        ]
        for m in methods:
            cells = [_mean_std(_collect(runs, m, f, k)) for k in ("accuracy", "ece_width", "ece_mass", "coverage")]
            cells.append(_mean_std(_collect(runs, m, f, "set_size"), scale=1.0, digits=2))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    info = [run["info"] for run in runs]
    lines += [
        "",
        f"Backbone test accuracy: {_mean_std([i['backbone_test_accuracy'] for i in info])} %. Exit costs (% of the "
        "backbone): " + ", ".join(f"{100 * c:.1f}" for c in info[0]["cost_fractions"]) + ". Warm-up IM test "
        "accuracy per exit (%): " + ", ".join(
            _mean_std([i["warmup_exit_test_accuracy"][k] for i in info]) for k in range(len(info[0]["cost_fractions"]))
        ) + f". Run time: {seconds:.0f} s for {seeds} seed(s).",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), dpi=120)
    ax = fig.subplots()
    markers = "osD^vP*Xh"
    for i, m in enumerate(runs[0]["results"]):
        xs, ys, es = [], [], []
        for f in TARGETS:
            acc = _collect(runs, m, f, "accuracy")
            if len(acc) == len(runs):
                xs.append(100 * statistics.mean(_collect(runs, m, f, "cost_fraction")))
                ys.append(100 * statistics.mean(acc))
                es.append(100 * statistics.stdev(acc) if len(acc) > 1 else 0.0)
        style = "-" if m.startswith("JEI") else "--"
        ax.errorbar(xs, ys, yerr=es, marker=markers[i % len(markers)], ms=4, lw=1.1, ls=style, capsize=2, label=m)
    backbone = 100 * statistics.mean(r["info"]["backbone_test_accuracy"] for r in runs)
    ax.axhline(backbone, c="k", lw=0.8, ls=":", label="full backbone")
    ax.set_xlabel("realised test cost (% of the backbone's FLOPs)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"digits ViT: accuracy at matched cost (mean ± std, {len(runs)} seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def plot_exits(runs: list[dict], stem: Path, target: float = 0.5) -> None:
    """Seed 0's exit histogram and per-exit accuracy at one budget, for the main methods."""
    chosen = ["JEI-DNN gate", "JEI-DNN uniform", "threshold max-prob (warm-up IMs)", "BoostedNet (γ=0.5)", "L2W-DEN"]
    results = runs[0]["results"]
    points = {m: results[m][target] for m in chosen if results[m][target] is not None}
    labels = [str(k + 1) for k in range(len(runs[0]["info"]["cost_fractions"]) - 1)] + ["head"]
    title = f"seed {runs[0]['info']['seed']}, budget ≤ {int(100 * target)} %"
    rates = {m: p["exit_rates"] for m, p in points.items()}
    plot_exit_histogram(rates, f"{stem}_exits.png", exit_labels=labels, title=f"Where test samples exit ({title})")
    accuracy = {m: p["exit_accuracy_all"] for m, p in points.items()}
    name = f"{stem}_exit_accuracy.png"
    plot_per_exit_accuracy(accuracy, name, exit_labels=labels, title=f"Accuracy of each exit, all test images, {title}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, few epochs")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    setup = QUICK if args.quick else Setup()
    seeds = args.seeds[:1] if args.quick else args.seeds
    start = time.time()
    runs = [run_seed(seed, setup) for seed in seeds]
    seconds = time.time() - start
    stem = "accuracy_cost_quick" if args.quick else "accuracy_cost"
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(runs, seconds)
    (args.out / f"{stem}.md").write_text(table)
    (args.out / f"{stem}.json").write_text(json.dumps({"setup": setup.__dict__, "runs": runs}, indent=1))
    plot(runs, args.out / f"{stem}.png")
    plot_exits(runs, args.out / stem)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
