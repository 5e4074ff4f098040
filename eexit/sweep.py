"""Operating points of JEI-DNN: a λ sweep that runs the frozen backbone once, and budget mode.

JEI-DNN (Regol, Chataoui & Coates, ICLR 2024) gives one operating point per trained λ: a curve needs one
adapter per λ (``reference/jei-dnn.md`` §3.2 and §9.6). With a frozen backbone every run reads the same exit
features, so :func:`sweep_lambda` collects them once (:class:`~eexit.data.FeatureCache`) and each λ costs only
the heads and gates. :func:`budget_threshold` is the budget mode of DESIGN.md: it moves the deterministic rule's
threshold (0.5 in the paper) so that the average cost on validation data meets a target.

Costs are fractions of the bare backbone's FLOPs, as ``EvaluationReport.cost_fraction``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import metrics
from .data import FeatureCache, check_loader
from .errors import EexitTypeError, EexitValueError
from .evaluation import CollectedOutputs, EvaluationReport, collect_outputs, evaluate_outputs, mean_costs
from .inference import ExitState, GatePolicy, decide_exits
from .model import EarlyExitModel
from .train import fit

__all__ = ["SweepPoint", "SweepResult", "budget_threshold", "outputs_from_cache", "sweep_lambda"]


@dataclass
class SweepPoint:
    """One λ of a sweep: its adapter's name and its reports under the deterministic rule (threshold 0.5).

    Attributes:
        lam: λ.
        adapter: the name the adapter is stored under (``ee.set_adapter(adapter)`` activates it).
        val: the report on the validation split.
        test: the report on the test split (conformal sets calibrated on validation), or ``None``.
    """

    lam: float
    adapter: str
    val: EvaluationReport
    test: EvaluationReport | None = None


@dataclass
class SweepResult:
    """The points of a λ sweep, and the feature caches it built (reuse them to avoid another backbone pass)."""

    points: list[SweepPoint]
    caches: dict[str, FeatureCache] = field(default_factory=dict, repr=False)

    def curve(self, split: str = "test") -> list[tuple[float, float]]:
        """(cost fraction, accuracy) of every λ on ``split`` ("val" or "test"), sorted by cost."""
        if split not in ("val", "test"):
            raise EexitValueError(f"split must be 'val' or 'test', got {split!r}.")
        reports = [getattr(p, split) for p in self.points]
        if any(r is None for r in reports):
            raise EexitValueError("this sweep has no test reports; pass test_loader= to sweep_lambda.")
        return sorted((r.cost_fraction, r.accuracy) for r in reports)

    def area(self, cost_range: tuple[float, float], split: str = "test") -> float:
        """Mean accuracy over ``cost_range`` (fractions) under the monotone curve (:func:`metrics.area_under_curve`)."""
        costs, accs = zip(*self.curve(split))
        return metrics.area_under_curve(list(costs), list(accs), cost_range)


def outputs_from_cache(ee: EarlyExitModel, cache: FeatureCache, batch_size: int = 1024) -> CollectedOutputs:
    """Every exit's logits and the gate logits from cached features: ``collect_outputs(ee, cache)``, kept under
    this name for existing code."""
    return collect_outputs(ee, cache, batch_size=batch_size)


def _cache(ee: EarlyExitModel, source: Any, name: str) -> FeatureCache:
    if isinstance(source, FeatureCache):
        return source
    check_loader(source, name)
    return FeatureCache.collect(ee, source, name, progress=False)


def _check_lams(lams: Sequence[float]) -> list[float]:
    try:
        values = [float(v) for v in lams]
    except (TypeError, ValueError) as err:
        raise EexitTypeError(f"lams must be a sequence of numbers, got {lams!r}.") from err
    if not values:
        raise EexitValueError("lams is empty; give at least one λ, e.g. lams=[0.01, 0.1, 0.5, 1.0].")
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise EexitValueError(f"every λ must be a finite number >= 0, got {values}.")
    return values


def sweep_lambda(
    ee: EarlyExitModel,
    train_loader: Iterable[Any] | FeatureCache,
    val_loader: Iterable[Any] | FeatureCache,
    lams: Sequence[float],
    *,
    test_loader: Iterable[Any] | FeatureCache | None = None,
    adapter_prefix: str = "lam_",
    alpha: float = 0.1,
    **fit_kwargs: Any,
) -> SweepResult:
    """Train one JEI-DNN adapter per λ on features computed once, and trace the accuracy-cost curve.

    Every λ starts from the adapter state ``ee`` holds when called (so the runs are independent) and is stored
    as a named adapter ``f"{adapter_prefix}{lam:g}"``; the active adapter is left as it was. The backbone must
    stay frozen (``train_backbone=True`` or ``"lora"`` changes the features, so there is nothing to share).

    Args:
        ee: the model :func:`eexit.attach` returned.
        train_loader: training data (a loader, or a FeatureCache collected on this model).
        val_loader: validation data for :func:`eexit.fit`, and the ``val`` report of each point.
        lams: the λ values.
        test_loader: when given, each point also gets a ``test`` report with conformal sets calibrated on
            the validation split at level ``alpha``.
        adapter_prefix: prefix of the adapter names.
        alpha: conformal miscoverage level in (0, 1).
        **fit_kwargs: :func:`eexit.fit` settings shared by every λ (``epochs=30``, ``config=...``, ...).

    Returns:
        A :class:`SweepResult` (points in the order of ``lams``, plus the feature caches).
    """
    if not isinstance(ee, EarlyExitModel):
        raise EexitTypeError(f"sweep_lambda expects the EarlyExitModel from eexit.attach, got {type(ee).__name__}.")
    values = _check_lams(lams)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < 1.0:
        raise EexitValueError(f"alpha must be in (0, 1), got {alpha!r}; e.g. alpha=0.1 for 90 % coverage.")
    if "lam" in fit_kwargs:
        raise EexitValueError("pass λ values through lams=[...], not lam=.")
    config = fit_kwargs.get("config")
    train_backbone = fit_kwargs.get("train_backbone", config is not None and config.train_backbone)
    cache = fit_kwargs.get("cache_features", None if config is None else config.cache_features)
    if train_backbone or cache is False:
        raise EexitValueError(
            "sweep_lambda shares one pass of a frozen backbone between all λ, but got train_backbone="
            f"{train_backbone!r} / cache_features={cache}. Call eexit.fit once per λ instead."
        )
    names = [f"{adapter_prefix}{lam:g}" for lam in values]
    clashes = sorted(set(names) & set(ee.adapter_names)) or sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise EexitValueError(
            f"adapter names {clashes} are taken or repeated (λ values {values}); remove duplicates or pass "
            "another adapter_prefix."
        )
    caches = {"train": _cache(ee, train_loader, "train_loader"), "val": _cache(ee, val_loader, "val_loader")}
    if test_loader is not None:
        caches["test"] = _cache(ee, test_loader, "test_loader")
    initial = ee.adapter_state_dict()
    saved = (ee.fit_config, list(ee.history), ee.evaluation)
    policy = ee.default_policy()
    points = []
    try:
        for lam, name in zip(values, names):
            ee.load_adapter_state_dict(initial)
            fit(ee, caches["train"], caches["val"], lam=lam, **fit_kwargs)
            val = collect_outputs(ee, caches["val"])
            val_taken = decide_exits(val.logits, val.gate_logits, policy)  # [Nv]
            point = SweepPoint(lam, name, evaluate_outputs(ee, val, val_taken, alpha=alpha))
            if "test" in caches:
                test = collect_outputs(ee, caches["test"])
                test_taken = decide_exits(test.logits, test.gate_logits, policy)  # [Nt]
                point.test = evaluate_outputs(ee, test, test_taken, calibration=(val, val_taken), alpha=alpha)
            ee.evaluation = (point.test or point.val).to_dict()
            ee.add_adapter(name)
            points.append(point)
    finally:
        ee.load_adapter_state_dict(initial)
        ee.fit_config, ee.history, ee.evaluation = saved[0], saved[1], saved[2]
    return SweepResult(points, caches)


class _Conditional:
    """A policy that lets every sample run on and records P(G=l)/P(G>=l) at each exit (what GatePolicy compares)."""

    def __init__(self, policy: GatePolicy) -> None:
        self.policy = policy
        self.values: list[torch.Tensor] = []

    def __call__(
        self, exit_index: int, logits: torch.Tensor, gate_logit: torch.Tensor | None, state: ExitState
    ) -> torch.Tensor:
        if gate_logit is None:
            raise EexitValueError("budget mode needs gates; this model has none at this exit.")
        self.values.append(self.policy.score(exit_index, logits, gate_logit, state))
        return torch.zeros_like(state.positions, dtype=torch.bool)


def budget_threshold(ee: EarlyExitModel, val_loader: Any, target_cost_fraction: float) -> float:
    """The gate threshold whose average cost on validation data meets a budget (DESIGN.md "budget mode").

    Under the deterministic rule a sample exits at the first l with c_l = P(G=l)/P(G>=l) >= t, so lowering the
    threshold t can only make samples exit earlier: the average cost is non-decreasing in t. The cost only
    changes where t crosses one of the c_l values, so the search bisects over those values and returns the
    largest threshold whose average cost is at most the target (the most accurate use of the budget, up to
    one sample's move between exits). Use it as ``ee.default_policy(t)`` or set ``ee.config.threshold = t``.

    Args:
        ee: a trained model with gates.
        val_loader: validation data: a loader, a :class:`~eexit.data.FeatureCache` or collected outputs.
        target_cost_fraction: average cost as a fraction of the bare backbone's FLOPs, between the first
            exit's cost and the last exit's.

    Returns:
        The threshold t in (0, 1].

    Raises:
        EexitValueError: the target lies outside [first exit's cost, full cost], or the gates cannot exit
            early enough on this data to meet it.
    """
    if not isinstance(ee, EarlyExitModel):
        raise EexitTypeError(f"budget_threshold expects an EarlyExitModel, got {type(ee).__name__}.")
    if ee.num_exits < 2:
        raise EexitValueError("budget mode needs at least one intermediate exit with a gate; this model has none.")
    fractions = ee.cost_table.fraction_of_backbone()
    target = target_cost_fraction
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
        raise EexitValueError(f"target_cost_fraction must be a finite number, got {target!r}.")
    if not fractions[0] <= target <= fractions[-1]:
        raise EexitValueError(
            f"target_cost_fraction={target:g} is outside what exits can spend: from {fractions[0]:.4f} (every "
            f"sample at the first exit) to {fractions[-1]:.4f} (every sample at the last). Pick a budget in "
            "that range."
        )
    out = collect_outputs(ee, val_loader, name="val_loader")
    recorder = _Conditional(ee.default_policy())
    decide_exits(out.logits, out.gate_logits, recorder)
    values = torch.cat(recorder.values)
    candidates = [*torch.unique(values[values > 0]).tolist(), 1.0]  # sorted; cost is constant between them

    def cost(t: float) -> float:
        taken = decide_exits(out.logits, out.gate_logits, ee.default_policy(t))  # [N]
        spent, full = mean_costs(ee, out, taken)  # graphs: each graph's own cost
        return spent / full

    lo, hi = 0, len(candidates) - 1
    if cost(candidates[hi]) <= target:
        return 1.0
    if cost(candidates[lo]) > target:
        raise EexitValueError(
            f"the gates cannot meet target_cost_fraction={target:g} on this data: even the lowest threshold "
            f"({candidates[lo]:.3g}) costs {cost(candidates[lo]):.4f}. Raise the budget or train with a larger λ."
        )
    while hi - lo > 1:  # invariant: cost(candidates[lo]) <= target < cost(candidates[hi])
        mid = (lo + hi) // 2
        if cost(candidates[mid]) <= target:
            lo = mid
        else:
            hi = mid
    return float(candidates[lo])
