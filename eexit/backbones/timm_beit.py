"""Backbone spec for timm's BEiT (``timm.models.beit.Beit``).

BEiT blocks are called as ``blk(x, shared_rel_pos_bias=...)``. The shared relative position bias is
``[heads, N, N]``, computed once per forward and broadcast over the batch, so shrinking the batch between
blocks leaves it valid. Fine-tuned BEiT pools by the mean of the patch tokens followed by ``fc_norm`` (its
``norm`` is then the identity); with ``global_pool="token"`` it reads the CLS token through ``norm``. IMs read
exactly that, through ``forward_head(pre_logits=True)``.
"""

from __future__ import annotations

from .base import register_spec
from .timm_vit import TimmTokenSpec

__all__ = ["TimmBeitSpec"]


class TimmBeitSpec(TimmTokenSpec):
    """timm ``Beit``."""

    name = "timm_beit"

    classes = (("timm.models.beit", "Beit"),)


register_spec(TimmBeitSpec())
