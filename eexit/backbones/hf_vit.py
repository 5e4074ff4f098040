"""Backbone spec for Hugging Face ``transformers`` ViT and DeiT.

Covers ``ViTModel``, ``ViTForImageClassification``, ``DeiTModel``, ``DeiTForImageClassification`` and
``DeiTForImageClassificationWithTeacher``. IMs read the CLS token through the model's own final
``layernorm``, which is what its classifier reads. Models without a classifier (``ViTModel``) get an IM at
the last layer as their final exit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import BackboneError
from .base import BackboneSpec, register_spec

_CLASSES = (
    "ViTModel",
    "ViTForImageClassification",
    "DeiTModel",
    "DeiTForImageClassification",
    "DeiTForImageClassificationWithTeacher",
)


def _base(model: nn.Module) -> nn.Module:
    """The ViTModel / DeiTModel inside a task model (or the model itself)."""
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    return inner if isinstance(inner, nn.Module) else model


def _layers(base: nn.Module) -> tuple[str, nn.ModuleList]:
    # transformers 5 keeps the layers on the base model; 4.x kept them in `encoder.layer`.
    if isinstance(getattr(base, "layers", None), nn.ModuleList):
        return "layers", base.layers
    encoder = getattr(base, "encoder", None)
    if encoder is not None and isinstance(getattr(encoder, "layer", None), nn.ModuleList):
        return "encoder.layer", encoder.layer
    raise BackboneError(f"{type(base).__name__}: found neither `layers` nor `encoder.layer`.")


class HFViTSpec(BackboneSpec):
    """transformers ViT and DeiT, with or without a classification head."""

    name = "hf_vit"

    def matches(self, model: nn.Module) -> bool:
        return type(model).__module__.startswith("transformers.") and type(model).__name__ in _CLASSES

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        base = _base(model)
        path, layers = _layers(base)
        prefix = "" if base is model else f"{model.base_model_prefix}."
        return [(f"{prefix}{path}.{i}", layer) for i, layer in enumerate(layers)]

    def feature_width(self, model: nn.Module) -> int:
        return int(model.config.hidden_size)

    def pool(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        # The classifier reads token 0 after `layernorm`; the norm is per token, so normalise token 0 only.
        return _base(model).layernorm(hidden[:, 0])  # [B, D]

    def num_classes(self, model: nn.Module) -> int | None:
        if type(model).__name__.endswith("Model"):
            return None
        return int(model.config.num_labels)

    def input_shape(self, model: nn.Module) -> tuple[int | None, int | None, int | None]:
        cfg = model.config
        size = cfg.image_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return int(cfg.num_channels), int(height), int(width)

    def call(self, model: nn.Module, pixel_values: torch.Tensor) -> Any:
        return model(pixel_values=pixel_values)

    def describe(self, model: nn.Module) -> dict[str, Any]:
        info = super().describe(model)
        cfg = model.config
        info["base_model"] = getattr(cfg, "_name_or_path", None) or None
        info["revision"] = getattr(cfg, "_commit_hash", None)
        return info


register_spec(HFViTSpec())
