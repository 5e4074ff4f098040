"""Per-exit thresholds tuned on validation (eexit.baselines.tuned), the strongest simple baseline."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from eexit.baselines import apply_thresholds, fit_budgeted_thresholds, geometric_exit_distribution, max_probability
from eexit.baselines.tuned import _best_threshold, _gain, tune_thresholds, tuned_threshold_curve
from eexit.errors import EexitValueError


def _problem(n: int = 300, e: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (n,), generator=g)
    strength = torch.linspace(0.5, 2.5, e).view(e, 1, 1)
    logits = torch.randn(e, n, 5, generator=g) * strength
    logits[torch.arange(e).view(e, 1), torch.arange(n), labels] += strength.view(e, 1)
    scores = max_probability(logits)
    correct = logits.argmax(-1) == labels
    costs = torch.linspace(0.25, 1.0, e, dtype=torch.float64)
    return scores, correct, costs


def test_a_coordinate_step_is_the_best_threshold_of_that_exit():
    scores, correct, costs = _problem(n=60)
    start = fit_budgeted_thresholds(scores, geometric_exit_distribution(10, 4)).double()
    for k, price in itertools.product(range(3), (0.0, 0.1, 0.5)):
        found = _best_threshold(scores.double(), correct, costs, start.clone(), k, price)
        trial = start.clone()
        trial[k] = found
        best = _gain(scores.double(), correct, costs, trial, price)
        for c in [*scores[k].tolist(), math.inf]:  # brute force over every threshold that matters
            other = start.clone()
            other[k] = c
            assert _gain(scores.double(), correct, costs, other, price) <= best + 1e-12


def test_tuned_beats_every_msdnet_point_at_its_price():
    scores, correct, costs = _problem()
    for price in (0.0, 0.05, 0.3):
        tuned = tune_thresholds(scores, correct, costs, price)
        assert tuned[-1] == -math.inf
        value = _gain(scores.double(), correct, costs, tuned, price)
        for p in (1, 5, 10, 20, 30):
            msd = fit_budgeted_thresholds(scores, geometric_exit_distribution(p, 4))
            assert value >= _gain(scores.double(), correct, costs, msd, price) - 1e-12
    # a higher price never buys a costlier point
    spent = [float(costs[apply_thresholds(scores, t)].mean()) for t in tuned_threshold_curve(scores, correct, costs)]
    assert spent[0] >= spent[-1]


def test_tuned_thresholds_refuse_bad_input():
    scores, correct, costs = _problem()
    with pytest.raises(EexitValueError, match="price"):
        tune_thresholds(scores, correct, costs, -1.0)
    with pytest.raises(EexitValueError, match="correct"):
        tune_thresholds(scores, correct[:, :10], costs, 0.1)
    with pytest.raises(EexitValueError, match="exit_costs"):
        tune_thresholds(scores, correct, costs[:2], 0.1)
    with pytest.raises(EexitValueError, match="passes"):
        tune_thresholds(scores, correct, costs, 0.1, passes=0)
    with pytest.raises(EexitValueError, match="prices"):
        tuned_threshold_curve(scores, correct, costs, prices=())
