"""Tiny backbones built from configs (no downloads), shared by the tests."""

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


def tiny_timm_deit_distilled() -> nn.Module:
    return timm.create_model(
        "deit_tiny_distilled_patch16_224",
        pretrained=False,
        img_size=IMG,
        patch_size=8,
        embed_dim=32,
        depth=4,
        num_heads=2,
        num_classes=5,
    )


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


def tiny_hf_vit_model() -> nn.Module:
    from transformers import ViTModel

    return ViTModel(_hf_vit_config())


def tiny_hf_deit_classifier() -> nn.Module:
    from transformers import DeiTConfig, DeiTForImageClassification

    return DeiTForImageClassification(DeiTConfig(**_hf_vit_config().to_dict()))


def tiny_hf_deit_teacher() -> nn.Module:
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    return DeiTForImageClassificationWithTeacher(DeiTConfig(**_hf_vit_config().to_dict()))


# name -> (factory, attach kwargs)
BACKBONES = {
    "timm_vit_cls": (tiny_timm_vit, {}),
    "timm_vit_avg": (lambda: tiny_timm_vit(global_pool="avg", class_token=False, fc_norm=True), {}),
    "timm_vit_reg": (lambda: tiny_timm_vit(reg_tokens=2), {}),
    "timm_vit_map": (lambda: tiny_timm_vit(global_pool="map"), {}),
    "timm_deit_distilled": (tiny_timm_deit_distilled, {}),
    "timm_vit_headless": (lambda: tiny_timm_vit(num_classes=0), {"num_classes": 5}),
    "hf_vit_cls": (tiny_hf_vit_classifier, {}),
    "hf_vit_model": (tiny_hf_vit_model, {"num_classes": 5}),
    "hf_deit_cls": (tiny_hf_deit_classifier, {}),
    "hf_deit_teacher": (tiny_hf_deit_teacher, {}),
}


def backbone_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's own prediction (logits, or last hidden state for headless models) for comparisons."""
    out = model(x) if type(model).__module__.startswith("timm") else model(pixel_values=x)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def spread_gates(ee, x: torch.Tensor | None = None, seed: int = 0) -> None:
    """Give heads random weights and calibrate each gate on ``x`` so that about half of the samples reaching
    it exit there, with no sample near the decision boundary (for decision tests)."""
    from eexit.gates import gate_statistics

    g = torch.Generator().manual_seed(seed)
    if x is None:
        x = torch.randn(64, 3, IMG, IMG, generator=g)
    with torch.no_grad():
        features, _ = ee.exit_features(x)
        for head, feats in zip(ee.heads, features):
            for p in head.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            # unsaturated softmax: logits spread about 1.5 across samples, so gate statistics vary
            spread = (head(feats) - head(feats).mean(0)).std().clamp(min=1e-12)
            for p in head.parameters():
                p.mul_(1.5 / spread)
        for k, gate in enumerate(ee.gates):
            stats = gate_statistics(ee.heads[k](features[k]), gate.features)  # [B, F]
            direction = torch.randn(stats.shape[1], generator=g)
            proj = stats @ direction
            order = proj.sort().values
            mid = len(order) // 2
            centre = (order[mid - 1] + order[mid]) / 2
            scale = 4.0 / proj.std().clamp(min=1e-12)
            gate.linear.weight.copy_((direction * scale).unsqueeze(0))
            gate.linear.bias.fill_(float(-centre * scale))


@pytest.fixture(params=sorted(BACKBONES))
def backbone_name(request) -> str:
    return request.param


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(7, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
