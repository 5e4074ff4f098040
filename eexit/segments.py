"""The backbone as segments, one per exit: what eager early exit, ``ee.compile`` and ``ee.export`` all run.

A compiled or exported graph cannot change its batch size in the middle, so per-sample early exit has to happen
*between* graphs. Segment k maps the running *carry* (a flat tuple of batch-first tensors) to exit k's outputs
and the next carry::

    segment 0:   (pixel_values,)            -> (logits_0, gate_logit_0, *carry_1)
    segment k:   carry_k                    -> (logits_k, gate_logit_k, *carry_{k+1})
    last:        carry_{E-1}                -> (logits_{E-1},)

For a token backbone (timm / transformers ViTs, T2T-ViT) the carry is the hidden states ``[b, N, D]``, then, when
the gates read earlier exits, the history the next gate reads (the previous exit's log-softmax ``[b, C]`` and
its agreement run ``[b]``). For a staged backbone (the Dynamic Perceiver) it is the history, every earlier exit's
logits (later classifiers read them) and the stage state's tensors.

:func:`run_segments` drives any list of segment callables (eager modules, compiled modules, ONNX Runtime
sessions) with the same :class:`~eexit.recorder.ExitRecorder` as the hooked forward: after each segment the
recorder decides who stops (one host sync), and every carry tensor is cut to the samples that go on. So the
eager, compiled and exported paths share one exit bookkeeping by construction; eager segments compute the same
numbers as the hooked forward, compiled and exported graphs the same within float tolerance (a sample right at a
threshold may then leave one exit apart).

Segments exist for specs that can run the backbone without its own forward (``spec.segments``); attach checks on
a probe batch that they reproduce the hooked all-exits outputs, and falls back to the hooks if not.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from .backbones.base import StagedSpec
from .errors import SegmentsUnavailable
from .gates import ExitHistory
from .recorder import STOP, ExitRecorder

if TYPE_CHECKING:
    from .model import EarlyExitModel

__all__ = ["SegmentsUnavailable", "StageSegment", "TokenSegment", "build_segments", "carry_names", "run_segments"]

#: A segment: carry tensors in, ``(logits, gate_logit, *next carry)`` out (``(logits,)`` at the last exit).
SegmentFn = Callable[..., Sequence[torch.Tensor]]


def _check_batch(carry: Sequence[torch.Tensor]) -> None:
    """Tell the tracer what early exit guarantees: every carry tensor has the same, non-zero batch size.

    Compiled segments see each carry tensor's batch as its own unbacked size; without this, an op that combines two
    of them, or checks for an empty input (BatchNorm does), cannot be traced and the graph breaks.
    """
    batch = carry[0].shape[0]
    if isinstance(batch, int) and not torch.compiler.is_compiling():
        return  # eager: the sizes are plain numbers, nothing to tell (and ~30 calls per forward saved)
    torch._check(batch > 0)
    for tensor in carry[1:]:
        torch._check(tensor.shape[0] == batch)


class TokenSegment(nn.Module):
    """Segment k of a token backbone: the blocks after exit k-1 up to exit k's block, then exit k.

    The last segment of a backbone with its own head runs the remaining blocks and the head (the last exit).
    """

    def __init__(self, ee: EarlyExitModel, k: int) -> None:
        super().__init__()
        self.backbone = ee.backbone
        self.spec = ee.spec
        self.k = k
        self.uses_history = ee.uses_history
        self.is_head = ee.has_backbone_head and k == ee.num_exits - 1
        num_blocks = len(ee.spec.blocks(ee.backbone))
        self.first_block = ee.exit_blocks[k - 1] + 1 if k > 0 else 0
        self.exit_block = num_blocks - 1 if self.is_head else ee.exit_blocks[k]
        self.head = None if self.is_head else ee.heads[k]
        self.gate = ee.gates[k] if k < ee.num_exits - 1 else None

    def forward(self, *carry: torch.Tensor, gates: bool = True) -> tuple[torch.Tensor | None, ...]:
        """Run the segment; ``gates=False`` (eager only, for policies that read no gate) skips the gate and its
        history, and then the carry holds no history either."""
        _check_batch(carry)
        history_in = self.uses_history and gates
        if self.k == 0:
            hidden = self.spec.embed(self.backbone, carry[0])
            history = ExitHistory() if history_in else None
        else:
            hidden = carry[0]
            history = ExitHistory(carry[1], carry[2]) if history_in else None
        for index in range(self.first_block, self.exit_block + 1):
            hidden = self.spec.run_block(self.backbone, index, hidden)
        if self.is_head:
            return (self.spec.final_logits(self.backbone, hidden),)
        logits = self.head(self.spec.pool_at(self.backbone, hidden, self.exit_block))  # [b, C]
        if self.gate is None:
            return (logits,)
        if not gates:
            return (logits, None, hidden)
        gate_logit, after = self.gate.step(logits, history)
        return (logits, gate_logit, hidden) + ((after.log_probs, after.run) if after is not None else ())


class StageSegment(nn.Module):
    """Segment k of a staged backbone: stage k's trunk, then exit k (the model's own classifier at the last)."""

    def __init__(self, ee: EarlyExitModel, k: int) -> None:
        super().__init__()
        self.backbone = ee.backbone
        self.spec: StagedSpec = ee.spec  # type: ignore[assignment]
        self.driver = ee.driver
        self.heads = ee.heads
        self.k = k
        self.uses_history = ee.uses_history
        self.gate = ee.gates[k] if k < ee.num_exits - 1 else None

    def forward(self, *carry: torch.Tensor, gates: bool = True) -> tuple[torch.Tensor | None, ...]:
        """Run the segment; ``gates=False`` as for :class:`TokenSegment`."""
        _check_batch(carry)
        k = self.k
        history_in = self.uses_history and gates
        if k == 0:
            state = self.spec.start(self.backbone, carry[0])
            history = ExitHistory() if history_in else None
            earlier: list[torch.Tensor] = []
        else:
            rest = list(carry)
            history = ExitHistory(rest.pop(0), rest.pop(0)) if history_in else None
            earlier, rest = rest[:k], rest[k:]
            state = self.spec.state_from_tensors(self.backbone, tuple(rest))
        state, feature = self.spec.run_stage(self.backbone, k, state)
        logits = self.driver.classify(self.heads, k, feature, earlier)  # [b, C]
        if self.gate is None:
            return (logits,)
        if not gates:
            return (logits, None, *earlier, logits, *self.spec.state_tensors(state))
        gate_logit, after = self.gate.step(logits, history)
        out: tuple[torch.Tensor | None, ...] = (logits, gate_logit)
        if after is not None:
            out += (after.log_probs, after.run)
        return (*out, *earlier, logits, *self.spec.state_tensors(state))


def unavailable_reason(ee: EarlyExitModel) -> str | None:
    """Why ``ee`` cannot run as segments, or ``None`` when its spec can."""
    spec = ee.spec
    if spec.input_kind == "graphs":
        return (
            f"backbone spec {spec.name!r} runs batches of graphs of varying sizes, which segments (fixed tensors per "
            "exit) cannot carry; graph backbones run eagerly, graph by graph shrinking the batch"
        )
    if not spec.segments:
        return (
            f"backbone spec {spec.name!r} does not describe its model as segments (it is run through the model's own "
            "forward with hooks); segments exist for timm ViT/DeiT, transformers ViT/DeiT, T2T-ViT and the Dynamic "
            "Perceiver"
        )
    return None


def build_segments(ee: EarlyExitModel) -> list[nn.Module]:
    """One segment per exit, in exit order; raises :class:`SegmentsUnavailable` with the reason when the spec has
    none."""
    reason = unavailable_reason(ee)
    if reason is not None:
        raise SegmentsUnavailable(reason + ".")
    kind = StageSegment if isinstance(ee.spec, StagedSpec) else TokenSegment
    return [kind(ee, k) for k in range(ee.num_exits)]


def carry_names(ee: EarlyExitModel, k: int, state_tensors: int = 0) -> list[str]:
    """Names of segment k's inputs (``pixel_values`` for k = 0), as the exported graphs call them.

    Args:
        state_tensors: how many tensors a staged backbone's stage state has (ignored for token backbones).
    """
    if k == 0:
        return ["pixel_values"]
    history = ["prev_log_probs", "agree_run"] if ee.uses_history else []
    if isinstance(ee.spec, StagedSpec):
        return history + [f"logits_{j}" for j in range(k)] + [f"state_{i}" for i in range(state_tensors)]
    return ["hidden", *history]


def output_names(ee: EarlyExitModel, k: int, state_tensors: int = 0) -> list[str]:
    """Names of segment k's outputs: ``logits``, ``gate_logit`` and the next carry (``logits`` alone at the last)."""
    if k == ee.num_exits - 1:
        return ["logits"]
    return ["logits", "gate_logit"] + [f"next_{name}" for name in carry_names(ee, k + 1, state_tensors)]


def run_segments(
    segments: Sequence[SegmentFn], images: torch.Tensor, recorder: ExitRecorder, gates: bool = True
) -> None:
    """Run the segments in order on ``images``, letting ``recorder`` decide after each who stops.

    The recorder must not carry history or earlier logits itself (the carry holds them). Between segments every
    carry tensor is cut to the samples that go on; when none is left, the rest is not run.

    Args:
        gates: ``False`` when the policy reads no gate (eager segments then skip the gates; compiled and exported
            ones always compute them).
    """
    carry: Sequence[torch.Tensor] = (images,)
    extra = {} if gates else {"gates": False}
    for k, segment in enumerate(segments):
        out = segment(*carry, **extra)
        step = recorder.decide(k, out[0], out[1] if len(out) > 1 else None)
        if step is STOP:
            return
        carry = out[2:] if step is None else tuple(t.index_select(0, step) for t in out[2:])


def run_all(segments: Sequence[SegmentFn], images: torch.Tensor) -> list[Sequence[torch.Tensor]]:
    """Every segment's outputs on the whole batch (no exit taken): what attach checks and export traces with."""
    carry: Sequence[torch.Tensor] = (images,)
    outputs = []
    for segment in segments:
        outputs.append(segment(*carry))
        carry = outputs[-1][2:]
    return outputs


def probe_images(ee: EarlyExitModel, batch: int, input_shape: Sequence[int]) -> torch.Tensor:
    """Seeded random images ``[batch, *input_shape]`` on the backbone's device, in its dtype."""
    param = next(ee.backbone.parameters(), None)
    images = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0))
    return images if param is None else images.to(device=param.device, dtype=param.dtype)


def check_segments(ee: EarlyExitModel, segments: list[nn.Module], images: torch.Tensor) -> None:
    """Refuse segments that do not reproduce the hooked all-exits forward on ``images`` (exit by exit)."""
    with torch.no_grad():
        reference = ee.run_all_exits(images)
        try:
            outputs = run_all(segments, images)
        except Exception as err:  # a spec method that does not fit this model (another library version, a custom model)
            raise SegmentsUnavailable(
                f"running {type(ee.backbone).__name__} as segments failed ({type(err).__name__}: {err}); spec "
                f"{ee.spec.name!r} does not know this model's forward"
            ) from err
    logits = [out[0] for out in outputs]
    gates = [out[1] for out in outputs if len(out) > 1]
    pairs = [(f"exit {k} logits", a, b) for k, (a, b) in enumerate(zip(logits, reference.logits))]
    pairs += [(f"gate {k} logit", a, b) for k, (a, b) in enumerate(zip(gates, reference.gate_logits))]
    if len(logits) != len(reference.logits) or len(gates) != len(reference.gate_logits):
        pairs.append(("number of exits", torch.zeros(len(logits)), torch.zeros(len(reference.logits))))
    loose = images.dtype in (torch.float16, torch.bfloat16)
    for what, got, want in pairs:
        same_shape = got.shape == want.shape
        error = float((got.float() - want.float()).abs().max()) if same_shape and got.numel() else 0.0
        scale = float(want.abs().max()) + 1.0 if want.numel() else 1.0
        if not same_shape or not error <= (2e-2 if loose else 1e-4) * scale:
            raise SegmentsUnavailable(
                f"running {type(ee.backbone).__name__} as segments does not reproduce its own forward ({what}: "
                f"shape {tuple(got.shape)} vs {tuple(want.shape)}, max difference {error:.3g}); the model's forward "
                f"does more than spec {ee.spec.name!r} knows (a customised forward or block call?)"
            )


def prepare_segments(ee: EarlyExitModel, input_shape: Sequence[int]) -> tuple[list[nn.Module] | None, str | None]:
    """Build and check the segments of a freshly attached model: ``(segments, None)``, or ``(None, reason)``.

    A spec that claims segments but fails the check gets a warning (the model still runs, through the hooks).
    """
    reason = unavailable_reason(ee)
    if reason is not None:
        return None, reason
    segments = build_segments(ee)
    try:
        check_segments(ee, segments, probe_images(ee, 2, input_shape))
    except SegmentsUnavailable as err:
        warnings.warn(
            f"{err}. eexit runs this model through its own forward with hooks instead; ee.compile and ee.export "
            "are unavailable for it.",
            stacklevel=4,  # the user's attach() call
        )
        return None, str(err)
    return segments, None
