"""Backbone spec for T2T-ViT (``eexit.models.t2t_vit.T2TViT``; Yuan et al., ICCV 2021).

As in JEI-DNN (``reference/backbones.md`` §2.5-2.6): an IM after every block but the last, each reading the CLS
token through the backbone's own (shared, frozen) final ``norm``; the model's ``head`` is the last exit. A
hook on ``blocks[i]`` sees the ``[B, 1 + (S/16)^2, D]`` tokens. The tokens-to-token module runs once before the
first block, so its cost is in every exit's cost.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import register_spec
from .timm_vit import TimmTokenSpec

__all__ = ["T2TViTSpec"]


class T2TViTSpec(TimmTokenSpec):
    """eexit's timm-registered T2T-ViT (``t2t_vit_7`` ... ``t2t_vit_24``, ``t2t_vit_tiny``)."""

    name = "t2t_vit"

    classes = (("eexit.models.t2t_vit", "T2TViT"),)

    segments = True

    def embed(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        # T2TViT.forward_features up to its blocks (its input check is eexit's own, done before).
        return model._pos_embed(model.tokens_to_token(pixel_values))

    def final_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.norm(hidden))

    def input_shape(self, model: nn.Module) -> tuple[int | None, int | None, int | None]:
        # The position table is fixed at construction: only square images of img_size fit.
        return int(model.in_chans), int(model.img_size), int(model.img_size)


register_spec(T2TViTSpec())
