"""Backbones eexit knowingly does not support, and why: a catch-all spec that refuses with a reason.

When no family spec describes a model but a refusal below applies, :func:`eexit.attach` fails with that
refusal's reason and the way out, instead of the generic "no spec recognises" message. Refusals are a table
(first that applies wins), so adding one is one entry, not a branch.

Models not listed here and not matched by any spec still get the generic error; a model whose blocks do not keep
the batch on dim 0 is caught when ``attach`` measures the cost table (see ``EarlyExitModel._check_features``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BackboneError
from .base import BackboneSpec, list_specs, loaded_class, matched_elsewhere, register_spec

__all__ = ["REFUSALS", "Refusal", "UnsupportedSpec", "refusal_reason"]


@dataclass(frozen=True)
class Refusal:
    """One kind of model eexit refuses.

    Attributes:
        name: short name of the kind.
        applies: whether the refusal applies to a model.
        reason: why eexit cannot hook exits onto it, and what to do instead.
    """

    name: str
    applies: Callable[[nn.Module], bool]
    reason: str


def _is_instance(module: str, name: str) -> Callable[[nn.Module], bool]:
    def applies(model: nn.Module) -> bool:
        cls = loaded_class(module, name)
        return cls is not None and isinstance(model, cls)

    return applies


def _is_cnn(model: nn.Module) -> bool:
    # Convolutions and no attention anywhere: a CNN (ResNet, ConvNeXt, EfficientNet, RegNet, ...) or another
    # feature-map network (PoolFormer). Checked by structure, so it covers timm, transformers and torchvision.
    has_conv = False
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention) or "attention" in type(module).__name__.lower():
            return False
        has_conv = has_conv or isinstance(module, nn.Conv2d)
    return has_conv


REFUSALS: list[Refusal] = [
    Refusal(
        "transformers TimmWrapper",
        lambda model: type(model).__name__.startswith("TimmWrapper"),
        "it is a transformers wrapper around a timm model. Attach to the timm model inside instead: "
        "eexit.attach(model.timm_model).",
    ),
    Refusal(
        "timm TNT",
        _is_instance("timm.models.tnt", "TNT"),
        "its blocks carry inner 'pixel' tokens shaped [batch x patches, ...] beside the patch tokens [batch, ...], "
        "so the batch is not on dim 0 of everything a block hands on and cannot shrink between blocks.",
    ),
    Refusal(
        "timm CaiT",
        _is_instance("timm.models.cait", "Cait"),
        "its classifier reads a class token that only exists in the class-attention blocks run after the patch "
        "blocks (blocks_token_only), so an exit inside `blocks` has no class token to read the way the head "
        "does. To exit on the mean of the patch tokens instead: eexit.attach(model, spec=eexit.GenericSpec("
        "'blocks', pool='mean', norm='norm', num_prefix_tokens=0, num_classes=model.num_classes)).",
    ),
    Refusal(
        "timm XCiT",
        _is_instance("timm.models.xcit", "Xcit"),
        "its classifier reads a class token that only exists in the class-attention blocks run after the patch "
        "blocks (cls_attn_blocks), so an exit inside `blocks` has no class token to read the way the head does.",
    ),
    Refusal(
        "CNN",
        _is_cnn,
        "it is a convolutional network (Conv2d layers, no attention): its stages return feature maps [B, C, H, W] "
        "whose size and width change from stage to stage, with no token sequence and no final token norm for an "
        "exit to read. eexit's specs describe vision transformers. Exits after stages of equal width can be "
        "described by hand: eexit.GenericSpec([<stage names>], pool=lambda h: h.mean((2, 3)), width=C, "
        "num_classes=K).",
    ),
]


def refusal_reason(model: nn.Module) -> str | None:
    """Why eexit refuses ``model`` (the first refusal that applies), or ``None``."""
    for refusal in REFUSALS:
        if refusal.applies(model):
            return refusal.reason
    return None


class UnsupportedSpec(BackboneSpec):
    """Matches a refused model that no other spec describes; every question about it raises the reason."""

    name = "unsupported"
    catch_all = True

    def matches(self, model: nn.Module) -> bool:
        return refusal_reason(model) is not None and not matched_elsewhere(self, model)

    def _refuse(self, model: nn.Module) -> BackboneError:
        known = [name for name in list_specs() if name != self.name]
        return BackboneError(
            f"eexit does not support {type(model).__module__}.{type(model).__name__}: {refusal_reason(model)} "
            f"Supported families: {known}."
        )

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        raise self._refuse(model)

    def feature_width(self, model: nn.Module) -> int:
        raise self._refuse(model)

    def pool(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        raise self._refuse(model)

    def num_classes(self, model: nn.Module) -> int | None:
        raise self._refuse(model)


register_spec(UnsupportedSpec())
