"""Metrics of early-exit networks: accuracy, exit statistics, accuracy-cost curves, ECE, conformal sets.

Pure torch functions on precomputed outputs (no model, no data loader), following the evaluation protocol of
JEI-DNN (Regol et al., "Jointly-Learned Exit and Inference for a Dynamic Neural Network", ICLR 2024, §5) with
the pitfalls of the authors' code fixed (reference/jei-dnn.md §5.4):

- probabilities come from exactly ONE softmax of the logits given (their baselines' ECE applied two);
- ECE is computed once on the whole set with a stated binning (theirs averaged per-mini-batch ECEs);
- conformal quantiles are per exit, from a clean calibration split, with the exact split-conformal rank
  (:mod:`eexit.conformal`, whose functions are re-exported here).

Everything is computed in float64: confident models put many float32 max-probabilities exactly on 1.0, which
would merge calibration bins and conformal scores into ties.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from eexit._checks import _as_float_vector, _check_index, _check_logits
from eexit.conformal import conformal_calibrate, conformal_coverage_and_size, conformal_quantile, conformal_sets
from eexit.errors import EexitValueError

__all__ = [
    "PerExitAccuracy",
    "ReliabilityBins",
    "accuracy",
    "area_under_curve",
    "conformal_calibrate",
    "conformal_coverage_and_size",
    "conformal_quantile",
    "conformal_sets",
    "exit_rates",
    "expected_calibration_error",
    "expected_cost",
    "per_exit_accuracy",
    "reliability_bins",
]

Binning = Literal["width", "mass"]


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy (a fraction in [0, 1]).

    Args:
        logits: [N, C] class scores; the prediction is their argmax.
        labels: [N] integer labels in [0, C).
    """
    logits = _check_logits(logits, "logits", 2)
    labels = _check_index(labels, "labels", logits.shape[0], logits.shape[1], "label")
    return (logits.argmax(dim=1) == labels.to(logits.device)).double().mean().item()  # [N] -> scalar


def exit_rates(exit_index: Tensor, num_exits: int) -> Tensor:
    """Fraction of samples leaving at each exit (float64, sums to 1).

    Args:
        exit_index: [N] 0-based exit taken by each sample.
        num_exits: E, the number of exits (the last one is the backbone's own head).
    """
    if not isinstance(num_exits, int) or num_exits < 1:
        raise EexitValueError(f"num_exits: expected an int >= 1, got {num_exits!r}. Fix: pass len(exit_costs).")
    n = exit_index.numel() if isinstance(exit_index, Tensor) else -1
    exit_index = _check_index(exit_index, "exit_index", n, num_exits, "exit")
    return torch.bincount(exit_index, minlength=num_exits).double() / n  # [E]


class PerExitAccuracy(NamedTuple):
    """Accuracy of every IM on the whole set (𝒟) and on the samples that left there (𝒟ˡ)."""

    on_all: Tensor  # [E]
    on_exited: Tensor  # [E], NaN where no sample exited


def per_exit_accuracy(all_exit_logits: Tensor, labels: Tensor, exit_index: Tensor) -> PerExitAccuracy:
    """Per-IM accuracy on all samples and on the samples that exited at that IM.

    Args:
        all_exit_logits: [E, N, C] logits of every exit for every sample.
        labels: [N] integer labels.
        exit_index: [N] 0-based exit each sample took.

    Returns:
        ``PerExitAccuracy(on_all, on_exited)``, two float64 [E] tensors; ``on_exited[l]`` is NaN when no
        sample exited at l (an accuracy over zero samples is undefined, not 0).
    """
    logits = _check_logits(all_exit_logits, "all_exit_logits", 3)
    e, n, c = logits.shape
    labels = _check_index(labels, "labels", n, c, "label").to(logits.device)
    exit_index = _check_index(exit_index, "exit_index", n, e, "exit").to(logits.device)
    correct = (logits.argmax(dim=2) == labels.unsqueeze(0)).double()  # [E, N]
    exited = torch.nn.functional.one_hot(exit_index, e).T.double()  # [E, N]
    on_exited = (correct * exited).sum(dim=1) / exited.sum(dim=1)  # [E]; 0/0 -> NaN
    return PerExitAccuracy(on_all=correct.mean(dim=1), on_exited=on_exited)


def expected_cost(exit_index: Tensor, exit_costs: Tensor | Sequence[float]) -> float:
    """Mean cost per sample: Σ_l (fraction exiting at l) · cost_l, in the units of ``exit_costs``.

    Args:
        exit_index: [N] 0-based exit each sample took.
        exit_costs: [E] cost to reach and decide at each exit (FLOPs, or normalised IC_l with the last at 1).
    """
    costs = _as_float_vector(exit_costs, "exit_costs")
    if bool((costs < 0).any()):
        raise EexitValueError(
            f"exit_costs: expected non-negative costs, got {costs.tolist()}. "
            "Fix: pass the cost table's cumulative FLOPs."
        )
    return float((exit_rates(exit_index, costs.numel()).cpu() * costs).sum())  # [E] -> scalar


def area_under_curve(
    costs: Tensor | Sequence[float],
    accuracies: Tensor | Sequence[float],
    cost_range: tuple[float, float],
) -> float:
    """Mean accuracy over a cost range: the area under the monotone accuracy-cost curve / the range width.

    The curve is made monotone by taking, at each operating point's cost, the best accuracy of any point at or
    below that cost (a budget that allows cost c allows every cheaper operating point). The resulting points
    are joined by straight lines (trapezoids) and clipped to ``cost_range`` by linear interpolation. This is
    the conservative choice: unlike the convex hull it does not credit mixing two operating points at random.

    Args:
        costs: [P] expected cost of each operating point (any order).
        accuracies: [P] accuracy of each operating point.
        cost_range: (lo, hi) with lo < hi, inside [min(costs), max(costs)]: the curve is undefined below its
            cheapest point, and we do not extend it flat past its most expensive one.

    Returns:
        The area divided by hi − lo, in the units of ``accuracies``.
    """
    c = _as_float_vector(costs, "costs")
    a = _as_float_vector(accuracies, "accuracies")
    if c.numel() != a.numel():
        raise EexitValueError(
            f"costs and accuracies: expected the same length, got {c.numel()} and "
            f"{a.numel()}. Fix: pass one accuracy per operating point."
        )
    if not isinstance(cost_range, (tuple, list)) or len(cost_range) != 2:
        raise EexitValueError(
            f"cost_range: expected a (lo, hi) pair, got {cost_range!r}. Fix: pass cost_range=(lo, hi)."
        )
    lo, hi = float(cost_range[0]), float(cost_range[1])
    c_min, c_max = c.min().item(), c.max().item()
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise EexitValueError(f"cost_range: expected finite lo < hi, got ({lo}, {hi}). Fix: widen the range.")
    if lo < c_min or hi > c_max:
        raise EexitValueError(
            f"cost_range: expected a range inside the curve's costs [{c_min}, {c_max}], "
            f"got ({lo}, {hi}). "
            "Fix: narrow the range or add operating points that cover it."
        )
    order = torch.argsort(c, stable=True)
    xs, ys = c[order].tolist(), torch.cummax(a[order], dim=0).values.tolist()  # running best: monotone
    # Points with equal cost keep the last (largest) running maximum, so the curve is a function of cost.
    pts: dict[float, float] = dict(zip(xs, ys, strict=True))
    xs, ys = list(pts), list(pts.values())

    def at(x: float) -> float:
        if len(xs) == 1 or x <= xs[0]:
            return ys[0]
        j = next(i for i in range(1, len(xs)) if xs[i] >= x)
        t = (x - xs[j - 1]) / (xs[j] - xs[j - 1])
        return ys[j - 1] + t * (ys[j] - ys[j - 1])

    px = [lo] + [x for x in xs if lo < x < hi] + [hi]
    py = [at(x) for x in px]
    area = sum((px[i + 1] - px[i]) * (py[i + 1] + py[i]) / 2 for i in range(len(px) - 1))
    return area / (hi - lo)


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics of a reliability diagram (float64 tensors; empty bins hold NaN and count 0).

    Attributes:
        edges: [M + 1] bin edges, edges[0] = 0 and edges[M] = 1; bin m holds the confidences in
            (edges[m], edges[m + 1]] (right-closed; bin 0 also holds 0).
        confidence: [M] mean confidence (max softmax probability) in each bin.
        accuracy: [M] fraction of correct predictions in each bin.
        count: [M] number of samples in each bin (int64).
    """

    edges: Tensor
    confidence: Tensor
    accuracy: Tensor
    count: Tensor


def reliability_bins(logits: Tensor, labels: Tensor, n_bins: int = 15, binning: Binning = "width") -> ReliabilityBins:
    """Bin the samples by confidence for a reliability diagram or the ECE.

    Confidence is the max of ONE softmax of ``logits``. Bins are right-closed, (lo, hi]:

    - ``"width"``: M equal-width bins on [0, 1], edges m/M; a confidence exactly on an edge m/M goes to the
      lower bin (e.g. 0.5 with M = 2 is in bin 0).
    - ``"mass"`` (equal mass, quantile bins): the sorted confidences are cut into M runs whose sizes differ by
      at most one (the first N mod M runs get one more, like ``numpy.array_split``); the upper edge of a bin
      is the largest confidence in its run. Samples with tied confidences always share a bin (the lowest run
      that holds their value), so the result does not depend on sample order; ties can therefore make some
      bins larger and leave later ones empty. With N < M only N bins are used.

    Args:
        logits: [N, C] logits (not probabilities: passing probabilities would apply a second softmax).
        labels: [N] integer labels in [0, C).
        n_bins: M >= 1, the number of bins (JEI-DNN uses 15).
        binning: ``"width"`` or ``"mass"``.
    """
    logits = _check_logits(logits, "logits", 2)
    n = logits.shape[0]
    labels = _check_index(labels, "labels", n, logits.shape[1], "label").to(logits.device)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise EexitValueError(f"n_bins: expected an int >= 1, got {n_bins!r}. Fix: use the default 15.")
    if binning not in ("width", "mass"):
        raise EexitValueError(
            f"binning: expected 'width' or 'mass', got {binning!r}. Fix: use binning='mass' for quantile bins."
        )
    probs = logits.double().softmax(dim=1)  # [N, C], the one and only softmax
    conf, pred = probs.max(dim=1)  # [N], [N]
    correct = (pred == labels).double()  # [N]
    if binning == "width":
        edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64, device=conf.device)  # [M + 1]
    else:
        base, extra = divmod(n, n_bins)
        ends = [(m + 1) * base + min(m + 1, extra) for m in range(n_bins - 1)]  # run m is sorted[.. ends[m])
        srt = conf.sort().values  # [N]
        inner = srt[torch.tensor(ends, dtype=torch.long, device=conf.device) - 1]  # [M - 1]
        edges = torch.cat([conf.new_zeros(1), inner, conf.new_ones(1)])  # [M + 1]
    idx = torch.bucketize(conf, edges[1:-1].contiguous(), right=False)  # [N]; edges[i-1] < x <= edges[i]
    count = torch.bincount(idx, minlength=n_bins)  # [M]
    sum_conf = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, idx, conf)  # [M]
    sum_corr = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, idx, correct)  # [M]
    return ReliabilityBins(edges=edges, confidence=sum_conf / count, accuracy=sum_corr / count, count=count)


def expected_calibration_error(logits: Tensor, labels: Tensor, n_bins: int = 15, binning: Binning = "width") -> float:
    """Expected calibration error Σ_m |B_m|/N · |acc(B_m) − conf(B_m)| over the whole set, in [0, 1].

    Computed once on all N samples (never averaged over mini-batches, which biases it upward), from one
    softmax of the logits. See :func:`reliability_bins` for the two binnings and the edge convention.

    Args:
        logits: [N, C] logits of the prediction being assessed (for an early-exit model: of the exit taken).
        labels: [N] integer labels in [0, C).
        n_bins: M >= 1 bins.
        binning: ``"width"`` (equal-width on [0, 1]) or ``"mass"`` (equal-mass, the JEI-DNN paper's choice).
    """
    bins = reliability_bins(logits, labels, n_bins=n_bins, binning=binning)
    used = bins.count > 0  # [M]; empty bins carry NaN and weight 0
    weight = bins.count[used].double() / bins.count.sum()  # [M']
    return float((weight * (bins.accuracy[used] - bins.confidence[used]).abs()).sum())
