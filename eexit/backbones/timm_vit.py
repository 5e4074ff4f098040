"""Backbone spec for timm's VisionTransformer family.

Covers ``timm.models.vision_transformer.VisionTransformer`` and its subclasses (DeiT, distilled DeiT, DeiT-III,
ViTs with register tokens, CLS-token, average-pool and attention-pool heads). An IM reads a block's tokens
through the model's own final ``norm`` and ``forward_head(pre_logits=True)``, i.e. exactly the pooling the
backbone's classifier sees.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import BackboneSpec, register_spec


def _vit_class() -> type | None:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # timm not installed: nothing to match
        return None
    return VisionTransformer


class TimmViTSpec(BackboneSpec):
    """timm ``VisionTransformer`` and subclasses."""

    name = "timm_vit"

    def matches(self, model: nn.Module) -> bool:
        if not type(model).__module__.startswith("timm."):
            return False
        cls = _vit_class()
        return cls is not None and isinstance(model, cls)

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"blocks.{i}", block) for i, block in enumerate(model.blocks)]

    def feature_width(self, model: nn.Module) -> int:
        return int(model.num_features)

    def pool(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if model.global_pool == "token" and getattr(model, "attn_pool", None) is None:
            # Token pooling reads only the prefix tokens, and the final norm acts per token, so normalising
            # just those is exact and skips the norm over every patch token at every exit.
            hidden = hidden[:, : max(1, model.num_prefix_tokens)]
        return model.forward_head(model.norm(hidden), pre_logits=True)  # [B, D]

    def num_classes(self, model: nn.Module) -> int | None:
        return int(model.num_classes) if model.num_classes else None

    def input_shape(self, model: nn.Module) -> tuple[int | None, int | None, int | None]:
        embed = model.patch_embed
        channels = int(embed.proj.in_channels) if hasattr(embed, "proj") else None
        if getattr(embed, "strict_img_size", False) and not getattr(embed, "dynamic_img_size", False):
            height, width = embed.img_size
            return channels, int(height), int(width)
        return channels, None, None

    def describe(self, model: nn.Module) -> dict[str, Any]:
        info = super().describe(model)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        # timm's pretrained tag names a weight set, not a commit: keep it apart from `revision`.
        info["base_model"] = cfg.get("hf_hub_id") or cfg.get("architecture")
        info["revision"] = None
        info["pretrained_tag"] = cfg.get("tag")
        return info


register_spec(TimmViTSpec())
