"""Backbone spec for Hugging Face ``transformers`` DINOv2, with and without register tokens.

Covers ``Dinov2Model``, ``Dinov2ForImageClassification``, ``Dinov2WithRegistersModel`` and
``Dinov2WithRegistersForImageClassification`` (layers in ``encoder.layer``). The classifier reads the CLS token
*concatenated with* the mean of the patch tokens (register tokens skipped), both after the final
``layernorm``, so an IM reads the same ``[B, 2D]`` feature. A headless model's IMs read its pooler output,
the normed CLS token ``[B, D]``.
"""

from __future__ import annotations

import torch
from torch import nn

from ._hf import HFSpec, base_model
from .base import register_spec

__all__ = ["HFDinov2Spec"]


class HFDinov2Spec(HFSpec):
    """transformers DINOv2 (and DINOv2 with registers), with or without a classification head."""

    name = "hf_dinov2"
    classes = (
        "Dinov2Model",
        "Dinov2ForImageClassification",
        "Dinov2WithRegistersModel",
        "Dinov2WithRegistersForImageClassification",
    )

    def feature_width(self, model: nn.Module) -> int:
        width = int(model.config.hidden_size)
        return width if self.num_classes(model) is None else 2 * width

    def pool(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        normed = base_model(model)[1].layernorm(hidden)  # [B, N, D]
        if self.num_classes(model) is None:
            return normed[:, 0]  # [B, D]
        first_patch = 1 + int(getattr(model.config, "num_register_tokens", 0))
        return torch.cat([normed[:, 0], normed[:, first_patch:].mean(dim=1)], dim=1)  # [B, 2D]


register_spec(HFDinov2Spec())
