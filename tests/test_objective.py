"""The JEI-DNN objective and gate model against hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from eexit.gates import Gate, conditional_exit_probability, exit_probabilities, gate_statistics
from eexit.inference import GatePolicy, decide_exits
from eexit.objective import (
    depth_weights,
    exit_costs,
    gate_loss,
    gate_pos_weights,
    gate_targets,
    gate_weights,
    im_loss,
    optimal_exit,
    per_exit_ce,
    uniform_weights,
)


def test_exit_probabilities_hand_example():
    # g = (0.3, 0.5, 0.4): P1 = .3; P2 = min(.5, 1-.3) = .5; P3 = min(.4, 1-.8) = .2; P4 = 1 - 1.0 = 0
    g = torch.tensor([[0.3], [0.5], [0.4]])
    assert torch.allclose(exit_probabilities(g).squeeze(1), torch.tensor([0.3, 0.5, 0.2, 0.0]))
    # g = (0.1, 0.2): P = (.1, .2, .7)
    g = torch.tensor([[0.1], [0.2]])
    assert torch.allclose(exit_probabilities(g).squeeze(1), torch.tensor([0.1, 0.2, 0.7]))


def test_exit_probabilities_sum_to_one_and_non_negative():
    g = torch.rand(6, 100)
    p = exit_probabilities(g)
    assert p.shape == (7, 100)
    assert torch.all(p >= 0)
    assert torch.allclose(p.sum(0), torch.ones(100))


def test_conditional_probability_and_deterministic_rule():
    # g = (0.3, 0.5, 0.4): c1 = .3 (stay), c2 = .5/.7 = .714 (exit at exit 1 with threshold .5)
    g = torch.tensor([[0.3], [0.5], [0.4]])
    logits = torch.zeros(4, 1, 3)
    exit_index = decide_exits(logits, torch.logit(g), GatePolicy(0.5, "paper"))
    assert exit_index.tolist() == [1]
    assert exit_index.tolist() == decide_exits(logits, torch.logit(g), GatePolicy(0.7, "paper")).tolist()
    assert decide_exits(logits, torch.logit(g), GatePolicy(0.75, "paper")).tolist() == [2]  # c3 = .2/.2 = 1
    c2 = conditional_exit_probability(torch.tensor([0.5]), torch.tensor([0.3]), torch.tensor([0.3]))
    assert c2.item() == pytest.approx(0.5 / 0.7)
    # nothing left to exit with: must stop
    assert conditional_exit_probability(torch.tensor([0.2]), torch.tensor([1.0]), torch.tensor([1.0])).item() == 1.0


def test_gate_statistics_hand_example():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    stats = gate_statistics(logits)
    p = torch.tensor([0.5, 0.3, 0.2])
    q = p**2 / (p**2).sum()
    expected = [0.5, float(-(p * p.log()).sum()), 0.2, float(-(q * q.log()).sum())]
    assert torch.allclose(stats[0], torch.tensor(expected), atol=1e-6)


def test_gate_features_are_detached():
    head = torch.nn.Linear(4, 3)
    gate = Gate()
    gate(head(torch.randn(5, 4))).sum().backward()
    assert head.weight.grad is None
    assert gate.linear.weight.grad is not None


def test_costs_targets_and_best_exit():
    # 3 exits, 2 samples; IC = (.25, .5, 1), λ = 1
    ce = torch.tensor([[0.1, 2.0], [0.05, 1.0], [0.0, 0.2]])
    costs = exit_costs(ce, torch.tensor([0.25, 0.5, 1.0]), 1.0)
    assert torch.allclose(costs, torch.tensor([[0.35, 2.25], [0.55, 1.5], [1.0, 1.2]]))
    best = optimal_exit(costs)
    assert best.tolist() == [0, 2]
    assert gate_targets(best, 3).tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert gate_targets(torch.tensor([1]), 3).tolist() == [[0.0], [1.0]]


def test_pos_weights_hand_example():
    # N = 10; best exits: four at 0, one at 1, five at 2 (the last). r0 = 6/4, r1 = min(9/1, 5) = 5
    best = torch.tensor([0, 0, 0, 0, 1, 2, 2, 2, 2, 2])
    assert torch.allclose(gate_pos_weights(best, 3), torch.tensor([1.5, 5.0]))
    # an exit nobody prefers: n floored at 0.1 -> capped
    assert gate_pos_weights(torch.tensor([2, 2]), 3, cap=5.0).tolist() == [5.0, 5.0]
    # everyone's best exit is 0: the authors' r_0 = 0 would silence gate 0; bounded below by 1/cap
    assert gate_pos_weights(torch.zeros(8, dtype=torch.long), 3, cap=5.0).tolist() == pytest.approx([0.2, 5.0])


def test_gate_loss_weights_positives():
    logits = torch.zeros(1, 2)
    targets = torch.tensor([[1.0, 0.0]])
    plain = gate_loss(logits, targets)
    weighted = gate_loss(logits, targets, torch.tensor([3.0]))
    assert plain.item() == pytest.approx(math.log(2))
    assert weighted.item() == pytest.approx((3 * math.log(2) + math.log(2)) / 2)


def test_im_loss_weightings():
    logits = torch.randn(3, 4, 5, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3])
    ce = per_exit_ce(logits, labels)
    assert torch.allclose(ce[1], torch.nn.functional.cross_entropy(logits[1], labels, reduction="none"))
    uniform = im_loss(ce, uniform_weights(ce))
    assert uniform.item() == pytest.approx(ce.mean().item(), rel=1e-6)
    probs = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 1.0, 0], [0, 0, 0, 1.0]])
    gated = im_loss(ce, gate_weights(ce, probs))
    assert gated.item() == pytest.approx((ce[0, 0] + ce[1, 1] + ce[1, 2] + ce[2, 3]).item() / 4, rel=1e-6)
    w = depth_weights(ce)
    assert torch.allclose(w[:, 0], torch.tensor([3.0, 2.0, 1.0]) / 6)
    masked = im_loss(ce, uniform_weights(ce), torch.tensor([True, True, False]))
    assert masked.item() == pytest.approx(ce[:2].sum(0).mean().item() / 3, rel=1e-6)


def test_gate_weights_need_probabilities():
    with pytest.raises(ValueError):
        gate_weights(torch.zeros(2, 2), None)
