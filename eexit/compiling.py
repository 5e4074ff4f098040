"""``torch.compile`` per segment, with a batch dimension that shrinks without recompiling.

Early exit hands every segment a different batch size (the samples still running). torch.compile specialises a
dynamic size that is 0 or 1 and recompiles for a size it has not seen as symbolic; here every carry tensor's batch
dimension is marked *unbacked* before each call, so the one graph compiled at a segment's first call serves every
batch size, 1 included.

Each segment is compiled through a forward function of its own (a copy of its class's ``forward`` with its own
code object). Dynamo keeps its compiled graphs per code object and gives up on one after ``recompile_limit`` (8)
variants: with one shared ``forward``, the segments of a 12-exit ViT would be 12 variants of one function, and
the last ones would silently run eagerly.

Inductor's layout optimisation is turned off for the segments' graphs: with an unbacked batch it lays a convolution's
output out channels-last while the graph expects it contiguous, and the run fails (torch 2.14, CPU). Only the patch
embedding of a ViT is a convolution, so this costs nothing measurable.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .errors import EexitValueError

__all__ = ["CompiledSegment", "compile_segments"]


def _own_forward(segment: nn.Module) -> Callable[..., Any]:
    """``segment.forward`` bound through a fresh code object (see the module's docstring)."""
    function = type(segment).forward
    code = function.__code__.replace(co_name=f"{function.__name__}_segment_{getattr(segment, 'k', id(segment))}")
    own = types.FunctionType(code, function.__globals__, code.co_name, function.__defaults__, function.__closure__)
    own.__kwdefaults__ = function.__kwdefaults__
    return types.MethodType(own, segment)


class CompiledSegment:
    """A segment compiled once for every batch size; called like the segment itself.

    Compiled segments always compute the gates (``gates=False`` is accepted and ignored: one graph per segment).
    """

    def __init__(self, segment: nn.Module, compiled: Callable[..., Any], patch_layout: bool) -> None:
        self.segment = segment
        self.compiled = compiled
        self.patch_layout = patch_layout

    def __call__(self, *carry: torch.Tensor, gates: bool = True) -> Any:
        # Marking is metadata on the tensor object: mark aliases, so the caller's images stay unmarked for whatever
        # else they are passed to (a compiled bare model would otherwise see an unbacked batch too).
        carry = tuple(tensor.view_as(tensor) for tensor in carry)
        for tensor in carry:
            torch._dynamo.decorators.mark_unbacked(tensor, 0)
        if not self.patch_layout:
            return self.compiled(*carry)
        # Patched on every call, not only the first: a change of grad mode, dtype or device recompiles.
        with torch._inductor.config.patch(layout_optimization=False):
            return self.compiled(*carry)

    def __repr__(self) -> str:
        return f"CompiledSegment({type(self.segment).__name__} {getattr(self.segment, 'k', '?')})"


def compile_segments(
    segments: Sequence[nn.Module],
    *,
    backend: str = "inductor",
    mode: str | None = None,
    fullgraph: bool = False,
    options: dict[str, Any] | None = None,
) -> list[CompiledSegment]:
    """``torch.compile`` each segment (lazily: each compiles at its first call).

    Args:
        segments: the eager segments (``ee.segments``).
        backend: the torch.compile backend.
        mode: inductor mode; cannot be combined with ``options`` (torch.compile's rule).
        fullgraph: refuse graph breaks (torch.compile's ``fullgraph``).
        options: inductor options.
    """
    if (mode is not None or options) and backend != "inductor":
        raise EexitValueError(f"mode and options apply to the inductor backend only, not to backend={backend!r}.")
    if mode is not None and options:
        raise EexitValueError("pass either mode or inductor options to ee.compile, not both (torch.compile's rule).")
    # dynamic=None: only the batch dimension (marked unbacked at each call) is symbolic; every other size stays static.
    kwargs: dict[str, Any] = {"backend": backend, "dynamic": None, "mode": mode, "fullgraph": fullgraph}
    inductor = backend == "inductor"
    if inductor and mode is None:
        # Set once at compile time; with a mode (which excludes options) it is patched around every call instead.
        kwargs["options"] = {"layout_optimization": False, **(options or {})}
    patch_layout = inductor and mode is not None
    return [
        CompiledSegment(segment, torch.compile(_own_forward(segment), **kwargs), patch_layout) for segment in segments
    ]
