"""End to end on the real digits: the demo, and JEI-DNN's λ moving the cost the right way (slow)."""

from __future__ import annotations

import pytest
import torch

import eexit
from eexit.digits import load_digits_splits, make_digits_vit, train_classifier

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits_backbone():
    torch.manual_seed(0)
    splits = load_digits_splits()
    loaders = splits.loaders(batch_size=64)
    backbone = train_classifier(make_digits_vit(depth=4, embed_dim=48), loaders[0], epochs=80, lr=3e-3, progress=False)
    return backbone, loaders


def test_lambda_trades_accuracy_for_cost(digits_backbone):
    backbone, (train, val, test) = digits_backbone
    ee = eexit.attach(backbone)
    initial = ee.adapter_state_dict()
    reports = {}
    for lam in (0.0, 2.0):
        ee.load_adapter_state_dict(initial)
        eexit.fit(
            ee,
            train,
            val,
            lam=lam,
            epochs=30,
            warmup_epochs=10,
            phase_batches=10,
            optimizer="adamw",
            lr=5e-3,
            min_lr=1e-4,
            progress=False,
        )
        reports[lam] = eexit.evaluate(ee, test)
    assert reports[2.0].cost_fraction < reports[0.0].cost_fraction
    full = reports[0.0].backbone_accuracy
    assert full > 0.8, "the digits backbone itself should be decent"
    assert reports[0.0].accuracy > full - 0.1
    # the early-exit forward agrees with the evaluation's replayed decisions on the real test images
    images = torch.cat([b[0] for b in test])
    with torch.inference_mode():
        out = ee(images)
    rates = torch.bincount(out.exit_index, minlength=ee.num_exits).double() / len(images)
    assert torch.allclose(rates, torch.tensor(reports[2.0].exit_rates, dtype=torch.float64))
    ee.detach()


def test_demo_runs_quick(tmp_path, capsys):
    from eexit.__main__ import main

    assert main(["demo", "--quick", "--out", str(tmp_path), "--lams", "0.1,1.0"]) == 0
    printed = capsys.readouterr().out
    assert "full backbone" in printed and "eexit default λ=0.1" in printed and "threshold" in printed
    assert "JEI-DNN paper λ=1" in printed
    assert (tmp_path / "accuracy_cost.png").stat().st_size > 1000
    assert (tmp_path / "adapter" / "eexit_adapter.safetensors").exists()
    assert (tmp_path / "results.json").exists()
