"""Exit heads (IMs): the small classifiers that read a pooled feature at an exit point.

JEI-DNN (Regol et al., ICLR 2024, section 2 of ``reference/jei-dnn.md``) uses one Linear on the CLS token after
the backbone's final norm; an MLP head is offered for weaker features.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import EexitValueError

__all__ = ["ExitHead"]


class ExitHead(nn.Module):
    """A Linear (or Linear-GELU-Linear) classifier on a pooled feature ``[B, D] -> [B, C]``.

    Args:
        width: feature width D.
        num_classes: number of classes C.
        kind: ``"linear"`` or ``"mlp"``.
        hidden: hidden width of the MLP (default: ``width``).
    """

    def __init__(self, width: int, num_classes: int, kind: str = "linear", hidden: int | None = None) -> None:
        super().__init__()
        self.width, self.num_classes, self.kind = width, num_classes, kind
        if kind not in ("linear", "mlp"):
            raise EexitValueError(
                f"head={kind!r} is not an IM this backbone can build: 'linear' or 'mlp' ('graph_head' is for graph "
                "backbones such as GRIT)."
            )
        if kind == "linear":
            self.net: nn.Module = nn.Linear(width, num_classes)
        else:
            hidden = hidden or width
            self.net = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, num_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)  # [B, C]
