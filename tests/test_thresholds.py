"""Tests of the MSDNet budgeted-batch confidence thresholds (eexit.baselines.thresholds)."""

from __future__ import annotations

import math

import pytest
import torch

from eexit.baselines import (
    apply_thresholds,
    budgeted_curve,
    fit_budgeted_thresholds,
    geometric_exit_distribution,
    margin,
    max_probability,
    negative_entropy,
)
from eexit.errors import EexitError, EexitTypeError, EexitValueError


def test_score_functions_hand_example() -> None:
    logits = torch.tensor([0.5, 0.3, 0.2]).log() + 4.0  # softmax gives .5 .3 .2 back
    assert max_probability(logits).item() == pytest.approx(0.5)
    assert margin(logits).item() == pytest.approx(0.2)
    expected = 0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2)  # ≈ -1.0297
    assert negative_entropy(logits).item() == pytest.approx(expected)


def test_score_functions_extremes_and_shapes() -> None:
    uniform = torch.zeros(2, 3, 4)  # [E, N, C]
    assert max_probability(uniform).shape == (2, 3)
    assert torch.allclose(max_probability(uniform), torch.full((2, 3), 0.25, dtype=torch.float64))
    assert torch.allclose(negative_entropy(uniform), torch.full((2, 3), -math.log(4), dtype=torch.float64))
    assert torch.allclose(margin(uniform), torch.zeros(2, 3, dtype=torch.float64))
    # Saturated softmax: p underflows to 0 for the other classes, entropy must be 0, not NaN.
    sharp = torch.tensor([[2000.0, 0.0, 0.0]])
    assert negative_entropy(sharp).item() == 0.0 and margin(sharp).item() == 1.0
    # Higher = more confident for every score.
    soft, hard = torch.tensor([1.0, 0.8, 0.0]), torch.tensor([3.0, 0.0, 0.0])
    for fn in (max_probability, negative_entropy, margin):
        assert fn(hard).item() > fn(soft).item()


def test_geometric_exit_distribution() -> None:
    # ρ = 10/20 = .5: (.5, .25, .125) / .875 = (4, 2, 1) / 7
    assert geometric_exit_distribution(10, 3).tolist() == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert geometric_exit_distribution(20, 4).tolist() == pytest.approx([0.25] * 4)  # ρ = 1: uniform
    assert geometric_exit_distribution(40, 2).tolist() == pytest.approx([1 / 3, 2 / 3])  # ρ = 2: (2, 4) / 6
    assert geometric_exit_distribution(6, 2, base=3).tolist() == pytest.approx([1 / 3, 2 / 3])
    big = geometric_exit_distribution(39, 500)  # 1.95^500 overflows float64 if computed directly
    assert bool(torch.isfinite(big).all()) and big.sum().item() == pytest.approx(1.0)


# Hand example: E = 3, N = 8, q = (.25, .25, .5): 2 of ALL 8 samples leave at exit 0, and 2 at exit 1.
#   sample:       0    1    2    3    4    5    6    7
#   exit 0:      .90  .20  .80  .30  .70  .10  .60  .40   top 2: s0, s2 -> T0 = .80
#   exit 1:      .00  .50  .99  .60  .95  .70  .10  .55   among s1 s3 s4 s5 s6 s7: top 2 s4 (.95), s5 (.70)
#                                                         -> T1 = .70 (s2's .99 does not count: it left)
# exits: s0 0, s1 2, s2 0, s3 2, s4 1, s5 1, s6 2, s7 2. ("2 of the 6 remaining"·.25 would let only 1 leave.)
HAND = torch.tensor(
    [
        [0.90, 0.20, 0.80, 0.30, 0.70, 0.10, 0.60, 0.40],
        [0.00, 0.50, 0.99, 0.60, 0.95, 0.70, 0.10, 0.55],
        [0.30, 0.30, 0.30, 0.30, 0.30, 0.30, 0.30, 0.30],
    ],
    dtype=torch.float64,
)


def test_fit_budgeted_thresholds_hand_example() -> None:
    thresholds = fit_budgeted_thresholds(HAND, torch.tensor([0.25, 0.25, 0.5]))
    assert thresholds[:2].tolist() == pytest.approx([0.80, 0.70])
    assert thresholds[2].item() == -math.inf
    assert apply_thresholds(HAND, thresholds).tolist() == [0, 2, 0, 2, 1, 1, 2, 2]


def test_thresholds_hit_target_fractions_exactly_on_validation() -> None:
    gen = torch.Generator().manual_seed(0)
    n, e = 1000, 5
    scores = torch.rand(e, n, generator=gen, dtype=torch.float64)  # continuous: no ties
    for p in (1, 5, 10, 17, 20, 31, 39):
        q = geometric_exit_distribution(p, e)
        counts = torch.bincount(apply_thresholds(scores, fit_budgeted_thresholds(scores, q)), minlength=e)
        target = [math.floor(round(n * q[k].item(), 6)) for k in range(e - 1)]  # floor(N q_k) of ALL N
        assert counts[:-1].tolist() == target, f"p={p}"
        assert counts[-1].item() == n - sum(target)  # the last exit takes the rest


def test_thresholds_edge_cases() -> None:
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.1], [0.2, 0.3, 0.4, 0.5]], dtype=torch.float64)
    # Ties at the threshold all leave: 2 targeted, 3 tied at .5 leave together.
    tied = fit_budgeted_thresholds(scores, torch.tensor([0.5, 0.5]))
    assert apply_thresholds(scores, tied).tolist() == [0, 0, 0, 1]
    # floor(4 · .2) = 0: nobody leaves at exit 0 (threshold +inf).
    none = fit_budgeted_thresholds(scores, torch.tensor([0.2, 0.8]))
    assert none[0].item() == math.inf and apply_thresholds(scores, none).tolist() == [1, 1, 1, 1]
    # One exit: it takes everything.
    assert fit_budgeted_thresholds(scores[:1], torch.tensor([1.0])).tolist() == [-math.inf]
    # q exactly representable: 8 · .25 = 2 must not round down to 1.
    exits = apply_thresholds(HAND, fit_budgeted_thresholds(HAND, torch.tensor([0.25, 0.25, 0.5])))
    assert torch.bincount(exits, minlength=3).tolist() == [2, 2, 4]
    # p = 40, E = 4: q = (2, 4, 8, 16) / 30; with N = 15, N·q = (1, 2, 4, 8) exactly, but in floats
    # 15 · q_2 = 3.999999999999999: the fit must still send 4 samples to exit 2.
    scores15 = torch.rand(4, 15, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    exits = apply_thresholds(scores15, fit_budgeted_thresholds(scores15, geometric_exit_distribution(40, 4)))
    assert torch.bincount(exits, minlength=4).tolist() == [1, 2, 4, 8]


def test_apply_thresholds_first_passing_exit_and_last_always() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.1], [0.8, 0.9, 0.1], [0.9, 0.9, 0.0]], dtype=torch.float64)
    thresholds = torch.tensor([0.5, 0.5, 0.95])  # the last threshold is ignored: the head takes the rest
    assert apply_thresholds(scores, thresholds).tolist() == [1, 0, 2]


def _toy_model(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Three exits that see the label ever more clearly (later = more accurate and more confident)."""
    labels = torch.randint(0, 5, (n,), generator=gen)
    signal = torch.nn.functional.one_hot(labels, 5).double()  # [N, C]
    logits = torch.stack(
        [s * signal + torch.randn(n, 5, generator=gen, dtype=torch.float64) for s in (0.5, 1.5, 3.0)]
    )  # [E, N, C]
    return logits, labels


def _loop_evaluate(logits: torch.Tensor, labels: torch.Tensor, thresholds: list[float]) -> tuple[float, list[int]]:
    """Independent per-sample loop (the protocol as written in MSDNet's code)."""
    conf = logits.softmax(2).amax(2)
    e, n, _ = logits.shape
    correct, counts = 0, [0] * e
    for i in range(n):
        for k in range(e):
            if k == e - 1 or conf[k, i].item() >= thresholds[k]:
                correct += int(logits[k, i].argmax().item() == labels[i].item())
                counts[k] += 1
                break
    return correct / n, counts


def test_budgeted_curve_end_to_end() -> None:
    gen = torch.Generator().manual_seed(1)
    val_logits, _ = _toy_model(2000, gen)  # validation needs no labels
    test_logits, test_labels = _toy_model(3000, gen)
    costs = [1.0, 2.5, 4.0]
    points = budgeted_curve(val_logits, test_logits, test_labels, costs, ps=[1, 10, 20, 39])
    assert [pt.p for pt in points] == [1.0, 10.0, 20.0, 39.0]
    for pt in points:
        acc, counts = _loop_evaluate(test_logits, test_labels, list(pt.thresholds))
        assert pt.accuracy == pytest.approx(acc)
        assert list(pt.exit_fractions) == pytest.approx([c / 3000 for c in counts])
        assert pt.cost == pytest.approx(sum(c / 3000 * cost for c, cost in zip(counts, costs, strict=True)))
        assert pt.thresholds[-1] == -math.inf
    # More budget, more cost and (here, with later exits better) more accuracy.
    assert points[0].cost < points[-1].cost and points[0].accuracy < points[-1].accuracy
    # Test fractions follow the validation targets up to sampling noise.
    q = geometric_exit_distribution(10, 3)
    assert list(points[1].exit_fractions) == pytest.approx(q.tolist(), abs=0.05)


def test_budgeted_curve_on_validation_hits_targets_exactly() -> None:
    gen = torch.Generator().manual_seed(2)
    logits, labels = _toy_model(1500, gen)
    for score in ("max_probability", "negative_entropy", "margin", lambda x: x.amax(-1)):
        for pt in budgeted_curve(logits, logits, labels, C3, score=score, ps=range(1, 40, 6)):
            q = geometric_exit_distribution(pt.p, 3)
            target = [math.floor(round(1500 * q[k].item(), 6)) / 1500 for k in range(2)]
            assert list(pt.exit_fractions[:2]) == pytest.approx(target, abs=1e-12)


# ------------------------------------------------------------------------------------------ bad input
S = torch.rand(3, 10, dtype=torch.float64)
Q = torch.tensor([0.2, 0.3, 0.5])
LV, LT, YT = torch.zeros(3, 4, 5), torch.zeros(3, 6, 5), torch.zeros(6, dtype=torch.long)
C3 = [1.0, 2.0, 3.0]  # exit costs
BAD_INPUTS = [
    ("margin one class", lambda: margin(torch.zeros(2, 1)), EexitValueError),
    ("int logits", lambda: max_probability(torch.zeros(2, 3, dtype=torch.long)), EexitTypeError),
    ("no classes", lambda: max_probability(torch.zeros(2, 0)), EexitValueError),
    ("logits not tensor", lambda: negative_entropy([[0.0, 1.0]]), EexitTypeError),
    ("p <= 0", lambda: geometric_exit_distribution(0, 3), EexitValueError),
    ("base <= 0", lambda: geometric_exit_distribution(1, 3, base=-20), EexitValueError),
    ("p NaN", lambda: geometric_exit_distribution(math.nan, 3), EexitValueError),
    ("num_exits 0", lambda: geometric_exit_distribution(1, 0), EexitValueError),
    ("scores 1-D", lambda: fit_budgeted_thresholds(S[0], Q), EexitValueError),
    ("scores empty", lambda: fit_budgeted_thresholds(torch.zeros(3, 0), Q), EexitValueError),
    ("scores NaN", lambda: fit_budgeted_thresholds(torch.full((3, 2), math.nan), Q), EexitValueError),
    ("q length", lambda: fit_budgeted_thresholds(S, Q[:2]), EexitValueError),
    ("q negative", lambda: fit_budgeted_thresholds(S, torch.tensor([-0.2, 0.7, 0.5])), EexitValueError),
    ("q sum", lambda: fit_budgeted_thresholds(S, torch.tensor([0.2, 0.3, 0.4])), EexitValueError),
    ("thresholds length", lambda: apply_thresholds(S, torch.tensor([0.5, 0.5])), EexitValueError),
    ("thresholds NaN", lambda: apply_thresholds(S, torch.tensor([0.5, math.nan, 0.0])), EexitValueError),
    ("curve E mismatch", lambda: budgeted_curve(LV[:2], LT, YT, C3), EexitValueError),
    ("curve C mismatch", lambda: budgeted_curve(LV[..., :4], LT, YT, C3), EexitValueError),
    ("curve labels", lambda: budgeted_curve(LV, LT, YT[:5], C3), EexitValueError),
    ("curve label range", lambda: budgeted_curve(LV, LT, YT + 5, C3), EexitValueError),
    ("curve costs", lambda: budgeted_curve(LV, LT, YT, [1.0, 2.0]), EexitValueError),
    ("curve score name", lambda: budgeted_curve(LV, LT, YT, C3, score="entropy"), EexitValueError),
    ("curve score type", lambda: budgeted_curve(LV, LT, YT, C3, score=3), EexitTypeError),
    ("curve no ps", lambda: budgeted_curve(LV, LT, YT, C3, ps=[]), EexitValueError),
    ("curve empty val", lambda: budgeted_curve(LV[:, :0], LT, YT, C3), EexitValueError),
]


@pytest.mark.parametrize(("case", "call", "error"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_teaching_error(case: str, call, error: type[EexitError]) -> None:
    with pytest.raises(error) as info:
        call()
    msg = str(info.value)
    assert "expected" in msg and "got" in msg, f"{case}: message should say what was expected and what came"
