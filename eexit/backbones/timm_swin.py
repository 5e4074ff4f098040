"""Backbone spec for timm's Swin Transformer (``SwinTransformer``, ``SwinTransformerV2``).

Swin is hierarchical: ``layers[s]`` is a stage (a patch-merging downsample, then ``blocks``), each stage halves
the resolution and doubles the width. Exit points are the blocks inside the stages, ``layers.{s}.blocks.{j}``,
flattened in order (so ``exit_blocks`` indexes all blocks of all stages). Blocks take and return NHWC tokens
``[B, H, W, C]`` and keep the batch on dim 0, so the batch shrinks there like in a plain ViT. A stage's patch
merging runs before its first block, so its cost lands in the cost of the first exit after it (the cost table
measures, it does not assume).

What an IM reads:

* in the **last stage**: the model's own final ``norm`` and head pooling (``forward_head(pre_logits=True)``),
  i.e. what its classifier reads;
* in **earlier stages**: the final norm is sized for the last stage only, so the IM reads the same recipe
  without the learned part: a parameter-free LayerNorm over each token's channels (the final norm's eps), then
  the head's global pooling (average by default), giving that stage's width. The final norm's affine scale and
  shift would only be folded into the IM's first Linear, so nothing is lost; the normalisation keeps the
  feature scale comparable from stage to stage (the residual stream grows with depth), so one learning rate
  suits every exit. Per-token LayerNorm and averaging count 0 FLOPs in the cost table's convention.

Swin V2 computes its relative position bias with a small MLP once per forward, whatever the batch. The cost
table, measured on one sample, charges that to every sample: exact for a sample alone, an upper bound for a
batch (where the samples share it). At real sizes it is well under 1% of a block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BackboneError
from .base import register_spec
from .timm_vit import TimmTokenSpec

__all__ = ["TimmSwinSpec"]


def _stage_of_blocks(model: nn.Module) -> list[int]:
    """Stage index of each block, in block order."""
    return [s for s, stage in enumerate(model.layers) for _ in stage.blocks]


class TimmSwinSpec(TimmTokenSpec):
    """timm ``SwinTransformer`` and ``SwinTransformerV2``: exits after blocks inside the stages."""

    name = "timm_swin"

    classes = (
        ("timm.models.swin_transformer", "SwinTransformer"),
        ("timm.models.swin_transformer_v2", "SwinTransformerV2"),
    )

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        if not getattr(model.head.global_pool, "pool_type", ""):
            raise BackboneError(
                f"{type(model).__name__} was built with global_pool='' (no pooling): its head reads a feature map, "
                "not a vector, so there is nothing an exit can imitate. Build it with global_pool='avg' (the "
                "default), or reset_classifier(num_classes, global_pool='avg')."
            )
        return [
            (f"layers.{s}.blocks.{j}", block)
            for s, stage in enumerate(model.layers)
            for j, block in enumerate(stage.blocks)
        ]

    def exit_width(self, model: nn.Module, block: int) -> int:
        stage = _stage_of_blocks(model)[block]
        return int(model.feature_info[stage]["num_chs"]) * model.head.global_pool.feat_mult()

    def feature_width(self, model: nn.Module) -> int:
        return int(model.head_hidden_size)

    def pool(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.norm(hidden), pre_logits=True)  # [B, C_last]

    def pool_at(self, model: nn.Module, hidden: torch.Tensor, block: int) -> torch.Tensor:
        if _stage_of_blocks(model)[block] == len(model.layers) - 1:
            return self.pool(model, hidden)
        eps = float(getattr(model.norm, "eps", 1e-5))
        normed = F.layer_norm(hidden, hidden.shape[-1:], eps=eps)  # [B, H, W, C_s], no affine: see module doc
        return model.head.global_pool(normed)  # [B, C_s]


register_spec(TimmSwinSpec())
