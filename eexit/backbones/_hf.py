"""What the transformers backbone specs share: finding the base model and its layers, input size, provenance.

transformers 5 keeps a ViT-like model's layers on the base model (``model.vit.layers``); 4.x and some families
in 5 (DINOv2, Data2Vec-vision) keep them in ``encoder.layer``; CLIP-like towers in ``encoder.layers``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import BackboneError
from .base import BackboneSpec

__all__ = ["HFSpec", "base_model", "layer_list"]

#: where the layers of a base model may live, most recent layout first
LAYER_PATHS = ("layers", "encoder.layer", "encoder.layers")


def base_model(model: nn.Module) -> tuple[str, nn.Module]:
    """The base model inside a task model and its attribute path prefix (``"vit."``), or ``("", model)``."""
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    return (f"{prefix}.", inner) if isinstance(inner, nn.Module) else ("", model)


def layer_list(base: nn.Module) -> tuple[str, nn.ModuleList]:
    """The path (relative to ``base``) and the ``ModuleList`` of its layers."""
    for path in LAYER_PATHS:
        try:
            layers = base.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return path, layers
    raise BackboneError(
        f"{type(base).__name__}: found its layers in none of {list(LAYER_PATHS)}; this transformers version keeps "
        "them elsewhere. Describe the model with eexit.GenericSpec(blocks=<path>, ...)."
    )


class HFSpec(BackboneSpec):
    """A transformers image model named in ``classes``; task models (``...ForImageClassification``) have a head."""

    #: class names this spec matches (in a ``transformers.`` module)
    classes: tuple[str, ...] = ()

    def matches(self, model: nn.Module) -> bool:
        return type(model).__module__.startswith("transformers.") and type(model).__name__ in self.classes

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        prefix, base = base_model(model)
        path, layers = layer_list(base)
        return [(f"{prefix}{path}.{i}", layer) for i, layer in enumerate(layers)]

    def feature_width(self, model: nn.Module) -> int:
        return int(model.config.hidden_size)

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
