"""Backbone spec for timm's VisionTransformer family, and the shared spec of timm's flat token transformers.

:class:`TimmViTSpec` covers ``timm.models.vision_transformer.VisionTransformer`` and its subclasses: ViT, DeiT
(``deit_*``), distilled DeiT (``VisionTransformerDistilled``: CLS and distillation tokens, two heads averaged),
DeiT-III (``deit3_*``: layer scale, no class position embedding), ViTs with register tokens (``*_reg4``), and
CLS-token, average-pool and attention-pool (``map``) heads. An IM reads a block's tokens through the model's own
final ``norm`` and ``forward_head(pre_logits=True)``, i.e. exactly the pooling the backbone's classifier sees
(for distilled DeiT the mean of the CLS and distillation tokens, as its two heads are averaged).

:class:`TimmTokenSpec` is that recipe for any timm-style model with ``blocks``, ``norm``, ``forward_head``,
``num_features`` and ``num_classes``; EVA, BEiT and T2T-ViT specs subclass it and only say which class they match.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import BackboneSpec, loaded_class, register_spec

__all__ = ["TimmTokenSpec", "TimmViTSpec"]


class TimmTokenSpec(BackboneSpec):
    """A timm-style flat token transformer: ``blocks`` of ``[B, N, D]`` tokens, then ``norm`` and ``forward_head``.

    Subclasses set ``name`` and ``classes``.
    """

    #: (module, class name) of the model classes described; a class matches only once its module is imported
    classes: tuple[tuple[str, str], ...] = ()

    def matches(self, model: nn.Module) -> bool:
        loaded = (loaded_class(module, name) for module, name in self.classes)
        return any(cls is not None and isinstance(model, cls) for cls in loaded)

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"blocks.{i}", block) for i, block in enumerate(model.blocks)]

    def feature_width(self, model: nn.Module) -> int:
        return int(model.num_features)

    def pool(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if getattr(model, "global_pool", None) == "token" and getattr(model, "attn_pool", None) is None:
            # Token pooling reads only the prefix tokens, and the final norm acts per token, so normalising
            # just those is exact and skips the norm over every patch token at every exit.
            hidden = hidden[:, : max(1, int(getattr(model, "num_prefix_tokens", 1)))]
        return model.forward_head(model.norm(hidden), pre_logits=True)  # [B, D]

    def num_classes(self, model: nn.Module) -> int | None:
        return int(model.num_classes) if model.num_classes else None

    def input_shape(self, model: nn.Module) -> tuple[int | None, int | None, int | None]:
        embed = getattr(model, "patch_embed", None)
        proj = getattr(embed, "proj", None)
        proj = getattr(proj, "base_layer", proj)  # a PEFT (LoRA) layer wraps the conv it adapts
        channels = int(proj.in_channels) if isinstance(proj, nn.Conv2d) else None
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


class TimmViTSpec(TimmTokenSpec):
    """timm ``VisionTransformer`` and subclasses (DeiT, distilled DeiT, DeiT-III, register tokens)."""

    name = "timm_vit"

    classes = (("timm.models.vision_transformer", "VisionTransformer"),)

    segments = True

    def matches(self, model: nn.Module) -> bool:
        return type(model).__module__.startswith("timm.") and super().matches(model)

    def embed(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        # VisionTransformer.forward_features up to its blocks.
        x = model._pos_embed(model.patch_embed(pixel_values))
        return model.norm_pre(model.patch_drop(x))

    def final_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.norm(hidden))


register_spec(TimmViTSpec())
