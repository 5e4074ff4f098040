"""``torch.compile`` per segment, with a batch dimension that shrinks without recompiling.

Early exit hands every segment a different batch size (the samples still running). torch.compile specialises a
dynamic size that is 0 or 1 and recompiles for a size it has not seen as symbolic; here every carry tensor's batch
dimension is marked *unbacked* before each call, so the one graph compiled at a segment's first call serves every
batch size, 1 included.

Inductor's layout optimisation is turned off: with an unbacked batch it lays a convolution's output out
channels-last while the graph expects it contiguous, and the run fails (torch 2.14, CPU). Only the patch
embedding of a ViT is a convolution, so this costs nothing measurable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .errors import EexitValueError

__all__ = ["CompiledSegment", "compile_segments"]


class CompiledSegment:
    """A segment compiled once for every batch size; called like the segment itself."""

    def __init__(self, segment: nn.Module, compiled: Callable[..., Any], inductor: bool) -> None:
        self.segment = segment
        self.compiled = compiled
        self.inductor = inductor
        self.calls = 0

    def __call__(self, *carry: torch.Tensor) -> Any:
        # Marking is metadata on the tensor object: mark aliases, so the caller's images stay unmarked for whatever
        # else they are passed to (a compiled bare model would otherwise see an unbacked batch too).
        carry = tuple(tensor.view_as(tensor) for tensor in carry)
        for tensor in carry:
            torch._dynamo.decorators.mark_unbacked(tensor, 0)
        self.calls += 1
        if self.calls == 1 and self.inductor:  # the call that compiles (see the module's docstring)
            with torch._inductor.config.patch(layout_optimization=False):
                return self.compiled(*carry)
        return self.compiled(*carry)

    def __repr__(self) -> str:
        return f"CompiledSegment({type(self.segment).__name__} {getattr(self.segment, 'k', '?')})"


def compile_segments(
    segments: Sequence[nn.Module],
    *,
    backend: str = "inductor",
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> list[CompiledSegment]:
    """``torch.compile`` each segment (lazily: each compiles at its first call).

    Args:
        segments: the eager segments (``ee.segments``).
        backend: the torch.compile backend.
        mode: inductor mode; cannot be combined with ``options`` (torch.compile's rule).
        options: inductor options.
    """
    if (mode is not None or options) and backend != "inductor":
        raise EexitValueError(f"mode and options apply to the inductor backend only, not to backend={backend!r}.")
    if mode is not None and options:
        raise EexitValueError("pass either mode or inductor options to ee.compile, not both (torch.compile's rule).")
    # dynamic=None: only the batch dimension (marked unbacked at each call) is symbolic; every other size stays static.
    kwargs: dict[str, Any] = {"backend": backend, "dynamic": None, "mode": mode, "options": options or None}
    return [
        CompiledSegment(segment, torch.compile(segment, **kwargs), inductor=backend == "inductor")
        for segment in segments
    ]
