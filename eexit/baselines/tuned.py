"""Per-exit confidence thresholds tuned on validation: the strongest simple baseline (issue 8).

MSDNet's budgeted-batch protocol (:mod:`eexit.baselines.thresholds`) ties all thresholds to one knob through a
geometric exit distribution. Here every exit's threshold is a free parameter: for a price μ of cost, coordinate
descent maximises validation accuracy − μ·cost, one exit's threshold at a time (each step exact: the best
threshold of that exit given the others, found by sorting its confidences), starting from the best MSDNet
thresholds for that price. Each μ gives one operating point; a sweep of μ traces the validation-optimal curve,
and a budget picks the most accurate point that fits it (on validation, as every other method). Everything is
computed from precomputed all-exit logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from eexit._checks import _as_float_vector, _check_tensor
from eexit.baselines.thresholds import (
    _check_scores,
    apply_thresholds,
    fit_budgeted_thresholds,
    geometric_exit_distribution,
)
from eexit.errors import EexitValueError

__all__ = ["DEFAULT_PRICES", "tune_thresholds", "tuned_threshold_curve"]

#: Prices μ of cost (accuracy points per unit of the backbone's cost): 0 is "accuracy only".
DEFAULT_PRICES = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


def _gain(scores: Tensor, correct: Tensor, costs: Tensor, thresholds: Tensor, price: float) -> float:
    taken = apply_thresholds(scores, thresholds)  # [N]
    cols = torch.arange(scores.shape[1], device=scores.device)
    return float(correct[taken, cols].double().mean() - price * costs[taken].mean())


def _best_threshold(scores: Tensor, correct: Tensor, costs: Tensor, thresholds: Tensor, k: int, price: float) -> float:
    """The threshold of exit k maximising accuracy − price·cost with the other thresholds fixed (exact).

    A sample that no earlier exit takes leaves at k when its score reaches the threshold, else at the first later
    exit that takes it; so sorting those samples by their score at k gives the gain of every threshold at once.
    """
    passes = scores >= thresholds.unsqueeze(1)  # [E, N]
    passes[-1] = True
    passes[k] = False
    fallback = passes.to(torch.uint8).argmax(dim=0)  # [N] exit taken if k does not take the sample
    free = fallback > k  # the samples exit k decides for
    cols = torch.arange(scores.shape[1], device=scores.device)[free]
    here = correct[k, cols].double() - price * costs[k]  # [n]
    there = correct[fallback[free], cols].double() - price * costs[fallback[free]]
    order = scores[k, cols].argsort(descending=True)
    sorted_scores = scores[k, cols][order]
    gains = torch.cumsum((here - there)[order], dim=0)  # gain over "nobody exits at k" when the top m+1 exit
    # A threshold can only stop at the end of a run of tied scores (all tied samples exit together).
    ends = torch.ones_like(sorted_scores, dtype=torch.bool)
    ends[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    if not bool(ends.any()):
        return math.inf
    best = int(torch.where(ends, gains, torch.full_like(gains, -math.inf)).argmax())
    return float(sorted_scores[best]) if float(gains[best]) > 1e-12 else math.inf


def tune_thresholds(
    scores: Tensor,
    correct: Tensor,
    exit_costs: Tensor | Sequence[float],
    price: float,
    *,
    passes: int = 4,
    start: Tensor | None = None,
) -> Tensor:
    """Thresholds maximising validation accuracy − ``price`` · mean cost by exact coordinate descent.

    Args:
        scores: ``[E, N]`` validation confidences (higher = more confident), e.g. ``max_probability(logits)``.
        correct: ``[E, N]`` bool, whether each exit is right on each validation sample.
        exit_costs: ``[E]`` cost of each exit as a fraction of the backbone's (the last is 1).
        price: μ >= 0, accuracy given up per unit of cost saved.
        passes: most sweeps over the exits (it stops earlier once a sweep changes nothing).
        start: initial thresholds ``[E]``; default: the best MSDNet thresholds for this price.

    Returns:
        ``[E]`` float64 thresholds (the last is −inf: the last exit takes the rest).
    """
    scores = _check_scores(scores).double()
    e, n = scores.shape
    correct = _check_tensor(correct, "correct")
    if correct.shape != (e, n):
        raise EexitValueError(f"correct: expected shape {(e, n)} like scores, got {tuple(correct.shape)}.")
    correct = correct.bool()
    costs = _as_float_vector(exit_costs, "exit_costs").double().to(scores.device)
    if costs.numel() != e:
        raise EexitValueError(f"exit_costs: expected {e} costs (one per exit), got {costs.numel()}.")
    if isinstance(price, bool) or not isinstance(price, (int, float)) or not math.isfinite(price) or price < 0:
        raise EexitValueError(f"price: expected a finite number >= 0, got {price!r}.")
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise EexitValueError(f"passes: expected an int >= 1, got {passes!r}.")
    if start is None:
        knobs = [geometric_exit_distribution(p, e) for p in (0.5, 1, 2, 4, 8, 12, 16, 20, 25, 30, 40)]
        starts = [fit_budgeted_thresholds(scores, q) for q in knobs]
        start = max(starts, key=lambda t: _gain(scores, correct, costs, t, price))
    best = start.double().clone().to(scores.device)
    best[-1] = -math.inf
    for _ in range(passes):
        before = best.clone()
        for k in range(e - 1):
            best[k] = _best_threshold(scores, correct, costs, best, k, price)
        if torch.equal(before, best):
            break
    return best


def tuned_threshold_curve(
    scores: Tensor,
    correct: Tensor,
    exit_costs: Tensor | Sequence[float],
    prices: Sequence[float] = DEFAULT_PRICES,
    **kwargs: int,
) -> list[Tensor]:
    """One set of tuned thresholds per price μ (the candidates a budget then chooses from on validation)."""
    if not prices:
        raise EexitValueError("prices: expected at least one price μ, e.g. DEFAULT_PRICES.")
    return [tune_thresholds(scores, correct, exit_costs, float(mu), **kwargs) for mu in prices]
