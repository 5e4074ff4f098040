"""Exit policies and the "run everything, then decide" reference.

A policy answers, at one exit, which of the samples still running stop there. The same policy object drives
both the real early-exit forward (where the batch shrinks as samples stop, see :mod:`eexit.model`) and
:func:`decide_exits`, which replays the decisions on the outputs of every exit; the two must agree, and the
tests check that they do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .errors import EexitValueError
from .gates import conditional_exit_probability

__all__ = ["ExitPolicy", "ExitState", "FixedExitPolicy", "GatePolicy", "ThresholdPolicy", "decide_exits"]


@dataclass
class ExitState:
    """What a policy may read about the samples still running at an exit.

    Attributes:
        positions: index of each running sample in the input batch, ``[b]``.
        gate_sum: Σ_{j<l} g_j over the gates passed so far, ``[b]``.
        prob_sum: Σ_{j<l} P(G=j) over the exits passed so far, ``[b]``.
    """

    positions: torch.Tensor
    gate_sum: torch.Tensor
    prob_sum: torch.Tensor

    @classmethod
    def start(cls, batch: int, device: torch.device) -> ExitState:
        zeros = torch.zeros(batch, device=device)
        return cls(torch.arange(batch, device=device), zeros, zeros.clone())

    def advance(self, gate_logit: torch.Tensor | None) -> None:
        """Add this exit's gate value and exit probability to the running sums (all running samples)."""
        if gate_logit is None:
            return
        g = torch.sigmoid(gate_logit.float())  # [b]
        p_here = torch.clamp(torch.minimum(g, 1.0 - self.gate_sum), min=0.0)
        self.gate_sum = self.gate_sum + g
        self.prob_sum = self.prob_sum + p_here

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the samples at ``index`` (positions in the current running batch)."""
        self.positions = self.positions.index_select(0, index)
        self.gate_sum = self.gate_sum.index_select(0, index)
        self.prob_sum = self.prob_sum.index_select(0, index)


class ExitPolicy(Protocol):
    """Decides which running samples stop at intermediate exit ``exit_index`` (never called at the last)."""

    def __call__(
        self, exit_index: int, logits: torch.Tensor, gate_logit: torch.Tensor | None, state: ExitState
    ) -> torch.Tensor:
        """Return a bool mask ``[b]``: True where the sample exits here."""
        ...


class GatePolicy:
    """JEI-DNN's deterministic rule: exit at the first l with P(G=l) / P(G>=l) >= threshold."""

    def __init__(self, threshold: float = 0.5) -> None:
        if not 0.0 < threshold <= 1.0:
            raise EexitValueError(f"threshold must be in (0, 1], got {threshold}.")
        self.threshold = threshold

    def __call__(
        self, exit_index: int, logits: torch.Tensor, gate_logit: torch.Tensor | None, state: ExitState
    ) -> torch.Tensor:
        if gate_logit is None:
            raise EexitValueError("GatePolicy needs gates; this model has none at this exit.")
        g = torch.sigmoid(gate_logit.float())
        return conditional_exit_probability(g, state.gate_sum, state.prob_sum) >= self.threshold


class ThresholdPolicy:
    """Confidence-threshold exits (BranchyNet / MSDNet): exit where max softmax probability >= η_l."""

    def __init__(self, thresholds: Sequence[float] | torch.Tensor) -> None:
        self.thresholds = torch.as_tensor(thresholds, dtype=torch.float64)

    def __call__(
        self, exit_index: int, logits: torch.Tensor, gate_logit: torch.Tensor | None, state: ExitState
    ) -> torch.Tensor:
        # float64 like eexit.baselines.thresholds, so fitted thresholds select exactly the samples they were fit on
        confidence = torch.softmax(logits.double(), dim=-1).amax(dim=-1)  # [b]
        return confidence >= self.thresholds[exit_index].to(confidence.device)


class FixedExitPolicy:
    """Each sample exits at a given exit index (for benchmarks and tests of the exit machinery)."""

    def __init__(self, exit_index: torch.Tensor) -> None:
        self.exit_index = exit_index.long()

    def __call__(
        self, exit_index: int, logits: torch.Tensor, gate_logit: torch.Tensor | None, state: ExitState
    ) -> torch.Tensor:
        return self.exit_index.to(state.positions.device)[state.positions] <= exit_index


def decide_exits(logits: torch.Tensor, gate_logits: torch.Tensor | None, policy: ExitPolicy) -> torch.Tensor:
    """Replay a policy on the outputs of every exit.

    Args:
        logits: every exit's logits ``[E, B, C]``.
        gate_logits: ``[E-1, B]`` (or ``None`` for a policy that does not read gates).
        policy: the exit policy.

    Returns:
        The exit index of each sample ``[B]``; samples no intermediate exit took get E-1.
    """
    num_exits, batch = logits.shape[:2]
    exit_index = torch.full((batch,), num_exits - 1, dtype=torch.long, device=logits.device)
    state = ExitState.start(batch, logits.device)
    for k in range(num_exits - 1):
        gate = gate_logits[k, state.positions] if gate_logits is not None else None
        stop = policy(k, logits[k, state.positions], gate, state)  # [b]
        exit_index[state.positions[stop]] = k
        state.advance(gate)
        state.keep((~stop).nonzero().squeeze(1))
        if state.positions.numel() == 0:
            break
    return exit_index
