"""Backbone spec for Hugging Face ``transformers`` BEiT (``BeitModel``, ``BeitForImageClassification``).

BEiT layers are called with ``resolution``, ``interpolate_pos_encoding`` and an ``attention_mask`` that carries
the shared relative position bias, ``[1, heads, N, N]``: broadcast over the batch, so shrinking the batch
between layers leaves it valid. What the classifier reads depends on ``config.use_mean_pooling``: the mean of
the patch tokens through the pooler's LayerNorm (the fine-tuned default; ``layernorm`` is then the identity), or
the CLS token through ``layernorm``. IMs read the same: ``pooler(layernorm(hidden))``. A ``BeitModel`` built
without a pooling layer has no classifier to imitate; its IMs read the CLS token through ``layernorm``.
"""

from __future__ import annotations

import torch
from torch import nn

from ._hf import HFSpec, base_model
from .base import register_spec

__all__ = ["HFBeitSpec"]


class HFBeitSpec(HFSpec):
    """transformers BEiT, with or without a classification head."""

    name = "hf_beit"
    classes = ("BeitModel", "BeitForImageClassification")

    def pool(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        base = base_model(model)[1]
        if base.pooler is None:
            return base.layernorm(hidden[:, 0])  # [B, D]
        return base.pooler(base.layernorm(hidden))  # [B, D]


register_spec(HFBeitSpec())
