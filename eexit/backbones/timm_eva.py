"""Backbone spec for timm's EVA family (``timm.models.eva.Eva``).

Covers EVA, EVA02 and the other models timm builds on the ``Eva`` class (RoPE ViTs, PE / DINOv3-style towers).
Their blocks are called with keyword state, ``blk(x, rope=..., attn_mask=..., is_causal=...)``; a forward hook
sees and replaces only the block's output, so the keywords reach the next block unchanged. That is safe while
they are not batch-sized: in eval mode the rotary table is ``[N, d]`` (or ``[depth, heads, N, d]`` for mixed
RoPE) and ``attn_mask`` is ``None`` unless the caller passes one, which eexit never does. Only patch dropout
(training mode) makes the rotary table batch-sized, and eexit runs a frozen backbone in eval mode; early exit
on a backbone being trained in train mode is not supported for EVA.

IMs read the model's own pooling: ``norm`` (or ``fc_norm`` after pooling for EVA02), then ``forward_head``.
"""

from __future__ import annotations

from .base import register_spec
from .timm_vit import TimmTokenSpec

__all__ = ["TimmEvaSpec"]


class TimmEvaSpec(TimmTokenSpec):
    """timm ``Eva`` (EVA, EVA02, RoPE ViTs)."""

    name = "timm_eva"

    classes = (("timm.models.eva", "Eva"),)


register_spec(TimmEvaSpec())
