"""Confidence-threshold exits fitted by the MSDNet "budgeted batch" protocol.

Huang et al., "Multi-Scale Dense Networks for Resource Efficient Image Classification" (ICLR 2018), §4 and
their ``adaptive_inference.py``; the protocol behind every baseline curve of JEI-DNN (reference/jei-dnn.md
§5.3, §7). A sample leaves at the first exit whose confidence reaches that exit's threshold. For a budget
knob p, target exit fractions follow a geometric law q_k ∝ (p/20)^k over ALL exits; on validation the
thresholds are set greedily so that a fraction q_k of ALL validation samples leaves at exit k. That is
MSDNet's code; the JEI-DNN notes speak of a fraction of the samples "still remaining", which it is not. The
thresholds are then applied unchanged to test, giving one (cost, accuracy) operating point per p.

Works on precomputed all-exit logits [E, N, C]; confidences are computed in float64 so that saturated
probabilities do not tie (ties at a threshold all exit together, which is the only way a threshold can act).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from eexit._checks import _as_float_vector, _check_index, _check_logits, _check_tensor
from eexit.errors import EexitTypeError, EexitValueError
from eexit.metrics import exit_rates, expected_cost

__all__ = [
    "SCORES",
    "OperatingPoint",
    "apply_thresholds",
    "budgeted_curve",
    "fit_budgeted_thresholds",
    "geometric_exit_distribution",
    "margin",
    "max_probability",
    "negative_entropy",
]


# ------------------------------------------------------------------------------------------- scores
def _probs(logits: Tensor) -> Tensor:
    logits = _check_tensor(logits, "logits")
    if not logits.is_floating_point():
        raise EexitTypeError(f"logits: expected floating-point logits, got {logits.dtype}. Fix: .float().")
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise EexitValueError(
            f"logits: expected logits [..., C] with C >= 1, got shape "
            f"{tuple(logits.shape)}. Fix: pass raw logits, classes last."
        )
    return logits.double().softmax(dim=-1)  # [..., C]


def max_probability(logits: Tensor) -> Tensor:
    """Max softmax probability, in [1/C, 1]; higher = more confident. [..., C] -> [...] float64."""
    return _probs(logits).max(dim=-1).values


def negative_entropy(logits: Tensor) -> Tensor:
    """Σ_k p_k log p_k (nats), in [−log C, 0]; higher = more confident. [..., C] -> [...] float64."""
    p = _probs(logits)  # [..., C]
    return torch.special.xlogy(p, p).sum(dim=-1)  # xlogy: 0·log 0 = 0 for underflowed classes


def margin(logits: Tensor) -> Tensor:
    """Top-1 minus top-2 softmax probability, in [0, 1]; higher = more confident. [..., C>=2] -> [...]."""
    p = _probs(logits)  # [..., C]
    if p.shape[-1] < 2:
        raise EexitValueError(
            f"logits: margin expected at least 2 classes, got C = {p.shape[-1]}. "
            "Fix: use max_probability or negative_entropy."
        )
    top2 = p.topk(2, dim=-1).values  # [..., 2]
    return top2[..., 0] - top2[..., 1]


SCORES: dict[str, Callable[[Tensor], Tensor]] = {
    "margin": margin,
    "max_probability": max_probability,
    "negative_entropy": negative_entropy,
}


# ----------------------------------------------------------------------------------------- protocol
def geometric_exit_distribution(p: float, num_exits: int, base: float = 20) -> Tensor:
    """Target exit fractions q_k ∝ (p/base)^k, k = 1..E, normalised to sum to 1 (float64 [E]).

    p < base puts most samples on early exits, p > base on late ones, p = base is uniform. MSDNet and
    L2W-DEN use base 20 (p = 1..39 or 40); the JEI-DNN port used 15.
    """
    if isinstance(num_exits, bool) or not isinstance(num_exits, int) or num_exits < 1:
        raise EexitValueError(f"num_exits: expected an int >= 1, got {num_exits!r}.")
    for name, v in (("p", p), ("base", base)):
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise EexitValueError(f"{name}: expected a finite number > 0, got {v!r}. Fix: e.g. p=10, base=20.")
    k = torch.arange(1, num_exits + 1, dtype=torch.float64)  # [E]
    return torch.softmax(k * math.log(p / base), dim=0)  # [E]; log space: no overflow for large (p/base)^k


def _check_scores(scores: object) -> Tensor:
    scores = _check_tensor(scores, "scores")
    if scores.ndim != 2 or scores.numel() == 0:
        raise EexitValueError(
            f"scores: expected a non-empty [E, N] tensor (one confidence per exit and "
            f"sample), got shape {tuple(scores.shape)}. "
            "Fix: apply a score function to [E, N, C] logits."
        )
    if not scores.is_floating_point() or not bool(torch.isfinite(scores).all()):
        raise EexitValueError(
            "scores: expected finite floating-point confidences, got NaN/inf or integers. "
            "Fix: check the logits and the score function."
        )
    return scores


def fit_budgeted_thresholds(scores: Tensor, q: Tensor) -> Tensor:
    """Fit per-exit thresholds on validation so that a fraction q_k of ALL samples leaves at exit k.

    Exits are visited in order. At exit k < E−1, among the samples that have not exited yet, confidences are
    sorted in decreasing order and the threshold is the ⌊N·q_k⌋-th of them, so exactly that many samples leave
    there when confidences do not tie (samples tied with the threshold all leave: a threshold cannot split
    them). ⌊N·q_k⌋ = 0 gives +inf (nobody leaves); if ties left fewer samples than ⌊N·q_k⌋, all remaining
    leave (MSDNet's code would then let nobody leave). The last exit's threshold is −inf: it takes the rest,
    including what the floors round away.

    Args:
        scores: [E, N] validation confidences (higher = more confident), e.g. ``max_probability(logits)``.
        q: [E] non-negative target exit fractions summing to 1 (e.g. :func:`geometric_exit_distribution`).

    Returns:
        [E] float64 thresholds, on the device of ``scores``.
    """
    scores = _check_scores(scores).double()
    e, n = scores.shape
    q = _check_tensor(q, "q").double()
    if q.shape != (e,) or not bool(torch.isfinite(q).all()) or bool((q < 0).any()):
        raise EexitValueError(
            f"q: expected {e} finite non-negative fractions (one per exit), got shape "
            f"{tuple(q.shape)}. Fix: geometric_exit_distribution(p, num_exits={e})."
        )
    if abs(q.sum().item() - 1.0) > 1e-6:
        raise EexitValueError(f"q: expected fractions summing to 1, got sum {q.sum().item():.6g}. Fix: q / q.sum().")
    thresholds = torch.full((e,), -math.inf, dtype=torch.float64, device=scores.device)  # [E]
    remaining = torch.ones(n, dtype=torch.bool, device=scores.device)  # [N]
    for k in range(e - 1):
        # 1e-9 slack: an exact N·q_k = 4 computed as 3.999999999999999 (N = 15, p = 40) must not lose one.
        out_n = math.floor(n * q[k].item() + 1e-9)
        left = scores[k, remaining].sort(descending=True).values  # [n_remaining]
        if out_n == 0 or left.numel() == 0:
            thresholds[k] = math.inf
        else:
            thresholds[k] = left[min(out_n, left.numel()) - 1]
        remaining &= scores[k] < thresholds[k]
    return thresholds


def apply_thresholds(scores: Tensor, thresholds: Tensor) -> Tensor:
    """Exit of each sample: the first exit whose score is >= its threshold; the last exit always accepts.

    Args:
        scores: [E, N] confidences of every exit for every sample.
        thresholds: [E] per-exit thresholds (the last one is ignored: the backbone's head takes the rest).

    Returns:
        [N] int64 exit indices.
    """
    scores = _check_scores(scores)
    thresholds = _check_tensor(thresholds, "thresholds")
    if thresholds.shape != (scores.shape[0],) or bool(torch.isnan(thresholds).any()):
        raise EexitValueError(
            f"thresholds: expected {scores.shape[0]} non-NaN values (one per exit), got "
            f"shape {tuple(thresholds.shape)}. "
            "Fix: pass the output of fit_budgeted_thresholds."
        )
    passes = scores.double() >= thresholds.double().to(scores.device).unsqueeze(1)  # [E, N]
    passes[-1] = True
    return passes.to(torch.uint8).argmax(dim=0)  # [N]; argmax returns the first maximal index


@dataclass(frozen=True)
class OperatingPoint:
    """One point of a budgeted-batch curve, measured on test with thresholds fitted on validation.

    Attributes:
        p: the budget knob; target fractions were ``geometric_exit_distribution(p, E, base)``.
        cost: expected cost per test sample, in the units of ``exit_costs``.
        accuracy: test top-1 accuracy of the exit each sample took, in [0, 1].
        exit_fractions: realised fraction of test samples at each exit.
        thresholds: per-exit thresholds fitted on validation (the last is −inf).
    """

    p: float
    cost: float
    accuracy: float
    exit_fractions: tuple[float, ...]
    thresholds: tuple[float, ...]


def budgeted_curve(
    val_logits: Tensor,
    test_logits: Tensor,
    test_labels: Tensor,
    exit_costs: Tensor | Sequence[float],
    score: str | Callable[[Tensor], Tensor] = "max_probability",
    ps: Iterable[float] = range(1, 40),
    base: float = 20,
) -> list[OperatingPoint]:
    """MSDNet budgeted-batch curve: for each p, fit thresholds on validation and measure them on test.

    Validation needs no labels: thresholds only follow the confidence ranking. Use a split disjoint from test.

    Args:
        val_logits: [E, Nv, C] logits of every exit on the validation split.
        test_logits: [E, Nt, C] logits of every exit on the test split.
        test_labels: [Nt] integer labels of the test split.
        exit_costs: [E] cost to reach each exit (cumulative FLOPs, or normalised IC_l).
        score: a name in ``SCORES`` or a callable mapping logits [..., C] to confidences [...].
        ps: budget knobs p (MSDNet: 1..39 or 40).
        base: the geometric law's base (MSDNet: 20; the JEI-DNN port: 15).

    Returns:
        One :class:`OperatingPoint` per p, in the order of ``ps``.
    """
    val = _check_logits(val_logits, "val_logits", 3)
    test = _check_logits(test_logits, "test_logits", 3)
    if val.shape[0] != test.shape[0] or val.shape[2] != test.shape[2]:
        raise EexitValueError(
            f"val_logits and test_logits: expected the same exits and classes [E, *, C], "
            f"got {tuple(val.shape)} and {tuple(test.shape)}. "
            "Fix: use the same model for both."
        )
    e, nt, c = test.shape
    labels = _check_index(test_labels, "test_labels", nt, c, "label").to(test.device)
    n_costs = _as_float_vector(exit_costs, "exit_costs").numel()
    if n_costs != e:
        raise EexitValueError(
            f"exit_costs: expected {e} costs (one per exit), got {n_costs}. "
            "Fix: pass the cost table's cumulative cost of every exit."
        )
    if isinstance(score, str):
        if score not in SCORES:
            raise EexitValueError(f"score: expected one of {sorted(SCORES)} or a callable, got {score!r}.")
        score_fn = SCORES[score]
    elif callable(score):
        score_fn = score
    else:
        raise EexitTypeError(f"score: expected a name or a callable, got {type(score).__name__}.")
    ps = list(ps)
    if not ps:
        raise EexitValueError("ps: expected at least one budget knob, got none. Fix: e.g. ps=range(1, 40).")
    val_scores, test_scores = score_fn(val), score_fn(test)  # [E, Nv], [E, Nt]
    correct = test.argmax(dim=2) == labels.unsqueeze(0)  # [E, Nt]
    points = []
    for p in ps:
        thresholds = fit_budgeted_thresholds(val_scores, geometric_exit_distribution(p, e, base))  # [E]
        exit_index = apply_thresholds(test_scores, thresholds)  # [Nt]
        acc = correct.gather(0, exit_index.unsqueeze(0)).double().mean().item()
        points.append(
            OperatingPoint(
                p=float(p),
                cost=expected_cost(exit_index, exit_costs),
                accuracy=acc,
                exit_fractions=tuple(exit_rates(exit_index, e).tolist()),
                thresholds=tuple(thresholds.tolist()),
            )
        )
    return points
