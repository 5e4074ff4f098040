"""Split-conformal prediction sets for early-exit networks, one quantile per exit.

A sample's score is 1 − the probability of its true class at the exit it took; each exit's quantile comes from a
clean calibration split with the exact split-conformal rank (the authors' numpy "higher" quantile is one rank more
conservative, reference/jei-dnn.md §5.4). Pure torch functions on precomputed outputs, in float64. Also exported by
:mod:`eexit.metrics`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from eexit._checks import _check_alpha, _check_index, _check_logits, _check_tensor
from eexit.errors import EexitTypeError, EexitValueError

__all__ = ["conformal_calibrate", "conformal_coverage_and_size", "conformal_quantile", "conformal_sets"]


def conformal_quantile(scores: Tensor, alpha: float) -> float:
    """Split-conformal quantile of calibration scores: the k-th smallest score, k = ⌈(n+1)(1−α)⌉.

    This is the empirical quantile at level k/n with "higher" interpolation in the inverse-CDF sense (the
    smallest observed score s with #{scores ≤ s} ≥ k), which gives, for exchangeable data, coverage
    P(s_new ≤ q̂) ≥ 1 − α, and ≤ 1 − α + 1/(n+1) when scores have no ties. Note: ``numpy.quantile(scores, k/n,
    method="higher")`` (used by the JEI-DNN code) interpolates on the index (n−1)·k/n and returns the
    (k+1)-th smallest for k < n, one rank more conservative than needed.

    When n is too small for the level (k > n, i.e. n < 1/α − 1), no finite quantile is valid: returns +inf,
    so every prediction set holds all classes. A 1e-9 slack before the ceiling keeps float round-off (e.g.
    150 · (1 − 0.18) = 123.00000000000001) from adding a rank.

    Args:
        scores: [n] non-conformity scores of the calibration samples (here s = 1 − p̂_y).
        alpha: miscoverage level in (0, 1).
    """
    scores = _check_tensor(scores, "scores")
    alpha = _check_alpha(alpha)
    if scores.ndim != 1 or scores.numel() == 0:
        raise EexitValueError(
            f"scores: expected a non-empty 1-D tensor, got shape {tuple(scores.shape)}. "
            "Fix: pass one score per calibration sample."
        )
    if bool(torch.isnan(scores).any()):
        raise EexitValueError("scores: expected no NaN, got some. Fix: check the probabilities they come from.")
    n = scores.numel()
    k = math.ceil((n + 1) * (1.0 - alpha) - 1e-9)
    if k > n:
        return math.inf
    return float(torch.kthvalue(scores.double(), k).values)


def conformal_calibrate(
    all_exit_logits: Tensor, labels: Tensor, exit_index: Tensor, alpha: float, min_samples: int = 20
) -> Tensor:
    """Per-exit split-conformal quantiles q̂_l from a held-out calibration split.

    The score is s = 1 − p̂_y with p̂ the softmax of exit l's logits. q̂_l uses the calibration samples that
    exited at l; when min_samples or fewer did (JEI-DNN's rule, reference/jei-dnn.md §5.2), it falls back to
    the scores of ALL calibration samples at IM l, which keeps a usable quantile for rarely used exits at the
    price of the per-exit (conditional) guarantee there. Calibrate with the final model on un-augmented data.

    Args:
        all_exit_logits: [E, N, C] logits of every exit on the calibration split (pass log-probabilities if
            you only have probabilities: their softmax gives the probabilities back).
        labels: [N] integer labels.
        exit_index: [N] 0-based exit each calibration sample took under the policy being evaluated.
        alpha: miscoverage level in (0, 1).
        min_samples: fall back to all samples at an exit where at most this many exited.

    Returns:
        [E] float64 quantiles (+inf where the sample count is too small for the level; see
        :func:`conformal_quantile`).
    """
    logits = _check_logits(all_exit_logits, "all_exit_logits", 3)
    e, n, c = logits.shape
    labels = _check_index(labels, "labels", n, c, "label").to(logits.device)
    exit_index = _check_index(exit_index, "exit_index", n, e, "exit").to(logits.device)
    alpha = _check_alpha(alpha)
    if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 0:
        raise EexitValueError(f"min_samples: expected an int >= 0, got {min_samples!r}. Fix: use the default 20.")
    probs = logits.double().softmax(dim=2)  # [E, N, C]
    scores = 1.0 - probs.gather(2, labels.view(1, n, 1).expand(e, n, 1)).squeeze(2)  # [E, N]
    qhat = torch.empty(e, dtype=torch.float64)
    for exit_ in range(e):
        here = exit_index == exit_  # [N]
        pool = scores[exit_, here] if int(here.sum()) > min_samples else scores[exit_]  # [n_l] or [N]
        qhat[exit_] = conformal_quantile(pool, alpha)
    return qhat.to(logits.device)


def conformal_sets(logits: Tensor, exit_index: Tensor, qhat: Tensor) -> Tensor:
    """Prediction sets {k : p̂_k ≥ 1 − q̂_l} from the logits of the exit each sample took.

    Compared in score space (1 − p̂_k ≤ q̂_l), exactly as the scores were computed at calibration, so a class
    whose probability equals a calibration sample's p̂_y is not lost to round-off. q̂_l = +inf gives all
    classes.

    Args:
        logits: [N, C] logits of the exit each sample took.
        exit_index: [N] 0-based exit each sample took.
        qhat: [E] per-exit quantiles from :func:`conformal_calibrate`.

    Returns:
        [N, C] boolean mask of the classes in each sample's set.
    """
    logits = _check_logits(logits, "logits", 2)
    qhat = _check_tensor(qhat, "qhat")
    if qhat.ndim != 1 or qhat.numel() == 0 or bool(torch.isnan(qhat).any()):
        raise EexitValueError(
            f"qhat: expected a non-empty 1-D tensor without NaN (one quantile per exit), "
            f"got shape {tuple(qhat.shape)}. Fix: pass the output of conformal_calibrate."
        )
    exit_index = _check_index(exit_index, "exit_index", logits.shape[0], qhat.numel(), "exit")
    scores = 1.0 - logits.double().softmax(dim=1)  # [N, C]
    limit = qhat.double().to(logits.device)[exit_index.to(logits.device)]  # [N]
    return scores <= limit.unsqueeze(1)  # [N, C]


def conformal_coverage_and_size(sets: Tensor, labels: Tensor) -> tuple[float, float]:
    """Empirical coverage (fraction of sets holding the label; miscoverage α̂ = 1 − it) and mean set size.

    Args:
        sets: [N, C] boolean prediction-set mask.
        labels: [N] integer labels in [0, C).
    """
    sets = _check_tensor(sets, "sets")
    if sets.dtype != torch.bool:
        raise EexitTypeError(f"sets: expected a bool mask, got {sets.dtype}. Fix: pass conformal_sets(...).")
    if sets.ndim != 2 or sets.numel() == 0:
        raise EexitValueError(f"sets: expected a non-empty [N, C] mask, got shape {tuple(sets.shape)}.")
    labels = _check_index(labels, "labels", sets.shape[0], sets.shape[1], "label").to(sets.device)
    covered = sets.gather(1, labels.unsqueeze(1)).squeeze(1).double()  # [N]
    return covered.mean().item(), sets.sum(dim=1).double().mean().item()
