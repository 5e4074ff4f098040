"""Gate kinds (issue 8): the consistent hazard gates (default) next to the paper's additive gates."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_timm_vit
from torch.utils.data import DataLoader, TensorDataset

import eexit
from eexit.config import FORMAT_VERSION, GATE_FEATURES, HISTORY_FEATURES, ExitConfig, FitConfig
from eexit.data import FeatureCache
from eexit.errors import EexitValueError
from eexit.gate_fit import GateProblem, fit_gates_exact
from eexit.gates import ExitHistory, exit_probabilities, gate_statistics, hazard_exit_probabilities
from eexit.inference import GatePolicy, decide_exits
from eexit.objective import hazard_targets, optimal_exit, task_pos_weights
from eexit.sweep import budget_threshold, outputs_from_cache


# ---------------------------------------------------------------------------------------------- the model
def test_hazard_model_is_a_distribution_whose_conditional_is_the_gate():
    h = torch.rand(5, 50)
    p = hazard_exit_probabilities(h)  # [6, 50]
    assert torch.allclose(p.sum(0), torch.ones(50), atol=1e-6) and bool((p >= 0).all())
    survive = torch.cumprod(torch.cat([torch.ones(1, 50), 1 - h]), 0)  # P(G >= l)
    assert torch.allclose(p[:-1] / survive[:-1], h, atol=1e-6)  # P(G=l)/P(G>=l) = h_l: the rule reads h_l
    assert torch.allclose(exit_probabilities(h, "hazard"), p)
    # the paper's additive model forces everyone out once Σ g reaches 1; the product model never does
    g = torch.full((5, 1), 0.5)
    assert exit_probabilities(g, "paper")[2:].sum() == 0
    assert hazard_exit_probabilities(g)[-1].item() == pytest.approx(0.5**5)


def test_hazard_targets_fire_first_at_the_best_exit():
    costs = torch.tensor([[1.0, 0.2, 0.9], [0.5, 0.3, 0.1], [0.7, 0.1, 0.1], [0.4, 0.4, 0.5]])  # [E=4, B=3]
    targets = hazard_targets(costs)
    assert targets[:, 0].tolist() == [0.0, 0.0, 0.0]  # costs 1, .5, .7, .4: only the last exit is best
    assert targets[:, 1].tolist() == [0.0, 0.0, 1.0]  # .2, .3, .1, .4: exit 2 beats what is left after it
    assert targets[:, 2].tolist() == [0.0, 1.0, 1.0]  # .9, .1, .1, .5: the tie at exit 1 goes to the earlier exit
    first = torch.where(targets.any(0), targets.argmax(0), torch.full((3,), 3))
    assert torch.equal(first, optimal_exit(costs))
    assert hazard_targets(costs[:1]).shape == (0, 3)


def test_task_pos_weights_count_each_gates_own_targets():
    targets = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    assert task_pos_weights(targets, cap=10).tolist() == pytest.approx([3.0, 1 / 3])
    assert task_pos_weights(targets, cap=2).tolist() == pytest.approx([2.0, 0.5])


def test_history_features_read_agreement_across_exits():
    a = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])  # argmax 0, 1
    b = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0]])  # argmax 0, 0
    c = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # argmax 0, 0
    names = ("agree_prev", "agree_run", "prev_max_prob", "kl_prev")
    assert gate_statistics(a, names).abs().sum() == 0  # nothing before the first exit
    h1 = ExitHistory().after(a)
    s_b = gate_statistics(b, names, h1)
    assert s_b[:, 0].tolist() == [1.0, 0.0] and s_b[:, 1].tolist() == [1.0, 0.0]
    assert s_b[0, 2].item() == pytest.approx(torch.softmax(a[0], 0).max().item())
    assert bool((s_b[:, 3] >= 0).all()) and s_b[1, 3] > s_b[0, 3]  # disagreement is far in KL
    s_c = gate_statistics(c, names, h1.after(b))
    assert s_c[:, 1].tolist() == [2.0, 1.0]  # sample 0 agreed twice in a row, sample 1 once
    assert h1.after(b).select(torch.tensor([1])).run.tolist() == [0.0]


# ---------------------------------------------------------------------------------------------- configs
def test_exit_config_gate_kinds_and_their_features():
    assert ExitConfig().gates == "hazard" and ExitConfig().gate_features == GATE_FEATURES + HISTORY_FEATURES
    assert ExitConfig(gates="paper").gate_features == GATE_FEATURES
    with pytest.raises(EexitValueError, match="gates='cdf' is not allowed"):
        ExitConfig(gates="cdf")
    with pytest.raises(EexitValueError, match="gate_features entry"):
        ExitConfig(gate_features=("max_prob", "vibes"))
    for tau in (0.0, 1.5, -0.1, math.nan):
        with pytest.raises(EexitValueError, match="threshold"):
            ExitConfig(threshold=tau)
    # a file written before gate kinds existed has paper gates, and reads back as them
    old = {k: v for k, v in ExitConfig(gates="paper").to_dict().items() if k != "gates"}
    old["format_version"] = 1
    assert ExitConfig.from_dict(old).gates == "paper"
    assert ExitConfig().to_dict()["format_version"] == FORMAT_VERSION == 2


def test_fit_config_resolves_auto_by_gate_kind():
    hazard, paper = FitConfig().resolved("hazard"), FitConfig().resolved("paper")
    assert (hazard.gate_fit, hazard.gate_data, hazard.pos_weight, hazard.im_weighting) == (
        "exact",
        "val",
        "none",
        "mixed",
    )
    assert (paper.gate_fit, paper.gate_data, paper.pos_weight, paper.im_weighting) == ("sgd", "train", "paper", "gate")
    assert FitConfig(gate_fit="sgd").resolved("hazard").gate_fit == "sgd"  # explicit choices stay
    for bad in (dict(gate_fit="newton"), dict(gate_data="test"), dict(pos_weight="yes"), dict(im_mix=1.5)):
        with pytest.raises(EexitValueError):
            FitConfig(**bad)


def test_gate_policy_checks_its_inputs_and_the_model_refuses_a_mismatch():
    with pytest.raises(EexitValueError, match="threshold"):
        GatePolicy(0.0)
    with pytest.raises(EexitValueError, match="gate kind"):
        GatePolicy(0.5, "cdf")
    ee = eexit.attach(tiny_timm_vit())
    with pytest.raises(EexitValueError, match=r"misread.*default_policy"):
        ee(torch.randn(2, 3, 32, 32), policy=GatePolicy(0.5, "paper"))
    assert ee.default_policy(0.3).gates == "hazard" and ee.default_policy().threshold == ee.config.threshold


def test_hazard_rule_exits_at_the_first_gate_above_tau():
    gate_logits = torch.logit(torch.tensor([[0.2, 0.7], [0.6, 0.1], [0.9, 0.9]]))  # [E-1=3, B=2]
    logits = torch.zeros(4, 2, 3)
    assert decide_exits(logits, gate_logits, GatePolicy(0.5, "hazard")).tolist() == [1, 0]
    assert decide_exits(logits, gate_logits, GatePolicy(0.65, "hazard")).tolist() == [2, 0]
    assert decide_exits(logits, gate_logits, GatePolicy(0.95, "hazard")).tolist() == [3, 3]


# ---------------------------------------------------------------------------------------------- the exact solver
def test_exact_solver_finds_the_gate_loss_optimum():
    torch.manual_seed(0)
    ee = eexit.attach(tiny_timm_vit(), config=ExitConfig(gates="paper", gate_features=("max_prob", "entropy")))
    n, f = 4000, 2
    x = torch.randn(ee.num_exits - 1, n, f, dtype=torch.float64) * torch.tensor([0.1, 3.0], dtype=torch.float64) + 2.0
    true = torch.tensor([4.0, -0.5], dtype=torch.float64)
    best = torch.bernoulli(torch.sigmoid(x[0] @ true - 8.0)).long()  # l* in {0, 1}: gate 0 should learn `true`
    costs = torch.ones(ee.num_exits, n, dtype=torch.float64)
    costs[0] = 1.0 - best.double()  # exit 0 is best where best == 1, else exit 1
    costs[1] = 0.5
    fit_gates_exact(ee, GateProblem(x, costs), FitConfig(pos_weight="none").resolved("paper"))
    w = ee.gates[0].linear.weight.detach().double().squeeze(0)
    assert w.tolist() == pytest.approx(true.tolist(), abs=0.5)  # raw-scale weights, standardisation folded in

    def loss(weight: torch.Tensor, bias: float) -> float:
        targets = (best == 1).double()
        return float(torch.nn.functional.binary_cross_entropy_with_logits(x[0] @ weight + bias, targets))

    b = ee.gates[0].linear.bias.detach().item()
    optimum = loss(w, b)
    for dw in ([0.05, 0], [0, 0.05], [-0.05, 0], [0, -0.05]):
        assert loss(w + torch.tensor(dw, dtype=torch.float64), b) >= optimum - 1e-6
    assert loss(w, b + 0.05) >= optimum - 1e-6 and loss(w, b - 0.05) >= optimum - 1e-6


# ---------------------------------------------------------------------------------------------- end to end
def _data(seed: int, n: int = 192) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 5, (n,), generator=g)
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.5
    x[torch.arange(n), y % 3, :8, :8] += 2.0  # a learnable signal of varying strength
    return TensorDataset(x, y)


def test_default_fit_solves_gates_and_budget_mode_spans_the_cost_range():
    torch.manual_seed(0)
    ee = eexit.attach(tiny_timm_vit())
    train, val = DataLoader(_data(0), batch_size=32), DataLoader(_data(1), batch_size=32)
    history = eexit.fit(ee, train, val, lam=0.1, epochs=3, warmup_epochs=1, progress=False, optimizer="adamw", lr=1e-2)
    assert ee.fit_config.gate_fit == "exact" and ee.fit_config.gate_data == "val"
    assert all("gate_loss" in h for h in history) and not any("gate_batches" in h for h in history)
    cache = FeatureCache.collect(ee, val, "val", progress=False)
    out = outputs_from_cache(ee, cache)
    fractions = ee.cost_table.fraction_of_backbone()
    costs = torch.tensor(fractions)
    for target in (fractions[0] + 0.02, 0.5, 0.95):  # no ceiling: τ reaches the costly end too
        tau = budget_threshold(ee, out, target)
        spent = float(costs[decide_exits(out.logits, out.gate_logits, ee.default_policy(tau))].mean())
        assert spent <= target + 1e-6 and spent >= target - 0.1, (target, spent)
    with pytest.raises(EexitValueError, match="outside what exits can spend"):
        budget_threshold(ee, out, 1.5)


def test_paper_gates_stay_exactly_as_before_and_round_trip(tmp_path):
    torch.manual_seed(0)
    ee = eexit.attach(tiny_timm_vit(), config=ExitConfig(gates="paper"))
    train, val = DataLoader(_data(0), batch_size=32), DataLoader(_data(1), batch_size=32)
    eexit.fit(ee, train, val, lam=0.1, epochs=2, warmup_epochs=1, phase_batches=2, progress=False)
    assert (ee.fit_config.gate_fit, ee.fit_config.pos_weight) == ("sgd", "paper")
    assert ee.gates[0].linear.in_features == len(GATE_FEATURES) and not ee.uses_history
    ee.save_pretrained(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "eexit_config.json").read_text())
    assert meta["exit_config"]["gates"] == "paper"
    x = _data(2, 16).tensors[0]
    with torch.no_grad():
        expected = ee(x)
    backbone = ee.detach()
    again = eexit.from_pretrained(backbone, tmp_path / "a")
    assert again.config.gates == "paper"
    with torch.no_grad():
        got = again(x)
    assert torch.equal(got.exit_index, expected.exit_index)


def test_hazard_adapter_round_trips_with_history_gates(tmp_path):
    torch.manual_seed(0)
    ee = eexit.attach(tiny_timm_vit())
    eexit.fit(ee, DataLoader(_data(0), batch_size=32), DataLoader(_data(1), batch_size=32), lam=0.05, epochs=2,
              warmup_epochs=1, progress=False)  # fmt: skip
    ee.save_pretrained(tmp_path / "h")
    x = _data(3, 24).tensors[0]
    with torch.no_grad():
        expected, full = ee(x), ee(x, all_exits=True)
    assert torch.equal(expected.exit_index, decide_exits(full.logits, full.gate_logits, ee.default_policy()))
    again = eexit.from_pretrained(ee.detach(), tmp_path / "h")
    assert again.config.gates == "hazard" and again.uses_history
    with torch.no_grad():
        assert torch.equal(again(x).exit_index, expected.exit_index)


def test_attach_with_another_gate_kind_takes_that_kinds_default_features():
    ee = eexit.attach(tiny_timm_vit(), gates="paper")
    assert ee.config.gate_features == GATE_FEATURES and not ee.uses_history
    custom = ExitConfig(gate_features=("max_prob",))
    assert eexit.attach(tiny_timm_vit(), custom, gates="paper").config.gate_features == ("max_prob",)
