"""λ sweeps on features computed once, fit() on a FeatureCache, depth-priced IC, and budget mode."""

from __future__ import annotations

import itertools

import pytest
import torch
from backbone_zoo import spread_exits
from conftest import IMG, tiny_timm_vit
from torch.utils.data import DataLoader, TensorDataset

import eexit
from eexit.config import FitConfig
from eexit.data import FeatureCache
from eexit.errors import EexitTypeError, EexitValueError
from eexit.evaluation import collect_outputs, evaluate_outputs
from eexit.inference import GatePolicy, decide_exits
from eexit.objective import depth_ic
from eexit.sweep import budget_threshold, outputs_from_cache, sweep_lambda
from eexit.train import priced_ic

FIT = dict(epochs=3, warmup_epochs=1, phase_batches=2, lr=0.05, progress=False)


def _loader(n: int, seed: int, batch: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 5, (n,), generator=g)
    x = torch.randn(n, 3, IMG, IMG, generator=g) * 0.5 + (y.float() - 2).view(-1, 1, 1, 1)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def _count_backbone_calls(ee) -> list[int]:
    calls: list[int] = []
    ee.backbone.blocks[0].register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    return calls


def test_sweep_runs_the_backbone_once_and_stores_one_adapter_per_lambda():
    torch.manual_seed(0)
    ee = eexit.attach(tiny_timm_vit())
    train, val, test = _loader(64, 0), _loader(48, 1), _loader(40, 2)
    calls = _count_backbone_calls(ee)
    initial = ee.adapter_state_dict()
    result = sweep_lambda(ee, train, val, [0.0, 2.0], test_loader=test, **FIT)
    assert sum(calls) == 64 + 48 + 40, "each split goes through the backbone exactly once"
    assert ee.adapter_names == ["default", "lam_0", "lam_2"]
    assert ee.active_adapter == "default"
    assert all(torch.equal(initial[k], v) for k, v in ee.adapter_state_dict().items())
    assert [p.lam for p in result.points] == [0.0, 2.0]
    assert len(result.curve("test")) == 2 and len(result.curve("val")) == 2
    assert result.points[1].test.conformal["alpha"] == 0.1
    ee.set_adapter("lam_2")
    assert ee.fit_config.lam == 2.0 and ee.evaluation["num_samples"] == 40
    assert not all(torch.equal(initial[k], v) for k, v in ee.adapter_state_dict().items())


def test_sweep_equals_plain_fit_from_the_same_start():
    torch.manual_seed(0)
    ee = eexit.attach(tiny_timm_vit())
    train, val = _loader(64, 0), _loader(48, 1)
    initial = ee.adapter_state_dict()
    sweep_lambda(ee, train, val, [0.5], **FIT)
    eexit.fit(ee, train, val, lam=0.5, **FIT)
    plain = ee.adapter_state_dict()
    ee.load_adapter_state_dict(initial)
    ee.set_adapter("lam_0.5")
    swept = ee.adapter_state_dict()
    assert all(torch.allclose(plain[k], swept[k], atol=1e-6) for k in plain)


def test_fit_accepts_a_matching_feature_cache_only():
    ee = eexit.attach(tiny_timm_vit())
    train, val = _loader(64, 0), _loader(48, 1)
    cache = FeatureCache.collect(ee, train, "train", progress=False)
    eexit.fit(ee, cache, val, lam=0.1, **FIT)
    with pytest.raises(EexitValueError, match="frozen backbone"):
        eexit.fit(ee, cache, val, lam=0.1, train_backbone=True, **FIT)
    other = eexit.attach(tiny_timm_vit(embed_dim=16))
    with pytest.raises(EexitValueError, match="does not fit this model"):
        eexit.fit(other, cache, val, lam=0.1, **FIT)


def test_depth_priced_ic():
    assert depth_ic([1, 2, 4]).tolist() == [0.25, 0.5, 1.0]
    with pytest.raises(ValueError):
        depth_ic([2, 1])
    ee = eexit.attach(tiny_timm_vit())  # 4 blocks: IMs after blocks 0, 1, 2 and the head
    assert priced_ic(ee, FitConfig(ic="depth")).tolist() == [0.25, 0.5, 0.75, 1.0]
    assert torch.equal(priced_ic(ee, FitConfig()), ee.cost_table.ic)
    with pytest.raises(EexitValueError, match="ic="):
        FitConfig(ic="flops")
    # the depth price reaches the gate targets: at λ=50 every sample is best off at exit 0 either way
    history = eexit.fit(ee, _loader(64, 0), _loader(48, 1), lam=50.0, ic="depth", **FIT)
    assert ee.fit_config.ic == "depth" and len(history) == 3


def _gated_model():
    torch.manual_seed(0)
    ee = eexit.attach(tiny_timm_vit())
    x = torch.randn(96, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))
    spread_exits(ee, x)
    cache = FeatureCache.collect(ee, [(x, torch.zeros(96, dtype=torch.long))], "val", progress=False)
    return ee, cache, x


def _cost(ee, out, threshold: float) -> float:
    taken = decide_exits(out.logits, out.gate_logits, GatePolicy(threshold))
    return evaluate_outputs(ee, out, taken).cost_fraction


@pytest.mark.parametrize("target", [0.4, 0.55, 0.7, 0.9])
def test_budget_mode_meets_the_target_within_one_exit(target):
    ee, cache, x = _gated_model()
    out = outputs_from_cache(ee, cache)
    threshold = budget_threshold(ee, cache, target)
    spent = _cost(ee, out, threshold)
    fractions = ee.cost_table.fraction_of_backbone()
    step = max(b - a for a, b in itertools.pairwise(fractions))
    assert spent <= target + 1e-9
    assert target - spent <= step, "one exit's granularity"
    if threshold < 1.0:  # the next representable threshold up would overspend: the largest that fits
        above = torch.nextafter(torch.tensor(threshold), torch.tensor(2.0)).item()
        assert _cost(ee, out, above) > target or above > 1.0
    # the same threshold drives the real early exit on the same images, at the same cost
    with torch.no_grad():
        real = ee(x, policy=GatePolicy(threshold))
    assert real.cost.mean().item() / ee.cost_table.backbone_flops == pytest.approx(spent, abs=1e-9)


def test_budget_mode_rejects_budgets_out_of_range():
    ee, cache, _ = _gated_model()
    fractions = ee.cost_table.fraction_of_backbone()
    with pytest.raises(EexitValueError, match="outside what exits can spend"):
        budget_threshold(ee, cache, fractions[0] * 0.9)
    with pytest.raises(EexitValueError, match="outside what exits can spend"):
        budget_threshold(ee, cache, fractions[-1] + 0.01)
    with pytest.raises(EexitValueError, match="finite number"):
        budget_threshold(ee, cache, float("nan"))
    assert budget_threshold(ee, cache, fractions[-1]) == 1.0, "the whole budget: the highest threshold"
    lowest = budget_threshold(ee, cache, fractions[0])  # everyone at the first exit
    assert 0.0 < lowest < 1.0 and _cost(ee, outputs_from_cache(ee, cache), lowest) == pytest.approx(fractions[0])


def test_sweep_rejects_bad_input():
    ee = eexit.attach(tiny_timm_vit())
    train, val = _loader(32, 0), _loader(32, 1)
    with pytest.raises(EexitValueError, match="lams is empty"):
        sweep_lambda(ee, train, val, [], **FIT)
    with pytest.raises(EexitValueError, match=">= 0"):
        sweep_lambda(ee, train, val, [-1.0], **FIT)
    with pytest.raises(EexitValueError, match="alpha"):
        sweep_lambda(ee, train, val, [0.1], alpha=1.5, **FIT)
    with pytest.raises(EexitValueError, match="repeated"):
        sweep_lambda(ee, train, val, [0.1, 0.1], **FIT)
    with pytest.raises(EexitValueError, match="train_backbone"):
        sweep_lambda(ee, train, val, [0.1], train_backbone=True, **FIT)
    with pytest.raises(EexitValueError, match="empty"):
        sweep_lambda(ee, [], val, [0.1], **FIT)
    x = torch.randn(4, 3, IMG, IMG)
    with pytest.raises(EexitValueError, match=r"\[0, 5\)"):
        sweep_lambda(ee, [(x, torch.tensor([0, 1, 7, 2]))], val, [0.1], **FIT)
    assert ee.adapter_names == ["default"], "a refused sweep stores nothing"


def test_collect_outputs_is_one_path_for_loaders_caches_and_collected_outputs():
    ee, cache, x = _gated_model()
    from_cache = collect_outputs(ee, cache, batch_size=40)  # several cache batches
    from_loader = collect_outputs(ee, [(x[:50], cache.labels[:50]), (x[50:], cache.labels[50:])])
    torch.testing.assert_close(from_cache.logits, from_loader.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_cache.gate_logits, from_loader.gate_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(from_cache.labels, from_loader.labels)
    assert collect_outputs(ee, from_cache) is from_cache
    assert outputs_from_cache(ee, cache).logits.shape == from_cache.logits.shape  # the old name still works
    with pytest.raises(EexitValueError, match="empty"):
        collect_outputs(ee, [])
    with pytest.raises(EexitTypeError, match="val_loader must be a DataLoader"):
        budget_threshold(ee, 42, 0.5)


def test_evaluate_reports_without_changing_the_model():
    ee, cache, x = _gated_model()
    ee.evaluation = {"accuracy": 0.5}
    report = eexit.evaluate(ee, [(x, cache.labels)], policy=GatePolicy(0.9))
    assert ee.evaluation == {"accuracy": 0.5}, "evaluate must not overwrite the adapter's stored evaluation"
    assert report.num_samples == 96 and 0.0 < report.cost_fraction <= 1.0
