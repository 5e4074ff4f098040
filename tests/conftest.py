"""The two tiny backbones most tests use (a timm ViT and a transformers ViT), built from configs (no downloads).

Every backbone family, each on a tiny model, is in ``tests/backbone_zoo.py`` (the conformance matrix), with the
suite's one gate-spreading helper, ``spread_exits``."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

IMG = 32


def tiny_timm_vit(**kwargs) -> nn.Module:
    """A 4-block timm ViT on 32 px images; kwargs override the config (global_pool, reg_tokens, ...)."""
    cfg = dict(img_size=IMG, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)
    cfg.update(kwargs)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **cfg)


def _hf_vit_config(**kwargs):
    from transformers import ViTConfig

    cfg = dict(
        image_size=IMG,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=5,
    )
    cfg.update(kwargs)
    return ViTConfig(**cfg)


def tiny_hf_vit_classifier() -> nn.Module:
    from transformers import ViTForImageClassification

    return ViTForImageClassification(_hf_vit_config())


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(7, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
