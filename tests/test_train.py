"""fit(): JEI-DNN training runs, learns, and refuses bad input without losing the last good state."""

from __future__ import annotations

import pytest
import torch
from conftest import IMG, tiny_timm_vit
from torch.utils.data import DataLoader, TensorDataset

import eexit
from eexit.config import FitConfig
from eexit.errors import EexitValueError, TrainingError
from eexit.train import Phase, phase_at


def _separable_data(n: int = 96, seed: int = 0) -> TensorDataset:
    # The class is written in the mean colour of the image: easy for every exit.
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 5, (n,), generator=g)
    x = torch.randn(n, 3, IMG, IMG, generator=g) * 0.5 + (y.float() - 2).view(-1, 1, 1, 1)
    return TensorDataset(x, y)


def _loaders(n: int = 96):
    return DataLoader(_separable_data(n), batch_size=32, shuffle=True), DataLoader(
        _separable_data(64, 1), batch_size=32
    )


def test_phase_schedule():
    config = FitConfig(epochs=5, warmup_epochs=2, phase_batches=3)
    assert phase_at(0, 0, config) is Phase.WARMUP
    assert phase_at(1, 99, config) is Phase.WARMUP
    assert [phase_at(2, s, config) for s in range(7)] == [Phase.GATE] * 3 + [Phase.IM] * 3 + [Phase.GATE]


@pytest.mark.parametrize("im_weighting", ["gate", "uniform"])
@pytest.mark.parametrize("cache", [True, False])
def test_fit_learns(im_weighting, cache):
    torch.manual_seed(0)
    ee = eexit.attach(tiny_timm_vit())
    train, val = _loaders()
    x, y = next(iter(val))
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(ee(x, all_exits=True).logits[0], y)
    gates_before = ee.gates[0].linear.weight.detach().clone()
    history = eexit.fit(
        ee,
        train,
        val,
        lam=0.1,
        epochs=8,
        warmup_epochs=2,
        phase_batches=2,
        lr=0.05,
        im_weighting=im_weighting,
        cache_features=cache,
        select="last",
        progress=False,
    )
    with torch.no_grad():
        after = torch.nn.functional.cross_entropy(ee(x, all_exits=True).logits[0], y)
    assert after < before
    assert len(history) == 8 and ee.history == history
    assert history[-1]["val_objective"] < history[2]["val_objective"]
    assert sum("gate_loss" in h for h in history) >= 2
    assert not torch.equal(gates_before, ee.gates[0].linear.weight)
    assert any("im_loss" in h for h in history[2:])
    assert ee.fit_config.lam == 0.1 and not ee.training
    assert not any(p.requires_grad for p in ee.backbone.parameters())


def test_larger_lambda_exits_earlier():
    torch.manual_seed(0)
    ee = eexit.attach(tiny_timm_vit())
    train, val = _loaders(160)
    x = torch.cat([b[0] for b in val])
    costs = []
    for lam in (0.0, 50.0):  # at λ = 50 cost dominates CE: every sample is best off at exit 0
        eexit.fit(
            ee,
            train,
            val,
            lam=lam,
            epochs=30,
            warmup_epochs=3,
            phase_batches=3,
            lr=0.02,
            optimizer="adamw",
            weight_decay=0.0,
            progress=False,
        )
        with torch.no_grad():
            costs.append(ee(x).cost.mean().item())
    assert costs[1] < costs[0]


def test_train_backbone_changes_it_and_refreezes():
    ee = eexit.attach(tiny_timm_vit())
    before = [p.detach().clone() for p in ee.backbone.parameters()]
    train, val = _loaders()
    eexit.fit(
        ee,
        train,
        val,
        lam=0.1,
        epochs=2,
        warmup_epochs=1,
        phase_batches=2,
        train_backbone=True,
        backbone_lr=0.01,
        select="last",
        progress=False,
    )
    assert any(not torch.equal(a, b) for a, b in zip(before, ee.backbone.parameters()))
    assert not any(p.requires_grad for p in ee.backbone.parameters())
    assert not ee.backbone.training


def test_dict_batches_are_accepted():
    ee = eexit.attach(tiny_timm_vit())
    data = _separable_data(32)
    batches = [{"pixel_values": data.tensors[0], "labels": data.tensors[1]}]
    before = {k: v.clone() for k, v in ee.adapter_state_dict().items()}
    eexit.fit(ee, batches, batches, lam=0.1, epochs=1, warmup_epochs=0, progress=False)
    after = ee.adapter_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the dict batches were trained on
    assert ee.history and ee.history[-1]["val_accuracy"] >= 0.0  # and validated on
    tuples = [(data.tensors[0], data.tensors[1])]
    with pytest.raises(EexitValueError, match="labels"):
        eexit.fit(ee, [{"pixel_values": data.tensors[0]}], tuples, lam=0.1, epochs=1, warmup_epochs=0, progress=False)


def test_negative_lambda():
    ee = eexit.attach(tiny_timm_vit())
    train, val = _loaders()
    with pytest.raises(EexitValueError, match="lam"):
        eexit.fit(ee, train, val, lam=-1.0)


def test_empty_loaders():
    ee = eexit.attach(tiny_timm_vit())
    _, val = _loaders()
    with pytest.raises(EexitValueError, match="empty"):
        eexit.fit(ee, [], val, progress=False)
    with pytest.raises(EexitValueError, match="no batch"):
        eexit.fit(ee, iter([]), val, progress=False)


@pytest.mark.parametrize("cache", [True, False])
def test_labels_out_of_range(cache):
    ee = eexit.attach(tiny_timm_vit())
    x = torch.randn(8, 3, IMG, IMG)
    bad = [(x, torch.tensor([0, 1, 2, 3, 4, 5, 0, 1]))]
    with pytest.raises(EexitValueError, match=r"\[0, 5\)"):
        eexit.fit(ee, bad, bad, epochs=1, warmup_epochs=0, cache_features=cache, progress=False)


@pytest.mark.parametrize("cache", [True, False])
def test_nan_inputs(cache):
    ee = eexit.attach(tiny_timm_vit())
    x = torch.randn(8, 3, IMG, IMG)
    x[3, 0, 0, 0] = float("nan")
    bad = [(x, torch.zeros(8, dtype=torch.long))]
    with pytest.raises(EexitValueError, match="NaN"):
        eexit.fit(ee, bad, bad, epochs=1, warmup_epochs=0, cache_features=cache, progress=False)


def test_nan_loss_keeps_last_good_state(monkeypatch):
    import eexit.train as train_module

    ee = eexit.attach(tiny_timm_vit())
    train, val = _loaders()
    eexit.fit(ee, train, val, lam=0.1, epochs=2, warmup_epochs=1, progress=False)
    good = ee.adapter_state_dict()
    real_loss = train_module._loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 1 else loss

    monkeypatch.setattr(train_module, "_loss", poisoned)
    with pytest.raises(TrainingError, match="last good state"):
        eexit.fit(ee, train, val, lam=0.1, epochs=3, warmup_epochs=1, progress=False)
    # the NaN came in the first batch: the last good state is the one fit() started from
    assert all(torch.equal(good[k], v) for k, v in ee.adapter_state_dict().items())
    assert not any(p.requires_grad for p in ee.backbone.parameters())


def test_fit_rejects_non_eexit_models():
    with pytest.raises(TypeError):
        eexit.fit(tiny_timm_vit(), [], [])


@pytest.mark.parametrize("name", ["timm_vit_cls", "timm_swin", "hf_swin_cls"])
def test_cache_size_estimate_is_the_size_of_the_cache(name):
    # Swin widens from stage to stage: the estimate must add each exit's own width, not one width for all.
    from backbone_zoo import IMG as ZOO_IMG
    from backbone_zoo import ZOO

    from eexit.data import FeatureCache, estimated_cache_bytes

    ee = eexit.attach(ZOO[name].build())
    data = TensorDataset(torch.randn(6, 3, ZOO_IMG, ZOO_IMG), torch.randint(0, ee.num_classes, (6,)))
    loader = DataLoader(data, batch_size=4)
    cache = FeatureCache.collect(ee, loader, "train", progress=False)
    tensors = [*cache.features, cache.labels] + ([cache.final_logits] if cache.final_logits is not None else [])
    assert estimated_cache_bytes(ee, loader) == sum(t.numel() * t.element_size() for t in tensors)
    if name != "timm_vit_cls":
        assert len({f.shape[1] for f in cache.features}) > 1  # the case the old estimate got wrong
    assert estimated_cache_bytes(ee, iter(loader)) is None  # no len(): unknown
