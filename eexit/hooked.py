"""The hooked driver: exits on forward hooks, for backbones whose forward eexit does not own (timm, transformers).

A forward hook on each exit block pools the block's output and hands it to the call's sink
(:mod:`eexit.recorder`); when the sink keeps only some samples, the hook returns the shrunk block output, so the
next block runs on those alone; when nothing is left to compute, it raises :class:`_AllExited`, which stops the
backbone's forward.

The sink of the call lives in a ContextVar set for the duration of one eexit call, never on the modules: the hooks
do nothing for a call that is not an eexit call (the backbone then behaves exactly as before), and two threads
never see each other's features.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .backbones.base import BackboneSpec
from .config import ExitConfig
from .errors import BackboneError, EexitValueError
from .heads import ExitHead
from .recorder import STOP, ExitSink

__all__ = ["HookedDriver"]


class _AllExited(Exception):
    """Raised inside a hook to stop the backbone once it has nothing left to compute."""


_CALL: contextvars.ContextVar[tuple[HookedDriver, ExitSink] | None] = contextvars.ContextVar("eexit_call", default=None)


class HookedDriver:
    """Runs a backbone through its own forward, with IMs fed by hooks on the exit blocks.

    Args:
        backbone: the user's model (used in place).
        spec: how to find its blocks, pool their outputs and shrink the batch between them.
        exit_blocks: indices of the blocks an IM reads.
    """

    #: The IMs read their own features only (no earlier exit's logits).
    reads_earlier_exits = False

    def __init__(self, backbone: nn.Module, spec: BackboneSpec, exit_blocks: list[int]) -> None:
        self.backbone = backbone
        self.spec = spec
        self.exit_blocks = list(exit_blocks)
        self.has_head = spec.num_classes(backbone) is not None
        # Per-exit widths: hierarchical backbones (Swin) widen from stage to stage.
        self.widths = [spec.exit_width(backbone, b) for b in self.exit_blocks]
        self._handles: list[Any] = []

    # ------------------------------------------------------------------ structure
    def build_heads(self, num_classes: int, config: ExitConfig) -> nn.ModuleList:
        """One new IM per exit block, of the configured kind."""
        return nn.ModuleList(ExitHead(w, num_classes, config.head, config.head_hidden) for w in self.widths)

    def exit_names(self) -> list[str]:
        names = [self.spec.blocks(self.backbone)[b][0] for b in self.exit_blocks]
        return names + (["<backbone head>"] if self.has_head else [])

    def feature_widths(self) -> list[int]:
        """Width of each exit's features; the backbone head's logits come on top when it has one."""
        return list(self.widths)

    def classify(
        self, heads: nn.ModuleList, k: int, feature: torch.Tensor, earlier: list[torch.Tensor]
    ) -> torch.Tensor:
        """IM k's logits from its pooled features ``[b, D_k]``."""
        return heads[k](feature)

    def check_input(self, images: torch.Tensor, input_shape: list[int] | None) -> None:
        """Nothing beyond the spec's own input shape: token costs do not depend on what the spec allows."""

    def exit_classifier_state_dict(self, heads: nn.ModuleList) -> dict[str, torch.Tensor]:
        raise EexitValueError(
            f"{type(self.backbone).__name__}'s IMs are new heads, not copies of the model's own exit classifiers; "
            "use ee.adapter_state_dict() for their tensors."
        )

    # ------------------------------------------------------------------ hooks
    def install(self) -> None:
        """Register one forward hook per exit block (attach calls this; :meth:`remove` undoes it)."""
        blocks = self.spec.blocks(self.backbone)
        for k, block in enumerate(self.exit_blocks):
            self._handles.append(blocks[block][1].register_forward_hook(self._make_hook(k)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_hook(self, k: int) -> Callable[..., Any]:
        block = self.exit_blocks[k]

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            call = _CALL.get()
            if call is None or call[0] is not self:
                return None  # not an eexit call: leave the backbone untouched
            sink = call[1]
            features = self.spec.pool_at(self.backbone, self.spec.hidden(output), block)  # [b, D_k]
            self._check_features(k, features, sink.batch)
            step = sink.add(k, features)
            if step is STOP:
                raise _AllExited
            if step is None:
                return None  # nobody stopped here: hand the block's output on unchanged
            return self.spec.shrink(output, step)

        return hook

    def _check_features(self, k: int, features: torch.Tensor, batch: int) -> None:
        # Cheap, and it runs during attach's cost measurement: a spec that pools wrongly, or a block that does not
        # keep the batch on dim 0 (so the batch cannot shrink there), fails here with a message, not in a matmul.
        width = self.widths[k]
        if features.dim() != 2 or features.shape[0] != batch or features.shape[1] != width:
            raise BackboneError(
                f"exit {k} ({self.exit_names()[k]}): spec {self.spec.name!r} pooled features of shape "
                f"{tuple(features.shape)}, expected [{batch}, {width}] (batch, width). Either its blocks do not keep "
                "the batch on dim 0 (eexit shrinks the batch there, so it cannot exit early inside such a model), "
                "or the spec pools this backbone wrongly; describe it with eexit.GenericSpec(..., pool=callable)."
            )

    # ------------------------------------------------------------------ running
    def run(self, images: torch.Tensor, sink: ExitSink) -> torch.Tensor | None:
        """Run the backbone with the hooks feeding ``sink``.

        Returns:
            The backbone head's logits of the samples that reached it, or ``None`` when the sink stopped it.
        """
        token = _CALL.set((self, sink))
        try:
            return self.spec.logits(self.spec.call(self.backbone, images))
        except _AllExited:
            return None
        finally:
            _CALL.reset(token)
