"""The cost table is measured by torch and matches the analytic FLOPs of a ViT, attention included."""

from __future__ import annotations

import pytest
import torch
from conftest import IMG, tiny_timm_vit

import eexit
from eexit.cost import CostTable, flop_counter
from eexit.errors import EexitValueError

N, D, C = (IMG // 8) ** 2 + 1, 32, 5  # tokens (16 patches + CLS), width, classes of the tiny timm ViT
BLOCK = 2 * N * D * 3 * D + 2 * N * D * D + 2 * 2 * N * D * 4 * D + 4 * N * N * D  # qkv, proj, mlp, attention
PATCH = 2 * 16 * (3 * 8 * 8) * D
HEAD, GATE = 2 * D * C, 2 * len(eexit.ExitConfig().gate_features) * 1  # the default gate: Linear(F, 1)


def test_cost_table_matches_analytic_vit_flops():
    ee = eexit.attach(tiny_timm_vit())
    table = ee.cost_table
    expected = [PATCH + (k + 1) * (BLOCK + HEAD + GATE) for k in range(3)]
    expected.append(PATCH + 4 * BLOCK + 3 * (HEAD + GATE) + HEAD)
    assert table.exit_flops == pytest.approx(expected, rel=0, abs=0.5)
    assert table.backbone_flops == PATCH + 4 * BLOCK + HEAD
    assert table.ic[-1].item() == 1.0
    assert table.exit_macs[0] == expected[0] / 2


def test_attention_is_counted_on_cpu():
    q = torch.randn(1, 2, 17, 16)
    with flop_counter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert counter.get_total_flops() == 4 * 17 * 17 * 32


def test_cost_table_rejects_nonsense():
    with pytest.raises(EexitValueError):
        CostTable(exit_flops=[3.0, 2.0], backbone_flops=3.0)
    with pytest.raises(EexitValueError):
        CostTable(exit_flops=[], backbone_flops=3.0)
