"""Which gate wins on fixed IMs? Gate variants against max-probability thresholds on the same exits (issue 8).

    python benchmarks/gate_study.py                     # Fashion-MNIST, backbone seed 0, IM seeds 0 1 2

The accuracy-cost benchmark trains IMs and gates together, so a gate's effect and its IMs' effect are mixed.
Here the IMs are the warm-up IMs (λ = 0, trained on ``train``) and stay fixed; only the exit *rule* changes.
Every gate is a logistic regression per exit (eexit's exact solver) fitted on validation half A; its λ and τ
are chosen on half B; the thresholds are fitted on A ∪ B; everything is reported on the 10,000 test images.
Endpoints as in ``accuracy_cost.py`` (primary: mean accuracy over budgets 0.35, 0.45, 0.55).

Variants (one change at a time from the library's default hazard gate):

* ``default``: hazard targets on C = CE + λ·IC, reach-weighted, the default gate inputs (paper + history);
* ``01-targets``: targets on C = [wrong] + λ·IC (what accuracy counts, not the CE's near-ties);
* ``no-reach``: every sample weighs 1 for every gate;
* ``paper-inputs``: the paper's four statistics only;
* ``maxprob-only``: max-probability as the only input (a learned per-exit threshold);
* ``all-exits``: the default inputs plus max-prob, margin and entropy of every exit passed before.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
import accuracy_cost as ac

import eexit
from eexit.config import GATE_FEATURES, HISTORY_FEATURES
from eexit.data import FeatureCache
from eexit.gate_fit import _solve
from eexit.gates import ExitHistory, gate_statistics
from eexit.objective import exit_costs, hazard_targets, per_exit_ce
from eexit.sweep import outputs_from_cache

LAMS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
TAUS = [t / 100 for t in range(2, 100, 2)]
VARIANTS = {
    "default": dict(),
    "01-targets": dict(target="01"),
    "no-reach": dict(reach=False),
    "paper-inputs": dict(features=GATE_FEATURES),
    "maxprob-only": dict(features=("max_prob",)),
    "all-exits": dict(all_exits=True),
    "01 + all-exits": dict(target="01", all_exits=True),
    "per-class": dict(per_class=True),
    "per-class, maxprob": dict(per_class=True, features=("max_prob",)),
    "per-class + all-exits": dict(per_class=True, all_exits=True),
    "embedding": dict(embedding=True),
    "embedding + per-class": dict(embedding=True, per_class=True),
}


def class_inputs(logits: torch.Tensor) -> torch.Tensor:
    """Which class the exit predicts, and its confidence in that class: a per-class threshold, [N, 2C]."""
    p = torch.softmax(logits.float(), -1)
    onehot = torch.nn.functional.one_hot(p.argmax(-1), p.shape[-1]).float()
    return torch.cat([onehot, onehot * p.amax(-1, keepdim=True)], dim=1)


def features(logits: torch.Tensor, names, all_exits: bool, per_class: bool = False) -> list[torch.Tensor]:
    """Gate inputs of every gate, ``E-1`` tensors [N, F] (float64)."""
    history, out, passed = ExitHistory(), [], []
    for k in range(logits.shape[0] - 1):
        x = gate_statistics(logits[k], names, history)
        if per_class:
            x = torch.cat([x, class_inputs(logits[k])], dim=1)
        here = gate_statistics(logits[k], ("max_prob", "margin", "entropy"))
        if all_exits:
            x = torch.cat([x, *passed], dim=1) if passed else x
            passed.append(here)
        out.append(x.double())
        history = history.after(logits[k])
    return out


def fit_gates(x: list[torch.Tensor], costs: torch.Tensor, reach_weighted: bool):
    targets = hazard_targets(costs).double()  # [E-1, N]
    reach = torch.ones(costs.shape[1], dtype=torch.float64)
    params = []
    for j, xj in enumerate(x):
        w = reach.clone() if reach_weighted else torch.ones_like(reach)
        slope, bias = _solve(xj, targets[j], w)
        params.append((slope, bias))
        reach = reach * (1 - torch.sigmoid(xj @ slope + bias))
    return params


def first_exit(x: list[torch.Tensor], params, tau: float) -> torch.Tensor:
    h = torch.stack([torch.sigmoid(xj @ s + b) for xj, (s, b) in zip(x, params)])  # [E-1, N]
    fire = torch.cat([h >= tau, torch.ones(1, h.shape[1], dtype=torch.bool)])  # the last exit takes the rest
    return fire.to(torch.uint8).argmax(0)


def costs_of(out, price, lam, target):
    if target == "01":
        wrong = (out.logits.argmax(-1) != out.labels.unsqueeze(0)).double()
        return wrong + lam * price.unsqueeze(1)
    return exit_costs(per_exit_ce(out.logits, out.labels).double(), price, lam)


def gate_variant(spec, a, b, test, price, embeddings=None) -> list[ac.Candidate]:
    names = spec.get("features", GATE_FEATURES + HISTORY_FEATURES)
    extra = spec.get("all_exits", False), spec.get("per_class", False)
    xa, xb, xt = (features(o.logits, names, *extra) for o in (a, b, test))
    if spec.get("embedding"):  # the exit's own pooled features: what the IM saw, not only what it said
        xa, xb, xt = (
            [torch.cat([x, e.double()], dim=1) for x, e in zip(xs, embeddings[k])]
            for xs, k in ((xa, "a"), (xb, "b"), (xt, "test"))
        )
    cands = []
    for lam in LAMS:
        params = fit_gates(xa, costs_of(a, price, lam, spec.get("target", "ce")), spec.get("reach", True))
        for tau in TAUS:
            acc, cost = ac._acc_cost(b, first_exit(xb, params, tau), price)
            cands.append(ac.Candidate(cost, acc, test, first_exit(xt, params, tau), f"λ={lam:g} τ={tau:g}"))
    return cands


def study(exit_seed: int, setup, splits, backbone) -> dict[str, list[float]]:
    train, a_data, b_data, test_data = splits
    torch.manual_seed(exit_seed)
    ee = eexit.attach(backbone)
    price = torch.tensor(ee.cost_table.fraction_of_backbone(), dtype=torch.float64)
    caches = {
        k: FeatureCache.collect(ee, DataLoader(d, batch_size=512), k, progress=False)
        for k, d in (("train", train), ("a", a_data), ("b", b_data), ("test", test_data))
    }
    w = setup.warmup_epochs
    kwargs = dict(ac.OPT, batch_size=setup.batch_size, progress=False, seed=exit_seed)
    eexit.fit(ee, caches["train"], caches["a"], lam=0.0, epochs=w, warmup_epochs=w, **kwargs)
    a, b, test = (outputs_from_cache(ee, caches[k]) for k in ("a", "b", "test"))
    ee.detach()
    ab = ac.merge(a, b)
    methods = {
        "max-prob, MSDNet": ac.msdnet_candidates(ab, test, price, "max_probability"),
        "max-prob, tuned per exit": ac.tuned_candidates(ab, test, price),
    }
    embeddings = {k: [f.float().cpu() for f in caches[k].features] for k in ("a", "b", "test")}
    for name, spec in VARIANTS.items():
        methods[f"gate: {name}"] = gate_variant(spec, a, b, test, price, embeddings)
    result = {m: [ac.select(c, f).test_exit for f in ac.BUDGETS] for m, c in methods.items()}
    acc = {}
    for m, exits in result.items():
        acc[m] = [ac._acc_cost(test, e, price)[0] for e in exits]
        acc[f"{m} [test cost]"] = [ac._acc_cost(test, e, price)[1] for e in exits]
    # Diagnostic only, never a result: each family's best point chosen on test itself, i.e. what the family
    # could reach if the choice of operating point were free of noise.
    for m, c in methods.items():
        on_test = [ac.Candidate(*ac._acc_cost(test, x.test_exit, price)[::-1], test, x.test_exit) for x in c]
        chosen = [ac.select(on_test, f).test_exit for f in ac.BUDGETS]
        acc[f"{m} [chosen on test]"] = [ac._acc_cost(test, e, price)[0] for e in chosen]
    acc["oracle"] = [ac.oracle_accuracy(test, price, f) for f in ac.BUDGETS]
    return acc


def table(runs: list[dict[str, list[float]]]) -> str:
    """Markdown: primary and secondary endpoints, and paired differences with 95 % t-intervals over IM seeds."""

    def cell(values: list[float], signed: bool = False) -> str:
        m, lo, hi = ac.mean_ci(values)
        return f"{100 * m:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]" if signed else f"{100 * m:.2f}"

    def prim(r, m):
        return statistics.mean(r[m][: len(ac.PRIMARY)])

    msd, tuned = "max-prob, MSDNet", "max-prob, tuned per exit"
    lines = [
        "| rule on the warm-up IMs | primary | vs MSDNet max-prob | vs tuned per exit | secondary |",
        "|---|---|---|---|---|",
    ]
    for m in runs[0]:
        if m.endswith("[test cost]"):
            continue
        lines.append(
            f"| {m} | {cell([prim(r, m) for r in runs])} | {cell([prim(r, m) - prim(r, msd) for r in runs], True)} | "
            f"{cell([prim(r, m) - prim(r, tuned) for r in runs], True)} | "
            f"{cell([statistics.mean(r[m]) for r in runs])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone-seed", type=int, default=0)
    parser.add_argument("--exit-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "gate_study_fashion_mnist.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    setup = ac.SETUPS["fashion-mnist"]
    splits = ac.load_splits(setup)
    backbone, _ = ac.make_backbone(setup, args.backbone_seed, splits[0], None)
    runs = []
    for s in args.exit_seeds:
        start = time.time()
        runs.append(study(s, setup, splits, backbone))
        print(f"exit seed {s}: {time.time() - start:.0f} s", flush=True)
        args.out.write_text(json.dumps(runs, indent=1))
    print(table(runs))


if __name__ == "__main__":
    main()
