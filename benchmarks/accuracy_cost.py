"""Accuracy at matched cost: learned exit gates against confidence thresholds and the oracle (issue 8).

    python benchmarks/accuracy_cost.py --dataset fashion-mnist     # the benchmark that decides (10,000 test images)
    python benchmarks/accuracy_cost.py                             # digits, the quick default (360 test images)
    python benchmarks/accuracy_cost.py --dataset fashion-mnist --quick   # the CI slice: a few thousand images

Protocol, fixed before any result was looked at:

* splits: the backbone trains on ``train`` only. Validation (10,000 Fashion-MNIST images the backbone never saw)
  is cut in two fixed stratified halves: A (``fit()``'s validation data: what the default gates are fitted on,
  epoch selection) and B (choosing λ and τ). Threshold baselines have no training of their own, so they fit and
  choose their thresholds on A ∪ B. Test (10,000) is used only to report.
* every method on the same backbone, cost table and warm-up IMs (trained alone, λ = 0, on ``train``); learned
  gates train further from them (their IM phase); the threshold baselines are also run on the learned gates' IMs
  ("same IMs"), so gate and IM effects can be told apart.
* operating points: each method offers candidates measured on its selection split (gates: each λ of the sweep ×
  the deterministic τ = 0.5 and the τ budget mode picks for a fine budget grid; MSDNet thresholds: one per
  budget knob p; tuned per-exit thresholds: one per cost price μ). For a budget f the most accurate candidate
  whose selection cost is at most f is applied unchanged to test (if none fits, the cheapest).
* endpoints: mean test accuracy over budgets 0.35, 0.45, 0.55 (primary: where exits differ) and over
  0.35, ..., 0.85 (secondary). Paired differences against each threshold baseline: mean over the
  (backbone seed × exit seed) runs, 95 % t-interval over runs, and a 95 % paired bootstrap over test images
  (the same resampled images for every run). The oracle (each test sample at its earliest correct exit, the
  cheapest samples first, up to the budget) is the ceiling; "gap closed" is (method − threshold) / (oracle −
  threshold).
* ECE (15 equal-width bins) of the chosen points with a bootstrap interval over test images; split-conformal
  coverage at α = 0.1 with per-exit quantiles, averaged over 20 random calibration / evaluation halves of test.
* budget mode: for every λ adapter, τ from B for each requested budget from the first exit's cost to 95 %; the
  largest |realised test cost − budget| is reported.
* ablation (one backbone, 3 exit seeds): the paper's gates, each change alone, all together (the default).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

import eexit
from eexit import metrics
from eexit.baselines import (
    SCORES,
    apply_thresholds,
    fit_budgeted_thresholds,
    geometric_exit_distribution,
    train_boosted,
    train_l2w,
    tuned_threshold_curve,
)
from eexit.config import GATE_FEATURES, HISTORY_FEATURES
from eexit.data import FeatureCache
from eexit.errors import EexitValueError
from eexit.evaluation import CollectedOutputs
from eexit.inference import decide_exits
from eexit.sweep import budget_threshold, outputs_from_cache, sweep_lambda

BUDGETS = (0.35, 0.45, 0.55, 0.65, 0.75, 0.85)
PRIMARY = (0.35, 0.45, 0.55)
ALPHA = 0.1
PS = [p / 4 for p in range(2, 161)]  # MSDNet budget knobs 0.5 .. 40 (base 20), finer than the usual 1..39
TAU_BUDGETS = [f / 100 for f in range(10, 100, 2)]  # budget mode's grid of τ candidates
OPT = dict(optimizer="adamw", lr=2e-2, weight_decay=1e-4, min_lr=1e-4, phase_batches=10)


@dataclass
class Setup:
    dataset: str = "digits"
    backbone_seeds: tuple[int, ...] = (0, 1)
    exit_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    ablation_seeds: tuple[int, ...] = (0, 1, 2)
    lams: tuple[float, ...] = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
    backbone_epochs: int = 150
    warmup_epochs: int = 30
    jei_epochs: int = 10
    baseline_epochs: int = 30
    meta_interval: int = 5
    batch_size: int = 64
    limit: int | None = None


SETUPS = {
    "digits": Setup(),
    "digits-quick": Setup(
        backbone_seeds=(0,),
        exit_seeds=(0,),
        ablation_seeds=(),
        lams=(0.0, 0.3),
        backbone_epochs=3,
        warmup_epochs=2,
        jei_epochs=2,
        baseline_epochs=2,
        meta_interval=2,
    ),
    "fashion-mnist": Setup(
        "fashion-mnist",
        exit_seeds=(0, 1, 2, 3, 4),
        ablation_seeds=(0, 1, 2),
        backbone_epochs=10,
        warmup_epochs=8,
        jei_epochs=4,
        baseline_epochs=8,
        meta_interval=50,
        batch_size=256,
    ),
    "fashion-mnist-quick": Setup(
        "fashion-mnist",
        backbone_seeds=(0,),
        exit_seeds=(0,),
        ablation_seeds=(0,),
        lams=(0.0, 0.1),
        backbone_epochs=1,
        warmup_epochs=2,
        jei_epochs=2,
        baseline_epochs=1,
        meta_interval=10,
        batch_size=128,
        limit=2000,
    ),
}

# The ablation: (exit config, fit config) changes, each alone on top of the paper's gates, then together.
PAPER = dict(gates="paper")
ABLATION: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "paper (JEI-DNN as published)": (PAPER, {}),
    "+ hazard targets / product model / rule": (
        dict(gates="hazard", gate_features=GATE_FEATURES),
        dict(gate_fit="sgd", gate_data="train", pos_weight="paper", im_weighting="gate"),
    ),
    "+ r_j from the gate's own task": (PAPER, dict(pos_weight="task")),
    "+ gates on held-out outputs": (PAPER, dict(gate_data="val")),
    "+ cross-exit gate inputs": (dict(PAPER, gate_features=GATE_FEATURES + HISTORY_FEATURES), {}),
    "+ exact gate solver": (PAPER, dict(gate_fit="exact")),
    "+ mixed IM weights": (PAPER, dict(im_weighting="mixed")),
    "all together (default)": ({}, {}),
}
DEFAULT, PAPER_NAME = "eexit default (hazard gates)", "JEI-DNN paper gates"
THRESHOLD_MSDNET, THRESHOLD_TUNED = "max-prob, MSDNet", "max-prob, tuned per exit"


# ------------------------------------------------------------------------------------------ data
def load_splits(setup: Setup) -> tuple[TensorDataset, TensorDataset, TensorDataset, TensorDataset]:
    """train, validation half A, validation half B, test."""
    from sklearn.model_selection import train_test_split

    if setup.dataset == "digits":
        from eexit.digits import load_digits_splits

        s = load_digits_splits(seed=0)
    else:
        from eexit.fashion_mnist import load_fashion_mnist

        s = load_fashion_mnist()
    train, val, test = s.train, s.val, s.test
    if setup.limit is not None:
        train, val, test = (TensorDataset(*(t[: setup.limit] for t in d.tensors)) for d in (train, val, test))
    images, labels = val.tensors
    a, b = train_test_split(range(len(labels)), test_size=0.5, stratify=labels.numpy(), random_state=0)
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return train, TensorDataset(images[a], labels[a]), TensorDataset(images[b], labels[b]), test


def make_backbone(setup: Setup, seed: int, train: TensorDataset, cache: Path | None) -> tuple[torch.nn.Module, float]:
    if setup.dataset == "digits":
        from eexit.digits import make_digits_vit, train_classifier

        start = time.time()
        model = make_digits_vit(depth=6, embed_dim=32, num_heads=2, seed=seed)
        loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
        train_classifier(model, loader, epochs=setup.backbone_epochs, lr=4e-3, progress=False)
        return model.eval(), time.time() - start
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from fashion_backbone import CACHE, fashion_backbone

    from eexit.fashion_mnist import FashionMNISTSplits

    return fashion_backbone(seed, FashionMNISTSplits(train, train, train), setup.backbone_epochs, cache or CACHE)


# ------------------------------------------------------------------------------------------ candidates
@dataclass
class Candidate:
    """One operating point: its cost and accuracy on the selection split, and the exits it takes on test."""

    sel_cost: float
    sel_accuracy: float
    test: CollectedOutputs
    test_exit: torch.Tensor
    label: str = ""


def _acc_cost(out: CollectedOutputs, taken: torch.Tensor, costs: torch.Tensor) -> tuple[float, float]:
    chosen = out.logits[taken, torch.arange(taken.numel())]
    return float((chosen.argmax(-1) == out.labels).double().mean()), float(costs[taken].mean())


def gate_candidates(ee, sel: CollectedOutputs, test: CollectedOutputs, costs: torch.Tensor, tag: str) -> list:
    taus = {0.5}
    for f in TAU_BUDGETS:
        try:
            taus.add(budget_threshold(ee, sel, f))
        except EexitValueError:
            continue  # these gates cannot spend that little on B
    out = []
    for tau in sorted(taus):
        policy = ee.default_policy(tau)
        acc, cost = _acc_cost(sel, decide_exits(sel.logits, sel.gate_logits, policy), costs)
        out.append(
            Candidate(cost, acc, test, decide_exits(test.logits, test.gate_logits, policy), f"{tag} τ={tau:.4g}")
        )
    return out


def msdnet_candidates(
    sel: CollectedOutputs, test: CollectedOutputs, costs: torch.Tensor, score: str, tag: str = ""
) -> list:
    sel_scores, test_scores = SCORES[score](sel.logits), SCORES[score](test.logits)
    out = []
    for p in PS:
        t = fit_budgeted_thresholds(sel_scores, geometric_exit_distribution(p, sel.logits.shape[0]))
        acc, cost = _acc_cost(sel, apply_thresholds(sel_scores, t), costs)
        out.append(Candidate(cost, acc, test, apply_thresholds(test_scores, t), f"{tag} p={p:g}"))
    return out


def tuned_candidates(sel: CollectedOutputs, test: CollectedOutputs, costs: torch.Tensor, tag: str = "") -> list:
    sel_scores, test_scores = SCORES["max_probability"](sel.logits), SCORES["max_probability"](test.logits)
    correct = sel.logits.argmax(-1) == sel.labels.unsqueeze(0)
    out = []
    for t in tuned_threshold_curve(sel_scores, correct, costs):
        acc, cost = _acc_cost(sel, apply_thresholds(sel_scores, t), costs)
        out.append(Candidate(cost, acc, test, apply_thresholds(test_scores, t), tag))
    return out


def select(candidates: list[Candidate], budget: float) -> Candidate:
    within = [c for c in candidates if c.sel_cost <= budget + 1e-9]
    if not within:
        return min(candidates, key=lambda c: c.sel_cost)
    return max(within, key=lambda c: (c.sel_accuracy, -c.sel_cost))


def merge(*outs: CollectedOutputs) -> CollectedOutputs:
    return CollectedOutputs(
        torch.cat([o.logits for o in outs], 1),
        torch.cat([o.gate_logits for o in outs], 1),
        torch.cat([o.labels for o in outs]),
    )


def oracle_accuracy(test: CollectedOutputs, costs: torch.Tensor, budget: float) -> float:
    """The most test samples that can be right within the budget: the cheapest-to-get-right first."""
    correct = test.logits.argmax(-1) == test.labels.unsqueeze(0)  # [E, N]
    first = torch.where(correct.any(0), correct.to(torch.uint8).argmax(0), torch.full_like(test.labels, -1))
    n = first.numel()
    extra = (costs[first.clamp(min=0)] - costs[0])[first >= 0].sort().values  # cost above "everyone at exit 0"
    room = (budget - float(costs[0])) * n
    return float((extra.cumsum(0) <= room + 1e-9).sum()) / n


# ------------------------------------------------------------------------------------------ one point's report
def point_report(c: Candidate, costs: torch.Tensor, gen: torch.Generator, full: bool) -> dict[str, Any]:
    """Accuracy and cost of a chosen point on test; with ``full``, also ECE with its interval and conformal sets."""
    test, taken = c.test, c.test_exit
    n = taken.numel()
    chosen = test.logits[taken, torch.arange(n)]  # [N, C]
    correct = chosen.argmax(-1) == test.labels
    brief = {
        "accuracy": float(correct.double().mean()),
        "cost": float(costs[taken].mean()),
        "sel_cost": c.sel_cost,
        "sel_accuracy": c.sel_accuracy,
        "label": c.label,
        "exit_rates": metrics.exit_rates(taken, test.logits.shape[0]).tolist(),
        "_correct": correct,
    }
    if not full:
        return brief
    ece = metrics.expected_calibration_error(chosen, test.labels, 15, "width")
    boots = []
    for _ in range(100):
        ix = torch.randint(0, n, (n,), generator=gen)
        boots.append(metrics.expected_calibration_error(chosen[ix], test.labels[ix], 15, "width"))
    coverages, sizes = [], []
    for _ in range(20):
        perm = torch.randperm(n, generator=gen)
        cal, ev = perm[: n // 2], perm[n // 2 :]
        qhat = metrics.conformal_calibrate(test.logits[:, cal], test.labels[cal], taken[cal], ALPHA)
        sets = metrics.conformal_sets(chosen[ev], taken[ev], qhat)
        cov, size = metrics.conformal_coverage_and_size(sets, test.labels[ev])
        coverages.append(cov)
        sizes.append(size)
    boots.sort()
    return {
        **brief,
        "ece": ece,
        "ece_interval": [boots[2], boots[97]],
        "coverage": statistics.mean(coverages),
        "set_size": statistics.mean(sizes),
    }


# ------------------------------------------------------------------------------------------ one run
@dataclass
class Run:
    backbone_seed: int
    exit_seed: int
    results: dict[str, dict[float, dict]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def jei_sweep(backbone, caches, warm_heads, exit_kwargs, fit_kwargs, setup, seed, costs, budget_check=False):
    """One gate method: a λ sweep from the warm-up IMs; its candidates and, optionally, the budget-mode check."""
    ee = eexit.attach(backbone, config=eexit.ExitConfig(**exit_kwargs))
    ee.heads.load_state_dict(warm_heads)
    kwargs = dict(OPT, batch_size=setup.batch_size, progress=False, seed=seed, **fit_kwargs)
    sweep = sweep_lambda(
        ee, caches["train"], caches["a"], setup.lams, epochs=setup.jei_epochs, warmup_epochs=0, **kwargs
    )
    candidates, same_ims, deviations, reach = [], {}, [], []
    first = float(costs[0])
    for point in sweep.points:
        ee.set_adapter(point.adapter)
        sel, test, a = (outputs_from_cache(ee, caches[k]) for k in ("b", "test", "a"))
        candidates += gate_candidates(ee, sel, test, costs, f"λ={point.lam:g}")
        same_ims[point.lam] = (merge(a, sel), test)
        if budget_check:
            for f in [first + 0.01, *[g / 100 for g in range(20, 96, 5)]]:
                try:
                    tau = budget_threshold(ee, sel, f)
                except EexitValueError:
                    continue
                policy = ee.default_policy(tau)
                sel_cost = float(costs[decide_exits(sel.logits, sel.gate_logits, policy)].mean())
                test_cost = float(costs[decide_exits(test.logits, test.gate_logits, policy)].mean())
                if abs(sel_cost - f) <= 0.02:  # the gates can spend this budget (on B); how close on test?
                    deviations.append(abs(test_cost - f))
                    reach.append(f)
    ee.detach()
    return candidates, same_ims, {"max_deviation": max(deviations, default=math.nan), "budgets": reach}


def run_one(setup: Setup, backbone_seed: int, exit_seed: int, splits, backbones, ablation: bool) -> Run:
    start = time.time()
    train, a, b, test = splits
    backbone = backbones[backbone_seed]
    run = Run(backbone_seed, exit_seed)
    torch.manual_seed(exit_seed)
    ee = eexit.attach(backbone)
    costs = torch.tensor(ee.cost_table.fraction_of_backbone(), dtype=torch.float64)
    loaders = {k: DataLoader(d, batch_size=512) for k, d in (("train", train), ("a", a), ("b", b), ("test", test))}
    caches = {k: FeatureCache.collect(ee, loader, k, progress=False) for k, loader in loaders.items()}
    fit_kwargs = dict(OPT, batch_size=setup.batch_size, progress=False, seed=exit_seed)
    w = setup.warmup_epochs
    initial = ee.adapter_state_dict()
    eexit.fit(ee, caches["train"], caches["a"], lam=0.0, epochs=w, warmup_epochs=w, **fit_kwargs)
    warm_heads = {k: v.clone() for k, v in ee.heads.state_dict().items()}
    warm_sel, warm_test = (
        merge(outputs_from_cache(ee, caches["a"]), outputs_from_cache(ee, caches["b"])),
        outputs_from_cache(ee, caches["test"]),
    )
    cands: dict[str, list[Candidate]] = {
        THRESHOLD_MSDNET: msdnet_candidates(warm_sel, warm_test, costs, "max_probability"),
        "entropy, MSDNet": msdnet_candidates(warm_sel, warm_test, costs, "negative_entropy"),
        "margin, MSDNet": msdnet_candidates(warm_sel, warm_test, costs, "margin"),
        THRESHOLD_TUNED: tuned_candidates(warm_sel, warm_test, costs),
    }
    base = dict(
        epochs=setup.baseline_epochs,
        seed=exit_seed,
        batch_size=setup.batch_size,
        **{k: OPT[k] for k in ("optimizer", "lr", "weight_decay", "min_lr")},
    )
    ee.load_adapter_state_dict(initial)
    net = train_boosted(ee, caches["train"], caches["a"], gamma=0.5, **base)
    sel_b = merge(*(outputs_from_cache(ee, caches[k]) for k in ("a", "b")))
    sel_b = CollectedOutputs(net.logits(sel_b.logits), sel_b.gate_logits, sel_b.labels)
    test_b = outputs_from_cache(ee, caches["test"])
    test_b = CollectedOutputs(net.logits(test_b.logits), test_b.gate_logits, test_b.labels)
    cands["BoostedNet (γ=0.5), max-prob"] = msdnet_candidates(sel_b, test_b, costs, "max_probability")
    ee.load_adapter_state_dict(initial)
    train_l2w(ee, caches["train"], caches["a"], meta_interval=setup.meta_interval, **base)
    sel_l = merge(*(outputs_from_cache(ee, caches[k]) for k in ("a", "b")))
    cands["L2W-DEN, max-prob"] = msdnet_candidates(
        sel_l, outputs_from_cache(ee, caches["test"]), costs, "max_probability"
    )
    ee.detach()

    cands[DEFAULT], same_ims, budget_default = jei_sweep(
        backbone, caches, warm_heads, {}, {}, setup, exit_seed, costs, True
    )
    cands[PAPER_NAME], _, budget_paper = jei_sweep(
        backbone, caches, warm_heads, PAPER, {}, setup, exit_seed, costs, True
    )
    cands[f"{THRESHOLD_MSDNET} (default's IMs)"] = [
        c for sel, t in same_ims.values() for c in msdnet_candidates(sel, t, costs, "max_probability")
    ]
    cands[f"{THRESHOLD_TUNED} (default's IMs)"] = [
        c for sel, t in same_ims.values() for c in tuned_candidates(sel, t, costs)
    ]
    if ablation:
        for name, (exit_kwargs, fit_over) in ABLATION.items():
            if name == "all together (default)":
                cands[f"ablation: {name}"] = cands[DEFAULT]
            elif name.startswith("paper"):
                cands[f"ablation: {name}"] = cands[PAPER_NAME]
            else:
                cands[f"ablation: {name}"] = jei_sweep(
                    backbone, caches, warm_heads, exit_kwargs, fit_over, setup, exit_seed, costs
                )[0]
    gen = torch.Generator().manual_seed(1000 * backbone_seed + exit_seed)
    calibrated = (DEFAULT, PAPER_NAME, THRESHOLD_MSDNET, THRESHOLD_TUNED)
    for method, cs in cands.items():
        run.results[method] = {f: point_report(select(cs, f), costs, gen, method in calibrated) for f in BUDGETS}
    run.results["oracle (warm-up IMs)"] = {
        f: {"accuracy": oracle_accuracy(warm_test, costs, f), "cost": f} for f in BUDGETS
    }
    run.info = {
        "seconds": time.time() - start,
        "backbone_test_accuracy": float(
            (caches["test"].final_logits.argmax(-1) == caches["test"].labels).double().mean()
        ),
        "cost_fractions": costs.tolist(),
        "warm_exit_test_accuracy": (warm_test.logits.argmax(-1) == warm_test.labels).double().mean(1).tolist(),
        "budget_mode": {DEFAULT: budget_default, PAPER_NAME: budget_paper},
    }
    print(f"run backbone {backbone_seed} exits {exit_seed}: {run.info['seconds']:.0f} s", flush=True)
    return run


# ------------------------------------------------------------------------------------------ statistics
def _t95(n: int) -> float:
    table = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}
    return table.get(n - 1, 1.96) if n > 1 else math.nan


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    m = statistics.mean(values)
    if len(values) < 2:
        return m, math.nan, math.nan
    h = _t95(len(values)) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - h, m + h


def endpoint(run: Run, method: str, budgets) -> float:
    return statistics.mean(run.results[method][f]["accuracy"] for f in budgets)


def bootstrap_difference(
    runs: list[Run], method: str, baseline: str, budgets, boots: int = 1000
) -> tuple[float, float]:
    """95 % paired bootstrap interval over test images of the endpoint difference (mean over runs and budgets)."""
    diff = torch.stack(
        [
            torch.stack(
                [
                    r.results[method][f]["_correct"].double() - r.results[baseline][f]["_correct"].double()
                    for f in budgets
                ]
            )
            for r in runs
        ]
    ).mean(dim=(0, 1))  # [N]: per test image, mean over runs and budgets
    n = diff.numel()
    gen = torch.Generator().manual_seed(0)
    counts = torch.stack([torch.bincount(torch.randint(0, n, (n,), generator=gen), minlength=n) for _ in range(boots)])
    values = (counts.double() @ diff / n).sort().values
    return float(values[int(0.025 * boots)]), float(values[int(0.975 * boots) - 1])


def pct(x: float) -> str:
    return "—" if x is None or math.isnan(x) else f"{100 * x:.2f}"


def ci_cell(m: float, lo: float, hi: float, signed: bool = False) -> str:
    s = f"{100 * m:+.2f}" if signed else f"{100 * m:.2f}"
    return (
        s if math.isnan(lo) else f"{s} [{100 * lo:+.2f}, {100 * hi:+.2f}]" if signed else f"{s} ± {100 * (hi - m):.2f}"
    )


def markdown(runs: list[Run], setup: Setup, seconds: float) -> str:
    headline = [m for m in runs[0].results if not m.startswith("ablation")]
    n_test = runs[0].results[DEFAULT][BUDGETS[0]]["_correct"].numel()
    lines = [
        f"**{setup.dataset}**, {len(runs)} run(s) finished (backbone seeds "
        f"{sorted({r.backbone_seed for r in runs})} × exit seeds {sorted({r.exit_seed for r in runs})}; the setup "
        f"asks for {len(setup.backbone_seeds)} × {len(setup.exit_seeds)}), {n_test} test images. Test accuracy (%) at "
        "each budget (fraction of the backbone's FLOPs) with the operating point chosen on validation; mean ± 95 % "
        "t-interval over runs. Primary endpoint: mean over budgets "
        + ", ".join(map(str, PRIMARY))
        + "; secondary: over "
        + ", ".join(map(str, BUDGETS))
        + ".",
        "",
        "| method | " + " | ".join(f"≤ {f:g}" for f in BUDGETS) + " | primary | secondary |",
        "|---|" + "---|" * (len(BUDGETS) + 2),
    ]
    for m in headline:
        cells = [ci_cell(*mean_ci([r.results[m][f]["accuracy"] for r in runs])) for f in BUDGETS]
        cells += [ci_cell(*mean_ci([endpoint(r, m, b) for r in runs])) for b in (PRIMARY, BUDGETS)]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Realised test cost (% of the backbone) of those points, mean over runs:",
        "",
        "| method | " + " | ".join(f"≤ {f:g}" for f in BUDGETS) + " |",
        "|---|" + "---|" * len(BUDGETS),
    ]
    for m in headline:
        lines.append(
            f"| {m} | "
            + " | ".join(pct(statistics.mean(r.results[m][f]["cost"] for r in runs)) for f in BUDGETS)
            + " |"
        )
    lines += [
        "",
        "Paired differences (points), 95 % intervals over runs [t] and over test images [paired bootstrap]; "
        "gap closed = share of the baseline-to-oracle gap:",
        "",
        "| method | baseline | primary | [t] | [bootstrap] | gap closed | secondary | [t] | [bootstrap] |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    oracle = "oracle (warm-up IMs)"
    for m in (DEFAULT, PAPER_NAME):
        for base in (
            THRESHOLD_MSDNET,
            THRESHOLD_TUNED,
            f"{THRESHOLD_MSDNET} (default's IMs)",
            f"{THRESHOLD_TUNED} (default's IMs)",
        ):
            row = [m, base]
            for i, b in enumerate((PRIMARY, BUDGETS)):
                d, lo, hi = mean_ci([endpoint(r, m, b) - endpoint(r, base, b) for r in runs])
                blo, bhi = bootstrap_difference(runs, m, base, b)
                row += [
                    f"{100 * d:+.2f}",
                    f"[{100 * lo:+.2f}, {100 * hi:+.2f}]",
                    f"[{100 * blo:+.2f}, {100 * bhi:+.2f}]",
                ]
                if i == 0:
                    gap = statistics.mean(endpoint(r, oracle, b) - endpoint(r, base, b) for r in runs)
                    row.append(f"{100 * d / gap:.0f} %" if gap > 0 else "—")
            lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Calibration and conformal sets (ECE: 15 equal-width bins, whole test split, with a 95 % bootstrap "
        f"interval of run 1; coverage at α = {ALPHA}, mean over 20 random calibration / evaluation halves of test):",
        "",
        "| method | budget | accuracy % | ECE % | ECE interval (run 1) | coverage % | mean set size |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in (DEFAULT, PAPER_NAME, THRESHOLD_MSDNET, THRESHOLD_TUNED):
        for f in (0.45, 0.65):
            res = [r.results[m][f] for r in runs]
            lo, hi = res[0]["ece_interval"]
            lines.append(
                f"| {m} | {f:g} | {pct(statistics.mean(x['accuracy'] for x in res))} | "
                f"{pct(statistics.mean(x['ece'] for x in res))} | [{pct(lo)}, {pct(hi)}] | "
                f"{pct(statistics.mean(x['coverage'] for x in res))} | "
                f"{statistics.mean(x['set_size'] for x in res):.2f} |"
            )
    lines += [
        "",
        "Budget mode: for every λ adapter and each requested budget from the first exit's cost + 1 point to 95 % "
        "(steps of 5), τ from validation half B; a budget counts as reached when B's cost is within 2 points of "
        "it. Range of budgets reached (over λ), and the largest |test cost − budget| among them:",
        "",
        "| gates | budgets reached | largest test deviation (points) |",
        "|---|---|---|",
    ]
    for m in (DEFAULT, PAPER_NAME):
        info = [r.info["budget_mode"][m] for r in runs]
        top = max(max(i["budgets"], default=0.0) for i in info)
        low = min(min(i["budgets"], default=1.0) for i in info)
        dev = max(i["max_deviation"] for i in info)
        lines.append(f"| {m} | {pct(low)} % … {pct(top)} % | {100 * dev:.2f} |")
    ablation_runs = [r for r in runs if any(k.startswith("ablation") for k in r.results)]
    if ablation_runs:
        lines += [
            "",
            f"Ablation ({len(ablation_runs)} runs, backbone seed {ablation_runs[0].backbone_seed}): mean test "
            "accuracy (%) over the budgets, difference to the paper's gates with a 95 % t-interval over runs:",
            "",
            "| variant | primary | vs paper | secondary | vs paper |",
            "|---|---|---|---|---|",
        ]
        paper = "ablation: paper (JEI-DNN as published)"
        for m in [k for k in ablation_runs[0].results if k.startswith("ablation")]:
            row = [m.removeprefix("ablation: ")]
            for b in (PRIMARY, BUDGETS):
                row.append(ci_cell(*mean_ci([endpoint(r, m, b) for r in ablation_runs])))
                row.append(
                    ci_cell(*mean_ci([endpoint(r, m, b) - endpoint(r, paper, b) for r in ablation_runs]), signed=True)
                )
            lines.append("| " + " | ".join(row) + " |")
    info = [r.info for r in runs]
    lines += [
        "",
        f"Backbone test accuracy {ci_cell(*mean_ci([i['backbone_test_accuracy'] for i in info]))} %. Exit costs "
        "(% of the backbone): " + ", ".join(f"{100 * c:.1f}" for c in info[0]["cost_fractions"]) + ". Warm-up IM "
        "test accuracy per exit (%): "
        + ", ".join(
            pct(statistics.mean(i["warm_exit_test_accuracy"][k] for i in info))
            for k in range(len(info[0]["cost_fractions"]))
        )
        + f". Wall time {seconds / 60:.1f} min (2 CPU cores; backbones "
        "cached, their training not included).",
    ]
    return "\n".join(lines) + "\n"


def _jsonable(runs: list[Run]) -> list[dict]:
    out = []
    for r in runs:
        d = asdict(replace(r, results={}))
        d["results"] = {
            m: {str(f): {k: v for k, v in p.items() if not k.startswith("_")} for f, p in res.items()}
            for m, res in r.results.items()
        }
        out.append(d)
    return out


def plot(runs: list[Run], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), dpi=120)
    ax = fig.subplots()
    shown = [
        DEFAULT,
        PAPER_NAME,
        THRESHOLD_MSDNET,
        THRESHOLD_TUNED,
        "BoostedNet (γ=0.5), max-prob",
        "L2W-DEN, max-prob",
        "oracle (warm-up IMs)",
    ]
    for i, m in enumerate(shown):
        xs = [100 * statistics.mean(r.results[m][f]["cost"] for r in runs) for f in BUDGETS]
        stats = [mean_ci([r.results[m][f]["accuracy"] for r in runs]) for f in BUDGETS]
        ys = [100 * s[0] for s in stats]
        es = [0.0 if math.isnan(s[1]) else 100 * (s[0] - s[1]) for s in stats]
        style = "-" if m in (DEFAULT, PAPER_NAME) else (":" if m.startswith("oracle") else "--")
        ax.errorbar(xs, ys, yerr=es, marker="osD^vPX"[i], ms=4, lw=1.2, ls=style, capsize=2, label=m)
    ax.axhline(
        100 * statistics.mean(r.info["backbone_test_accuracy"] for r in runs),
        c="k",
        lw=0.8,
        ls=":",
        label="full backbone",
    )
    ax.set_xlabel("realised test cost (% of the backbone's FLOPs)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["digits", "fashion-mnist"], default="digits")
    parser.add_argument("--quick", action="store_true", help="a smoke run (one run, few epochs, a slice of the data)")
    parser.add_argument("--no-ablation", action="store_true", help="skip the ablation table")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, help="folder of the trained backbones (default outputs/fashion-vit)")
    parser.add_argument("--backbone-seeds", type=int, nargs="+", help="override the setup's backbone seeds")
    parser.add_argument("--exit-seeds", type=int, nargs="+", help="override the setup's exit seeds")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    key = args.dataset + ("-quick" if args.quick else "")
    setup = SETUPS[key]
    if args.backbone_seeds:
        setup = replace(setup, backbone_seeds=tuple(args.backbone_seeds))
    if args.exit_seeds:
        setup = replace(setup, exit_seeds=tuple(args.exit_seeds))
    start = time.time()
    splits = load_splits(setup)
    backbones = {}
    for seed in setup.backbone_seeds:
        backbones[seed], spent = make_backbone(setup, seed, splits[0], args.cache)
        print(f"backbone {seed}: trained in {spent:.0f} s" if spent else f"backbone {seed}: cached", flush=True)
    start_runs = time.time()
    stem = "accuracy_cost_" + key.replace("-", "_")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    # Exit seeds outermost, so that a benchmark stopped early has runs on every backbone.
    for s in setup.exit_seeds:
        for b in setup.backbone_seeds:
            ablation = not args.no_ablation and b == setup.backbone_seeds[0] and s in setup.ablation_seeds
            runs.append(run_one(setup, b, s, splits, backbones, ablation))
            # written after every run, so a long benchmark stopped early still leaves its finished runs
            table = markdown(runs, setup, time.time() - start_runs)
            (args.out / f"{stem}.md").write_text(table)
            payload = {"setup": asdict(setup), "runs": _jsonable(runs)}
            (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
            title = f"{setup.dataset}: accuracy at matched cost (mean, 95 % t-interval, {len(runs)} runs)"
            plot(runs, args.out / f"{stem}.png", title)
    print(table)
    print(f"total {(time.time() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
