"""What happens at an exit, whichever driver runs the backbone: the sinks that receive each exit's features.

A driver (:mod:`eexit.hooked` or :mod:`eexit.staged`) runs the backbone and hands every exit's features to a
*sink*, in forward order, with :meth:`ExitSink.add`; the sink's answer tells the driver how to go on:

* ``None``: run the next block or stage on the same samples;
* a 1-D index tensor ``keep``: only the samples at those positions of the running batch go on, so shrink the
  running state to them;
* :data:`STOP`: nothing is left to compute; stop the backbone here.

Three sinks cover every call: :class:`ExitRecorder` (real early exit: it owns the stop mask, the input-ordered
outputs and the keep index), :class:`ExitCollector` (every exit on the whole batch) and :class:`FeatureSink` (the
features alone, for the feature cache). Every driver shares them, so early exit is written once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from .gates import ExitHistory
from .inference import ExitPolicy, ExitState
from .outputs import AllExitsOutput

__all__ = ["STOP", "ExitCollector", "ExitFn", "ExitRecorder", "ExitSink", "FeatureSink", "Step"]


class _Stop:
    """The type of :data:`STOP`."""

    def __repr__(self) -> str:
        return "STOP"


#: The sink's answer when the backbone has nothing left to compute.
STOP = _Stop()
Step = None | torch.Tensor | _Stop

#: Exit k's ``(logits [b, C], gate logit [b] or None)`` from its features ``[b, D_k]``, the earlier exits' logits
#: of the same samples (read by staged backbones only) and the gates' history (``None`` when they do not read it).
ExitFn = Callable[[int, torch.Tensor, list[torch.Tensor], ExitHistory | None], tuple[torch.Tensor, torch.Tensor | None]]


class ExitSink(Protocol):
    """Receives the features of each exit in forward order."""

    #: How many samples the driver runs now: the rows the next exit's features must have.
    batch: int

    def add(self, k: int, feature: torch.Tensor) -> Step:
        """Take exit k's features ``[batch, D_k]``; say how the driver goes on."""
        ...


class FeatureSink:
    """Collects every exit's features and nothing else (what the feature cache stores).

    Args:
        batch: the input batch size.
        stop_after: the exit after which the backbone can stop (``None``: run it to its end, for its head).
    """

    def __init__(self, batch: int, stop_after: int | None) -> None:
        self.batch = batch
        self.stop_after = stop_after
        self.features: list[torch.Tensor] = []

    def add(self, k: int, feature: torch.Tensor) -> Step:
        self.features.append(feature)
        return STOP if k == self.stop_after else None


class ExitCollector:
    """Runs every exit on the whole batch and stacks their outputs (training, analysis, cost measurement).

    Args:
        exit_fn: computes one exit's logits and gate logit (the model's :meth:`~eexit.EarlyExitModel.exit_output`).
        num_exits: E; at exit E-1 the backbone has nothing left to compute.
        batch: the input batch size.
        gates: the gate kind, recorded in the output.
        with_history: carry the gates' view of earlier exits.
        on_exit: called after each exit (the cost table reads its FLOP counter there).
    """

    def __init__(
        self,
        exit_fn: ExitFn,
        num_exits: int,
        batch: int,
        gates: str,
        with_history: bool = False,
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        self.exit_fn = exit_fn
        self.num_exits = num_exits
        self.batch = batch
        self.gates = gates
        self.history = ExitHistory() if with_history else None
        self.on_exit = on_exit
        self.logits: list[torch.Tensor] = []
        self.gate_logits: list[torch.Tensor] = []

    def add(self, k: int, feature: torch.Tensor) -> Step:
        logits, gate_logit = self.exit_fn(k, feature, self.logits, self.history)
        if self.history is not None:
            self.history = self.history.after(logits)
        self.logits.append(logits)
        if gate_logit is not None:
            self.gate_logits.append(gate_logit)
        if self.on_exit is not None:
            self.on_exit()
        return STOP if k == self.num_exits - 1 else None

    def output(self, final_logits: torch.Tensor | None = None) -> AllExitsOutput:
        """Stack the exits' outputs; ``final_logits`` is the backbone head's, when it is the last exit."""
        logits = self.logits + ([final_logits] if final_logits is not None else [])
        if self.gate_logits:
            gate_logits = torch.stack(self.gate_logits)
        else:
            gate_logits = logits[0].new_zeros(0, logits[0].shape[0])
        return AllExitsOutput(logits=torch.stack(logits), gate_logits=gate_logits, gates=self.gates)


class ExitRecorder:
    """Real early exit's bookkeeping: which samples stop where, their outputs in input order, who goes on.

    At each exit it computes the exit on the running samples, asks the policy which stop (all of them at the last
    exit), writes their logits and exit index into the input-ordered outputs, and returns the positions of the
    rest. It reads the device once per exit (how many stopped).

    Args:
        exit_fn: computes one exit's logits and gate logit.
        num_exits: E.
        batch: the input batch size.
        device: where the outputs live.
        policy: which running samples stop at each intermediate exit.
        with_history: carry the gates' view of earlier exits.
        keep_earlier: carry the earlier exits' logits of the running samples (staged backbones read them).
    """

    def __init__(
        self,
        exit_fn: ExitFn,
        num_exits: int,
        batch: int,
        device: torch.device,
        policy: ExitPolicy,
        with_history: bool = False,
        keep_earlier: bool = False,
    ) -> None:
        self.exit_fn = exit_fn
        self.num_exits = num_exits
        self.policy = policy
        # A policy that says it never reads the running gate sums (reads_sums = False) spares their update per exit.
        self.track_sums = bool(getattr(policy, "reads_sums", True))
        self.keep_earlier = keep_earlier
        self.state = ExitState.start(batch, device, with_history=with_history)
        self.exit_index = torch.full((batch,), num_exits - 1, dtype=torch.long, device=device)
        self.logits: torch.Tensor | None = None  # [B, C], allocated at the first exit (its dtype)
        self.earlier: list[torch.Tensor] = []

    @property
    def batch(self) -> int:
        return self.state.positions.shape[0]

    def add(self, k: int, feature: torch.Tensor) -> Step:
        logits, gate_logit = self.exit_fn(k, feature, self.earlier, self.state.history)  # [b, C], [b]
        return self.decide(k, logits, gate_logit)

    def decide(self, k: int, logits: torch.Tensor, gate_logit: torch.Tensor | None) -> Step:
        """Exit k's outputs on the running samples are known: record who stops, say how the driver goes on.

        The segmented runner (:mod:`eexit.segments`) computes the exit itself and calls this directly.
        """
        state = self.state
        if k == self.num_exits - 1:
            self._write(state.positions, logits, k)
            return STOP
        stop = self.policy(k, logits, gate_logit, state)  # [b]
        stopped = int(stop.sum())  # the one host sync of this exit
        if stopped == stop.numel():
            self._write(state.positions, logits, k)
            return STOP
        if stopped:
            # Only samples that stop are written: nothing is gathered or scattered at an exit nobody takes.
            self._write(state.positions[stop], logits[stop], k)
        state.advance(gate_logit, logits, sums=self.track_sums)
        if self.keep_earlier:
            self.earlier.append(logits)
        if not stopped:
            return None  # nobody stopped: the driver goes on with the same samples
        keep = (~stop).nonzero().squeeze(1)
        state.keep(keep)
        if self.keep_earlier:
            self.earlier = [t.index_select(0, keep) for t in self.earlier]
        return keep

    def finish(self, final_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The input-ordered ``(logits [B, C], exit index [B])``.

        Args:
            final_logits: the backbone head's logits of the samples still running (hooked backbones with a head,
                whose last exit is the backbone's own output); ``None`` when every sample stopped at an exit.
        """
        if final_logits is not None:
            self._write(self.state.positions, final_logits, None)
        assert self.logits is not None, "the driver ran no exit and returned no logits"
        return self.logits, self.exit_index

    def _write(self, rows: torch.Tensor, logits: torch.Tensor, k: int | None) -> None:
        if self.logits is None:
            if rows.shape[0] == self.exit_index.shape[0]:
                # Everyone stops at the first exit that writes (always so at batch 1): its logits are the output
                # (a copy: a compiled segment's outputs may live in buffers its next call reuses).
                self.logits = logits.clone()
                if k is not None:
                    self.exit_index.fill_(k)
                return
            self.logits = logits.new_zeros(self.exit_index.shape[0], logits.shape[-1])
        self.logits[rows] = logits.to(self.logits.dtype)
        if k is not None:
            self.exit_index[rows] = k
