"""Tests of eexit.metrics against hand-computed examples, an independent reference and synthetic data."""

from __future__ import annotations

import math

import pytest
import torch

from eexit.errors import EexitError, EexitTypeError, EexitValueError
from eexit.metrics import (
    accuracy,
    area_under_curve,
    conformal_calibrate,
    conformal_coverage_and_size,
    conformal_quantile,
    conformal_sets,
    exit_rates,
    expected_calibration_error,
    expected_cost,
    per_exit_accuracy,
    reliability_bins,
)

# Six samples, three classes. logits = log(probs) + a per-row shift (softmax ignores it), so the one softmax
# gives these probabilities back. Confidence = max prob; "ok" = argmax equals the label.
#   probs                 label  conf  ok
#   [0.90, 0.05, 0.05]    0      0.90  yes
#   [0.85, 0.10, 0.05]    2      0.85  no
#   [0.10, 0.70, 0.20]    1      0.70  yes
#   [0.25, 0.25, 0.50]    0      0.50  no
#   [0.30, 0.45, 0.25]    1      0.45  yes
#   [0.33, 0.32, 0.35]    1      0.35  no
# Equal width, 5 bins (0,.2] (.2,.4] (.4,.6] (.6,.8] (.8,1]:
#   bin1 {.35 no}: |0 - .35| = .35, bin2 {.50 no, .45 yes}: |.5 - .475| = .025,
#   bin3 {.70 yes}: |1 - .7| = .3, bin4 {.90 yes, .85 no}: |.5 - .875| = .375
#   ECE = (1·.35 + 2·.025 + 1·.3 + 2·.375) / 6 = 1.45 / 6
# Equal mass, 3 bins of 2 sorted confidences: {.35 no, .45 yes} |.5 - .4| = .1, {.50 no, .70 yes}
#   |.5 - .6| = .1, {.85 no, .90 yes} |.5 - .875| = .375; ECE = 2 · (.1 + .1 + .375) / 6 = .575 / 3
PROBS = torch.tensor(
    [
        [0.90, 0.05, 0.05],
        [0.85, 0.10, 0.05],
        [0.10, 0.70, 0.20],
        [0.25, 0.25, 0.50],
        [0.30, 0.45, 0.25],
        [0.33, 0.32, 0.35],
    ],
    dtype=torch.float64,
)
LOGITS = PROBS.log() + torch.tensor([[3.0], [-1.0], [0.5], [0.0], [7.0], [-2.0]], dtype=torch.float64)
LABELS = torch.tensor([0, 2, 1, 0, 1, 1])


def test_ece_equal_width_hand_example() -> None:
    assert expected_calibration_error(LOGITS, LABELS, n_bins=5, binning="width") == pytest.approx(1.45 / 6)
    bins = reliability_bins(LOGITS, LABELS, n_bins=5, binning="width")
    assert bins.count.tolist() == [0, 1, 2, 1, 2]
    assert torch.isnan(bins.confidence[0]) and torch.isnan(bins.accuracy[0])
    assert bins.confidence[1:].tolist() == pytest.approx([0.35, 0.475, 0.70, 0.875])
    assert bins.accuracy[1:].tolist() == pytest.approx([0.0, 0.5, 1.0, 0.5])
    assert bins.edges.tolist() == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])


def test_ece_equal_mass_hand_example() -> None:
    assert expected_calibration_error(LOGITS, LABELS, n_bins=3, binning="mass") == pytest.approx(0.575 / 3)
    bins = reliability_bins(LOGITS, LABELS, n_bins=3, binning="mass")
    assert bins.count.tolist() == [2, 2, 2]
    assert bins.confidence.tolist() == pytest.approx([0.4, 0.6, 0.875])
    assert bins.edges.tolist() == pytest.approx([0.0, 0.45, 0.70, 1.0])


def test_ece_one_bin_is_mean_confidence_minus_accuracy() -> None:
    # mean conf = 3.75 / 6 = .625, accuracy = 3 / 6: ECE = .125 whatever the binning
    for binning in ("width", "mass"):
        assert expected_calibration_error(LOGITS, LABELS, n_bins=1, binning=binning) == pytest.approx(0.125)


def test_ece_float32_logits_and_double_softmax_differs() -> None:
    assert expected_calibration_error(LOGITS.float(), LABELS, 5) == pytest.approx(1.45 / 6, abs=1e-6)
    # Feeding probabilities as if they were logits (the authors' double softmax) must NOT give the same value.
    assert expected_calibration_error(PROBS, LABELS, 5) != pytest.approx(1.45 / 6, abs=1e-3)


def test_width_bins_are_right_closed() -> None:
    # Uniform logits: confidence exactly 1/C, which sits on an edge: it belongs to the lower bin.
    two = reliability_bins(torch.zeros(1, 2), torch.tensor([0]), n_bins=2)
    assert two.count.tolist() == [1, 0]
    five = reliability_bins(torch.zeros(3, 5), torch.tensor([0, 1, 2]), n_bins=5)
    assert five.count.tolist() == [3, 0, 0, 0, 0]
    # Confidence 1.0 (saturated) falls in the last bin.
    sat = reliability_bins(torch.tensor([[200.0, 0.0]]), torch.tensor([0]), n_bins=4)
    assert sat.count.tolist() == [0, 0, 0, 1]


def test_mass_bins_keep_ties_together_and_ignore_order() -> None:
    # confidences .5, .5, .5 (uniform over 2 classes) and .9: the run split 2 | 2 would cut the tie.
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0], [math.log(0.9), math.log(0.1)], [0.0, 0.0]])
    labels = torch.tensor([0, 1, 0, 1])
    bins = reliability_bins(logits, labels, n_bins=2, binning="mass")
    assert bins.count.tolist() == [3, 1]
    perm = torch.tensor([2, 3, 1, 0])
    assert expected_calibration_error(logits[perm], labels[perm], 2, "mass") == pytest.approx(
        expected_calibration_error(logits, labels, 2, "mass")
    )


def test_mass_bins_with_fewer_samples_than_bins() -> None:
    # Two samples, 15 bins: each sample alone in its bin, ECE = mean |ok - conf| = (|1-.9| + |0-.6|) / 2
    logits = torch.tensor([[0.9, 0.1], [0.4, 0.6]]).log()
    ece = expected_calibration_error(logits, torch.tensor([0, 0]), n_bins=15, binning="mass")
    assert ece == pytest.approx(0.35)


def _reference_width_ece(logits: torch.Tensor, labels: torch.Tensor, m: int) -> float:
    """Independent loop: bin b holds b/m < conf <= (b+1)/m (bin 0 also holds 0)."""
    conf, pred = logits.double().softmax(1).max(1)
    total = 0.0
    for b in range(m):
        lo, hi = b / m, (b + 1) / m
        mask = (conf > lo) & (conf <= hi) if b else conf <= hi
        if mask.any():
            gap = (pred[mask] == labels[mask]).double().mean() - conf[mask].mean()
            total += mask.double().mean().item() * abs(gap.item())
    return total


def test_ece_matches_reference_loop_on_random_data() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(500, 10, generator=gen)
    labels = torch.where(torch.rand(500, generator=gen) < 0.6, logits.argmax(1), torch.randint(0, 10, (500,)))
    for m in (1, 7, 15):
        reference = _reference_width_ece(logits, labels, m)
        assert expected_calibration_error(logits, labels, m) == pytest.approx(reference)


def test_ece_small_for_calibrated_large_for_overconfident() -> None:
    # Labels drawn from the model's own probabilities: calibrated by construction, ECE -> 0 with N
    # (binning noise at N = 50000 is about .008 with 15 bins).
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(1)
    probs = torch.distributions.Dirichlet(torch.full((10,), 0.5)).sample((50000,))
    labels = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    for binning in ("width", "mass"):
        assert expected_calibration_error(probs.log(), labels, 15, binning) < 0.02
        sharpened = 3 * probs.log()  # overconfident
        assert expected_calibration_error(sharpened, labels, 15, binning) > 0.1


def test_accuracy_exit_rates_cost() -> None:
    assert accuracy(LOGITS, LABELS) == pytest.approx(0.5)
    exits = torch.tensor([0, 2, 2, 1, 2, 0])
    assert exit_rates(exits, 4).tolist() == pytest.approx([2 / 6, 1 / 6, 3 / 6, 0.0])
    # (1 + 4 + 4 + 2 + 4 + 1) / 6
    assert expected_cost(exits, [1.0, 2.0, 4.0, 8.0]) == pytest.approx(16 / 6)
    assert expected_cost(exits, torch.tensor([1.0, 2.0, 4.0, 8.0])) == pytest.approx(16 / 6)


def test_per_exit_accuracy() -> None:
    labels = torch.tensor([0, 1, 1, 1])
    preds = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 0]])  # exit 0 right on 0, 2, 3; exit 1 right on 0, 1
    logits = torch.nn.functional.one_hot(preds, 2).float()  # [2, 4, 2]
    res = per_exit_accuracy(logits, labels, torch.tensor([0, 1, 0, 1]))
    assert res.on_all.tolist() == pytest.approx([0.75, 0.5])
    assert res.on_exited.tolist() == pytest.approx([1.0, 0.5])  # exit 0 on {0, 2}; exit 1 on {1, 3}
    none_at_1 = per_exit_accuracy(logits, labels, torch.zeros(4, dtype=torch.long))
    assert none_at_1.on_exited[0].item() == pytest.approx(0.75) and math.isnan(none_at_1.on_exited[1].item())


def test_area_under_curve_hand_examples() -> None:
    # points (cost, acc), unsorted: (3, .8) (1, .5) (4, .7) (2, .4); best-at-or-below-cost envelope:
    # (1, .5) (2, .5) (3, .8) (4, .8). Over [1, 4]: (.5 + .65 + .8) / 3 = .65 (raw points would give .6)
    costs, accs = [3.0, 1.0, 4.0, 2.0], [0.8, 0.5, 0.7, 0.4]
    assert area_under_curve(costs, accs, (1.0, 4.0)) == pytest.approx(0.65)
    # Over [2.5, 4]: f(2.5) = .65; (.5 · (.65 + .8) / 2 + 1 · .8) / 1.5 = 1.1625 / 1.5
    auc = area_under_curve(torch.tensor(costs), torch.tensor(accs), (2.5, 4.0))
    assert auc == pytest.approx(1.1625 / 1.5)
    # Equal costs: the better point counts.
    assert area_under_curve([1.0, 1.0, 2.0], [0.5, 0.7, 0.7], (1.0, 2.0)) == pytest.approx(0.7)
    assert area_under_curve([0.1, 0.5, 1.0], [0.9, 0.9, 0.9], (0.2, 0.8)) == pytest.approx(0.9)


def test_conformal_quantile_hand_examples() -> None:
    scores = torch.tensor([0.3, 1.0, 0.1, 0.7, 0.5, 0.2, 0.9, 0.4, 0.8, 0.6])  # n = 10
    assert conformal_quantile(scores, 0.2) == pytest.approx(0.9)  # k = ceil(11 · .8) = 9
    assert conformal_quantile(scores, 0.5) == pytest.approx(0.6)  # k = ceil(5.5) = 6
    assert conformal_quantile(scores, 0.1) == pytest.approx(1.0)  # k = ceil(9.9) = 10
    assert conformal_quantile(scores, 0.05) == math.inf  # k = ceil(10.45) = 11 > n
    # (n+1)(1-α) exactly an integer: 20 · .95 = 19 = n, finite; one sample fewer and it is +inf.
    assert conformal_quantile(torch.arange(1, 20) / 19, 0.05) == pytest.approx(1.0)
    assert conformal_quantile(torch.arange(1, 19) / 18, 0.05) == math.inf
    # 150 · (1 - .18) = 123 exactly, 123.00000000000001 in floats: k must be 123, not 124.
    assert conformal_quantile(torch.arange(1, 150) / 149, 0.18) == pytest.approx(123 / 149)


def test_conformal_quantile_expected_coverage_is_exact() -> None:
    # For continuous exchangeable scores, P(s_new <= q̂) = k / (n+1) exactly; with uniform scores the
    # coverage given the calibration set is q̂ itself. n = 50, α = .1: k = 46, E = 46/51 ≈ .9020
    # (numpy's "higher" at level k/n would give 47/51 ≈ .9216). sd of the mean over 4000 draws ≈ .00065.
    gen = torch.Generator().manual_seed(2)
    u = torch.rand(4000, 50, generator=gen, dtype=torch.float64)
    mean_q = sum(conformal_quantile(row, 0.1) for row in u) / 4000
    assert mean_q == pytest.approx(46 / 51, abs=0.003)


def _synthetic_exits(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three exits of a model calibrated at the last exit; earlier exits are sharpened/flattened copies."""
    probs = torch.distributions.Dirichlet(torch.full((10,), 0.3)).sample((n,))  # [N, C]
    labels = torch.multinomial(probs, 1, generator=gen).squeeze(1)  # y ~ p: calibrated
    logits = torch.stack([0.5 * probs.log(), 2.0 * probs.log(), probs.log()])  # [E, N, C]
    conf = logits.softmax(2).amax(2)  # [E, N]
    exits = torch.where(conf[0] >= 0.3, 0, torch.where(conf[1] >= 0.45, 1, 2))  # same rule on every split
    return logits, labels, exits


def test_conformal_per_exit_coverage_on_calibrated_model() -> None:
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(3)
    alpha = 0.1
    cal_logits, cal_labels, cal_exits = _synthetic_exits(4000, gen)
    test_logits, test_labels, test_exits = _synthetic_exits(40000, gen)
    qhat = conformal_calibrate(cal_logits, cal_labels, cal_exits, alpha)
    chosen = test_logits[test_exits, torch.arange(40000)]  # [N, C]
    sets = conformal_sets(chosen, test_exits, qhat)
    for exit_ in range(3):
        n_cal, here = int((cal_exits == exit_).sum()), test_exits == exit_
        assert n_cal > 200 and int(here.sum()) > 2000  # every exit is used: the per-exit path is exercised
        cov, size = conformal_coverage_and_size(sets[here], test_labels[here])
        # Guarantee: 1-α <= E[cov] <= 1-α + 1/(n+1); tolerance: 4 sd of the calibration (Beta) and test draws
        sd = math.sqrt(alpha * (1 - alpha) * (1 / (n_cal + 2) + 1 / int(here.sum())))
        assert 1 - alpha - 4 * sd <= cov <= 1 - alpha + 1 / (n_cal + 1) + 4 * sd
        assert 1.0 <= size < 10.0
    cov, _ = conformal_coverage_and_size(sets, test_labels)
    assert cov == pytest.approx(1 - alpha, abs=0.015)


def test_conformal_calibrate_fallback_hand_example() -> None:
    # Two exits, C = 2, every label 0. Score s = 1 - p_0.
    # IM 0: p_0 = .95 .85 .75 .65 .55 -> s = .05 .15 .25 .35 .45
    # IM 1: p_0 = .90 .80 .70 .60 .50 -> s = .10 .20 .30 .40 .50
    p0 = torch.tensor([[0.95, 0.85, 0.75, 0.65, 0.55], [0.90, 0.80, 0.70, 0.60, 0.50]], dtype=torch.float64)
    logits = torch.stack([p0, 1 - p0], dim=2).log()  # [2, 5, 2]
    labels, exits = torch.zeros(5, dtype=torch.long), torch.tensor([0, 0, 0, 0, 1])
    # α = .4. Exit 0: 4 exited (> 3): own scores, n = 4, k = ceil(5 · .6) = 3 -> .25.
    # Exit 1: 1 exited (<= 3): all 5 scores at IM 1, k = ceil(6 · .6) = 4 -> .40.
    qhat = conformal_calibrate(logits, labels, exits, 0.4, min_samples=3)
    assert qhat.tolist() == pytest.approx([0.25, 0.40])
    # min_samples = 4: 4 exited is not more than 4, so exit 0 also falls back: all 5 at IM 0, k = 4 -> .35.
    qhat = conformal_calibrate(logits, labels, exits, 0.4, min_samples=4)
    assert qhat.tolist() == pytest.approx([0.35, 0.40])


def test_conformal_sets_hand_example() -> None:
    logits = torch.tensor([[0.6, 0.3, 0.1], [0.6, 0.3, 0.1]]).log()
    # exit 0: q̂ = .45 -> keep p >= .55: {0}; exit 1: q̂ = .75 -> keep p >= .25: {0, 1}
    sets = conformal_sets(logits, torch.tensor([0, 1]), torch.tensor([0.45, 0.75]))
    assert sets.tolist() == [[True, False, False], [True, True, False]]
    everything = conformal_sets(logits, torch.tensor([0, 0]), torch.tensor([math.inf]))
    assert bool(everything.all())
    # A class whose probability equals the calibration score's p̂_y is kept (boundary included).
    one = torch.tensor([1]), torch.tensor([0])  # label 1 (score 1 - .3), exited at 0
    qhat = conformal_calibrate(logits[:1].unsqueeze(0), *one, 0.5, min_samples=0)  # n = 1, k = 1: q̂ = .7
    assert conformal_sets(logits[:1], torch.tensor([0]), qhat).tolist() == [[True, True, False]]


def test_coverage_and_size_hand_example() -> None:
    sets = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1], [1, 1, 1]], dtype=torch.bool)
    cov, size = conformal_coverage_and_size(sets, torch.tensor([0, 2, 2, 1]))
    assert (cov, size) == pytest.approx((0.75, 1.75))  # covered 1, 0, 1, 1; sizes 1, 2, 1, 3


# ------------------------------------------------------------------------------------------ bad input
L3, Z4 = torch.zeros(2, 4, 3), torch.zeros(4, dtype=torch.long)  # [E, N, C] logits, [N] labels/exits
L2, Y2 = torch.zeros(2, 3), torch.tensor([0, 1])  # [N, C] logits, [N] labels
BAD_INPUTS = [
    ("label >= C", lambda: accuracy(torch.zeros(2, 3), torch.tensor([0, 3])), EexitValueError),
    ("label < 0", lambda: expected_calibration_error(L2, torch.tensor([-1, 0])), EexitValueError),
    ("float labels", lambda: accuracy(torch.zeros(2, 3), torch.tensor([0.0, 1.0])), EexitTypeError),
    ("labels length", lambda: accuracy(torch.zeros(2, 3), torch.tensor([0])), EexitValueError),
    ("empty logits", lambda: accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)), EexitValueError),
    ("no classes", lambda: accuracy(torch.zeros(2, 0), torch.tensor([0, 0])), EexitValueError),
    ("1-D logits", lambda: accuracy(torch.zeros(3), torch.tensor([0])), EexitValueError),
    ("NaN logits", lambda: accuracy(torch.tensor([[math.nan, 0.0]]), torch.tensor([0])), EexitValueError),
    ("int logits", lambda: accuracy(L2.long(), Y2), EexitTypeError),
    ("not a tensor", lambda: accuracy([[0.0, 1.0]], torch.tensor([0])), EexitTypeError),
    ("n_bins 0", lambda: expected_calibration_error(LOGITS, LABELS, n_bins=0), EexitValueError),
    ("n_bins float", lambda: reliability_bins(LOGITS, LABELS, n_bins=2.5), EexitValueError),
    ("binning", lambda: expected_calibration_error(LOGITS, LABELS, binning="quantile"), EexitValueError),
    ("alpha 0", lambda: conformal_quantile(torch.rand(5), 0.0), EexitValueError),
    ("alpha 1", lambda: conformal_quantile(torch.rand(5), 1.0), EexitValueError),
    ("alpha > 1", lambda: conformal_calibrate(L3, Z4, Z4, 1.5), EexitValueError),
    ("empty scores", lambda: conformal_quantile(torch.zeros(0), 0.1), EexitValueError),
    ("NaN scores", lambda: conformal_quantile(torch.tensor([0.1, math.nan]), 0.1), EexitValueError),
    ("exit >= E", lambda: conformal_calibrate(L3, Z4, torch.tensor([0, 1, 2, 0]), 0.1), EexitValueError),
    ("exit_index length", lambda: conformal_calibrate(L3, Z4, Z4[:3], 0.1), EexitValueError),
    ("min_samples < 0", lambda: conformal_calibrate(L3, Z4, Z4, 0.1, -1), EexitValueError),
    ("qhat NaN", lambda: conformal_sets(L2, torch.tensor([0, 0]), torch.tensor([math.nan])), EexitValueError),
    ("qhat too short", lambda: conformal_sets(L2, Y2, torch.tensor([0.5])), EexitValueError),
    ("sets not bool", lambda: conformal_coverage_and_size(torch.ones(2, 3), Y2), EexitTypeError),
    ("sets label", lambda: conformal_coverage_and_size(L2 == 0, torch.tensor([0, 3])), EexitValueError),
    ("exit_rates E 0", lambda: exit_rates(torch.tensor([0]), 0), EexitValueError),
    ("exit_rates empty", lambda: exit_rates(torch.zeros(0, dtype=torch.long), 2), EexitValueError),
    ("exit_rates range", lambda: exit_rates(torch.tensor([0, 2]), 2), EexitValueError),
    ("per-exit 2-D", lambda: per_exit_accuracy(torch.zeros(4, 3), Z4, Z4), EexitValueError),
    ("cost negative", lambda: expected_cost(torch.tensor([0]), [-1.0]), EexitValueError),
    ("cost NaN", lambda: expected_cost(torch.tensor([0]), [math.nan]), EexitValueError),
    ("cost too few", lambda: expected_cost(torch.tensor([0, 1]), [1.0]), EexitValueError),
    ("cost empty", lambda: expected_cost(torch.tensor([0]), []), EexitValueError),
    ("auc empty", lambda: area_under_curve([], [], (0.0, 1.0)), EexitValueError),
    ("auc lengths", lambda: area_under_curve([1.0, 2.0], [0.5], (1.0, 2.0)), EexitValueError),
    ("auc lo >= hi", lambda: area_under_curve([1.0, 2.0], [0.5, 0.6], (2.0, 1.0)), EexitValueError),
    ("auc lo < min", lambda: area_under_curve([1.0, 2.0], [0.5, 0.6], (0.5, 2.0)), EexitValueError),
    ("auc hi > max", lambda: area_under_curve([1.0, 2.0], [0.5, 0.6], (1.0, 2.5)), EexitValueError),
    ("auc NaN", lambda: area_under_curve([1.0, 2.0], [0.5, math.nan], (1.0, 2.0)), EexitValueError),
    ("auc range", lambda: area_under_curve([1.0, 2.0], [0.5, 0.6], (1.0,)), EexitValueError),
    ("auc single", lambda: area_under_curve([1.0], [0.5], (1.0, 1.0)), EexitValueError),
]


@pytest.mark.parametrize(("case", "call", "error"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_teaching_error(case: str, call, error: type[EexitError]) -> None:
    with pytest.raises(error) as info:
        call()
    msg = str(info.value)
    assert "expected" in msg and "got" in msg, f"{case}: message should say what was expected and what came"
    # Built-in compatibility: value errors are ValueErrors, type errors are TypeErrors.
    assert isinstance(info.value, ValueError if error is EexitValueError else TypeError)
