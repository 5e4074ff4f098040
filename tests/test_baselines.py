"""BoostedNet and L2W-DEN: hand-checked arithmetic, training on cached features, real early exit."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import IMG, tiny_timm_vit
from torch.utils.data import DataLoader, TensorDataset

import eexit
from eexit.baselines import (
    BoostedNet,
    apply_thresholds,
    boosted_logits,
    budgeted_curve,
    geometric_exit_distribution,
    l2w_weights,
    max_probability,
    train_boosted,
    train_l2w,
)
from eexit.baselines._common import TrainSettings
from eexit.baselines.boosted import boosted_loss
from eexit.baselines.l2w import WeightNet, meta_loss, meta_step, threshold_assignment
from eexit.data import FeatureCache
from eexit.errors import AdapterError, EexitValueError
from eexit.evaluation import collect_outputs
from eexit.inference import ThresholdPolicy

TRAIN = dict(epochs=2, lr=0.02)


def fresh_backbone(ee):
    """A new backbone with ``ee``'s weights (what loading an adapter starts from)."""
    model = tiny_timm_vit()
    model.load_state_dict(ee.backbone.state_dict())
    return model


def _loader(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 5, (n,), generator=g)
    x = torch.randn(n, 3, IMG, IMG, generator=g) * 0.5 + (y.float() - 2).view(-1, 1, 1, 1)
    return DataLoader(TensorDataset(x, y), batch_size=32)


# ---------------------------------------------------------------------------------------------- BoostedNet
def test_boosted_ensemble_arithmetic():
    f = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[2.0, 2.0]]])  # [E=3, N=1, C=2]
    out = boosted_logits(f, 0.5)
    # F0 = f0; F1 = f1 + 0.5·F0 = [0.5, 1]; F2 = f2 + 0.5·F1 = [2.25, 2.5]
    assert out[:, 0].tolist() == [[1.0, 0.0], [0.5, 1.0], [2.25, 2.5]]
    kept = boosted_logits(f, 0.5, boost_last=False)
    assert kept[2, 0].tolist() == [2.0, 2.0] and kept[1, 0].tolist() == [0.5, 1.0]
    assert torch.equal(boosted_logits(f, 0.0), f)
    with pytest.raises(EexitValueError, match="gamma"):
        boosted_logits(f, -0.1)
    with pytest.raises(EexitValueError, match=r"\[E, N, C\]"):
        boosted_logits(f[0], 0.5)


def test_boosted_loss_stops_the_gradient_into_earlier_exits():
    f = torch.randn(3, 4, 5, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    boosted_loss(f, y, 0.5, num_trained=3).backward()
    alone = torch.randn(4, 5).copy_(f[0].detach()).requires_grad_(True)
    F.cross_entropy(alone, y).backward()
    assert torch.allclose(f.grad[0], alone.grad), "exit 0 learns only from its own term"
    # exit 1's term is CE(f1 + 0.5·stopgrad(f0))
    f1 = f[1].detach().clone().requires_grad_(True)
    F.cross_entropy(f1 + 0.5 * f[0].detach(), y).backward()
    assert torch.allclose(f.grad[1], f1.grad)


@pytest.mark.parametrize("headless", [False, True])
def test_boosted_early_exit_equals_evaluation(headless):
    torch.manual_seed(0)
    backbone = tiny_timm_vit(num_classes=0) if headless else tiny_timm_vit()
    ee = eexit.attach(backbone, **({"num_classes": 5} if headless else {}))
    train, val = _loader(64, 0), _loader(64, 1)
    net = train_boosted(ee, train, val, gamma=0.5, **TRAIN)
    assert net.boost_last == headless and len(net.history) == 2
    x = torch.cat([b[0] for b in val])
    with torch.no_grad():
        ensemble = net.logits(ee(x, all_exits=True).logits)  # [E, N, C]
    scores = max_probability(ensemble)  # [E, N]
    # thresholds half-way between neighbouring scores, so no sample sits on a boundary
    thresholds = []
    for k in range(ee.num_exits - 1):
        s = scores[k].sort().values
        mid = len(s) * (k + 1) // (ee.num_exits + 1)
        thresholds.append(float((s[mid] + s[mid + 1]) / 2))
    expected_exit = apply_thresholds(scores, torch.tensor([*thresholds, float("-inf")], dtype=torch.float64))
    out = net.forward(x, thresholds)
    assert torch.equal(out.exit_index, expected_exit)
    assert len(out.exit_index.unique()) >= 2
    expected_logits = ensemble[expected_exit, torch.arange(len(x))]
    assert torch.allclose(out.logits, expected_logits, atol=1e-5, rtol=1e-4)


def test_boosted_curve_uses_ensemble_logits():
    ee = eexit.attach(tiny_timm_vit())
    train, val, test = _loader(64, 0), _loader(48, 1), _loader(48, 2)
    net = train_boosted(ee, train, val, **TRAIN)
    v, t = collect_outputs(ee, val), collect_outputs(ee, test)
    curve = budgeted_curve(net.logits(v.logits), net.logits(t.logits), t.labels, ee.cost_table.exit_flops, ps=[5, 40])
    assert len(curve) == 2 and curve[0].cost < curve[1].cost


def test_boosted_settings_are_saved_with_the_adapter(tmp_path):
    ee = eexit.attach(tiny_timm_vit())
    with pytest.raises(EexitValueError, match="not trained as a BoostedNet"):
        BoostedNet.from_model(ee)
    net = train_boosted(ee, _loader(64, 0), _loader(48, 1), gamma=0.3, **TRAIN)
    x = torch.cat([b[0] for b in _loader(48, 2)])
    with torch.no_grad():
        expected = net.forward(x, [0.6] * (ee.num_exits - 1))
    path = ee.save_pretrained(tmp_path / "boosted")
    assert json.loads((path / "eexit_config.json").read_text())["boosted"] == {"gamma": 0.3, "boost_head": False}
    loaded = eexit.from_pretrained(fresh_backbone(ee), path)
    again = BoostedNet.from_model(loaded)  # γ came back from the file: same ensemble, same exits
    assert again.gamma == 0.3 and not again.boost_head
    with torch.no_grad():
        out = again.forward(x, [0.6] * (ee.num_exits - 1))
    assert torch.equal(out.exit_index, expected.exit_index) and torch.allclose(out.logits, expected.logits, atol=1e-6)
    loaded.add_adapter("copy")
    eexit.fit(loaded, _loader(64, 0), _loader(48, 1), lam=0.1, epochs=1, warmup_epochs=1, progress=False)
    assert loaded.boosted is None  # retrained by fit: no longer an ensemble
    loaded.set_adapter("copy")
    assert loaded.boosted == {"gamma": 0.3, "boost_head": False}  # each adapter keeps its own
    config = json.loads((path / "eexit_config.json").read_text())
    config["boosted"] = {"gamma": -1}
    (path / "eexit_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="boosted must be"):
        eexit.from_pretrained(fresh_backbone(ee), path)


def test_boosted_rejects_bad_input():
    ee = eexit.attach(tiny_timm_vit())
    train, val = _loader(32, 0), _loader(32, 1)
    with pytest.raises(EexitValueError, match="gamma"):
        train_boosted(ee, train, val, gamma=float("nan"))
    with pytest.raises(EexitValueError, match="epochs"):
        train_boosted(ee, train, val, epochs=0)
    with pytest.raises(EexitValueError, match="empty"):
        train_boosted(ee, [], val)
    x = torch.randn(4, 3, IMG, IMG)
    with pytest.raises(EexitValueError, match=r"\[0, 5\)"):
        train_boosted(ee, [(x, torch.tensor([0, 1, 9, 2]))], val)
    with pytest.raises(EexitValueError, match="thresholds"):
        train_boosted(ee, train, val, epochs=1).forward(x, [0.5])


# ------------------------------------------------------------------------------------------------ L2W-DEN
def test_l2w_weights_average_one_per_sample():
    raw = torch.tensor([[1.0, -1.0, 0.0], [0.5, 0.5, 0.5]])
    w = l2w_weights(raw, 0.3)
    assert torch.allclose(w, torch.tensor([[1.3, 0.7, 1.0], [1.0, 1.0, 1.0]]))
    assert torch.allclose(w.mean(1), torch.ones(2))
    out = l2w_weights(WeightNet(4, hidden=8)(torch.rand(16, 4) * 5), 0.3)
    assert torch.allclose(out.mean(1), torch.ones(16)) and bool(((out - 1).abs() <= 0.6).all())


def test_threshold_assignment_fills_exits_in_order():
    confidence = torch.tensor([[0.9, 0.1, 0.8, 0.2], [0.5, 0.9, 0.5, 0.1], [0.0, 0.0, 0.0, 0.0]])
    q = torch.tensor([0.5, 0.25, 0.25])
    # exit 0 takes the 2 most confident (samples 0, 2); exit 1 the most confident left (1); the rest (3) go last
    assert threshold_assignment(confidence, q).tolist() == [0, 1, 0, 2]
    logits = torch.log(confidence.clamp(min=1e-3)).unsqueeze(-1).expand(3, 4, 2).contiguous()
    assert meta_loss(logits, torch.zeros(4, dtype=torch.long), q).item() == pytest.approx(3 * 0.6931, abs=1e-3)


def test_meta_step_changes_the_weight_net_not_the_ims():
    torch.manual_seed(0)
    ee = eexit.attach(tiny_timm_vit())
    cache = FeatureCache.collect(ee, _loader(32, 0), "train", progress=False)
    half = [f[:16] for f in cache.features], cache.final_logits[:16], cache.labels[:16]
    other = [f[16:] for f in cache.features], cache.final_logits[16:], cache.labels[16:]
    net = WeightNet(len(ee.heads), hidden=16)
    before = [p.detach().clone() for p in net.parameters()]
    heads = ee.adapter_state_dict()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    value = meta_step(ee, net, optimizer, half, other, virtual_lr=1.0, q=geometric_exit_distribution(15, 4))
    assert value > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert all(torch.equal(heads[k], v) for k, v in ee.adapter_state_dict().items())
    assert all(p.grad is None for p in ee.heads.parameters())


def test_train_l2w_learns_and_runs_meta_steps():
    torch.manual_seed(0)
    ee = eexit.attach(tiny_timm_vit())
    train, val = _loader(64, 0), _loader(48, 1)
    x, y = next(iter(val))
    with torch.no_grad():
        before = F.cross_entropy(ee(x, all_exits=True).logits[0], y)
    result = train_l2w(ee, train, val, meta_interval=1, hidden=32, epochs=3, lr=0.05, batch_size=32)
    with torch.no_grad():
        after = F.cross_entropy(ee(x, all_exits=True).logits[0], y)
    assert after < before
    assert len(result.meta_losses) == 2 * 3 * 2, "two halves per meta step, 2 batches in each of 3 epochs"
    assert len(ee.history) == 3 and ee.fit_config is None
    # L2W-DEN predicts with plain thresholds on the IMs: the early exit is the usual ThresholdPolicy
    out = ee(x, policy=ThresholdPolicy([0.5] * (ee.num_exits - 1)))
    assert out.exit_index.shape == (len(x),)


def test_l2w_rejects_bad_input():
    ee = eexit.attach(tiny_timm_vit())
    train, val = _loader(32, 0), _loader(32, 1)
    with pytest.raises(EexitValueError, match="meta_interval"):
        train_l2w(ee, train, val, meta_interval=0)
    with pytest.raises(EexitValueError, match="epsilon"):
        train_l2w(ee, train, val, epsilon=0.9)
    with pytest.raises(EexitValueError, match="min_lr"):
        TrainSettings(lr=1e-3, min_lr=1e-2)
    with pytest.raises(EexitValueError, match="empty"):
        train_l2w(ee, train, [])
