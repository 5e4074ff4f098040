"""A backbone spec the user fills in, for transformers no registered spec knows.

Example::

    spec = eexit.GenericSpec(blocks="encoder.layers", pool="cls", norm="encoder.norm", num_classes=10)
    ee = eexit.attach(model, spec=spec)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import BackboneError, EexitValueError
from .base import BackboneSpec, resolve_module


class GenericSpec(BackboneSpec):
    """Describe a token transformer by module names.

    Args:
        blocks: name of the ``ModuleList``/``Sequential`` holding the blocks, or the list of block names.
        pool: ``"cls"`` (token 0), ``"mean"`` (mean of the tokens after
            the prefix tokens), or a callable ``hidden [B, N, D] -> [B, D]`` applied after ``norm``.
        norm: name of the final norm the backbone applies before its head (``None``: no norm).
        num_prefix_tokens: tokens before the patch tokens (CLS, distillation, registers); ``"mean"`` skips them.
        num_classes: classes of the model's own output when the model returns logits; ``None`` when it does
            not (its final exit is then an IM on the last block).
        logits: reads logits from the model's output (default: the output itself, or its ``.logits``).
        width: feature width D; read from the norm's ``normalized_shape`` when omitted.
    """

    name = "generic"

    def __init__(
        self,
        blocks: str | Sequence[str],
        pool: str | Callable[[torch.Tensor], torch.Tensor] = "cls",
        norm: str | None = None,
        *,
        num_prefix_tokens: int = 1,
        num_classes: int | None = None,
        logits: Callable[[Any], torch.Tensor] | None = None,
        width: int | None = None,
    ) -> None:
        if isinstance(pool, str) and pool not in ("cls", "mean"):
            raise EexitValueError(f"pool must be 'cls', 'mean' or a callable, got {pool!r}.")
        self.block_names = blocks
        self.pool_kind = pool
        self.norm_name = norm
        self.num_prefix_tokens = num_prefix_tokens
        self._num_classes = num_classes
        self._logits = logits
        self._width = width

    def matches(self, model: nn.Module) -> bool:
        try:
            return len(self.blocks(model)) > 0
        except BackboneError:
            return False

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        if isinstance(self.block_names, str):
            container = resolve_module(model, self.block_names)
            return [(f"{self.block_names}.{name}", module) for name, module in container.named_children()]
        return [(name, resolve_module(model, name)) for name in self.block_names]

    def feature_width(self, model: nn.Module) -> int:
        if self._width is not None:
            return self._width
        norm = resolve_module(model, self.norm_name) if self.norm_name else None
        shape = getattr(norm, "normalized_shape", None)
        if shape:
            return int(shape[-1])
        raise BackboneError("GenericSpec cannot infer the feature width; pass width=D.")

    def pool(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        norm = resolve_module(model, self.norm_name) if self.norm_name else nn.Identity()
        if self.pool_kind == "cls":
            return norm(hidden[:, 0])
        if self.pool_kind == "mean":
            return norm(hidden)[:, self.num_prefix_tokens :].mean(dim=1)
        return self.pool_kind(norm(hidden))

    def num_classes(self, model: nn.Module) -> int | None:
        return self._num_classes

    def logits(self, output: Any) -> torch.Tensor:
        return self._logits(output) if self._logits is not None else super().logits(output)
