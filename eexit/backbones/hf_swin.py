"""Backbone spec for Hugging Face ``transformers`` Swin and Swin V2.

Covers ``SwinModel``, ``SwinForImageClassification``, ``Swinv2Model`` and ``Swinv2ForImageClassification``.
Exit points are the layers inside the stages, ``encoder.layers.{s}.blocks.{j}``, flattened in order. Layers
take and return ``[B, L, C]`` tokens (``(hidden, attention)`` tuples) with the batch on dim 0; each stage but
the last ends with a patch merging, whose cost lands in the first exit of the next stage. Stage s has width
``embed_dim * 2**s``.

What an IM reads (the same choice as :mod:`eexit.backbones.timm_swin`): in the last stage, the classifier's
input (final ``layernorm``, then the mean over tokens); in earlier stages, a parameter-free LayerNorm over each
token's channels (the config's ``layer_norm_eps``) then the mean over tokens, because the final norm is sized
for the last stage only. As with timm's Swin V2, the V2 position-bias MLP runs once per forward whatever the batch,
so a sample's cost (measured alone) is an upper bound on its share in a batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._hf import HFSpec, base_model
from .base import register_spec

__all__ = ["HFSwinSpec"]


def _stage_of_blocks(model: nn.Module) -> list[int]:
    """Stage index of each block, in block order."""
    return [s for s, depth in enumerate(model.config.depths) for _ in range(depth)]


class HFSwinSpec(HFSpec):
    """transformers Swin and Swin V2: exits after layers inside the stages."""

    name = "hf_swin"
    classes = ("SwinModel", "SwinForImageClassification", "Swinv2Model", "Swinv2ForImageClassification")

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        prefix, base = base_model(model)
        return [
            (f"{prefix}encoder.layers.{s}.blocks.{j}", block)
            for s, stage in enumerate(base.encoder.layers)
            for j, block in enumerate(stage.blocks)
        ]

    def exit_width(self, model: nn.Module, block: int) -> int:
        return int(model.config.embed_dim * 2 ** _stage_of_blocks(model)[block])

    def feature_width(self, model: nn.Module) -> int:
        return int(base_model(model)[1].num_features)

    def pool(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return base_model(model)[1].layernorm(hidden).mean(dim=1)  # [B, C_last]

    def pool_at(self, model: nn.Module, hidden: torch.Tensor, block: int) -> torch.Tensor:
        if _stage_of_blocks(model)[block] == len(model.config.depths) - 1:
            return self.pool(model, hidden)
        normed = F.layer_norm(hidden, hidden.shape[-1:], eps=float(model.config.layer_norm_eps))  # no affine
        return normed.mean(dim=1)  # [B, C_s]


register_spec(HFSwinSpec())
