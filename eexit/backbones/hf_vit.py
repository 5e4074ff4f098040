"""Backbone spec for Hugging Face ``transformers`` ViT and DeiT.

Covers ``ViTModel``, ``ViTForImageClassification``, ``DeiTModel``, ``DeiTForImageClassification`` and
``DeiTForImageClassificationWithTeacher``. IMs read the CLS token through the model's own final
``layernorm``, which is what its classifier reads. Models without a classifier (``ViTModel``) get an IM at
the last layer as their final exit.
"""

from __future__ import annotations

import torch
from torch import nn

from ._hf import HFSpec, base_model
from .base import register_spec

__all__ = ["HFViTSpec"]


class HFViTSpec(HFSpec):
    """transformers ViT and DeiT, with or without a classification head."""

    name = "hf_vit"
    classes = (
        "ViTModel",
        "ViTForImageClassification",
        "DeiTModel",
        "DeiTForImageClassification",
        "DeiTForImageClassificationWithTeacher",
    )

    def pool(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        # The classifier reads token 0 after `layernorm`; the norm is per token, so normalise token 0 only.
        return base_model(model)[1].layernorm(hidden[:, 0])  # [B, D]

    segments = True

    def embed(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        embeddings = base_model(model)[1].embeddings
        # The base model's forward casts the images to its weights' dtype first; so do the segments.
        return embeddings(pixel_values.to(embeddings.patch_embeddings.projection.weight.dtype))

    def final_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        sequence = base_model(model)[1].layernorm(hidden)
        if hasattr(model, "distillation_classifier"):  # DeiT with teacher: the two heads are averaged
            return (model.cls_classifier(sequence[:, 0]) + model.distillation_classifier(sequence[:, 1])) / 2
        return model.classifier(sequence[:, 0])


register_spec(HFViTSpec())
