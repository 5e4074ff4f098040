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

from .config import GATE_KINDS
from .errors import EexitValueError
from .gates import ExitHistory, conditional_exit_probability

__all__ = ["ExitPolicy", "ExitState", "FixedExitPolicy", "GatePolicy", "ThresholdPolicy", "decide_exits"]


@dataclass
class ExitState:
    """What a policy may read about the samples still running at an exit.

    Attributes:
        positions: index of each running sample in the input batch, ``[b]``.
        gate_sum: Σ_{j<l} g_j over the gates passed so far, ``[b]``.
        prob_sum: Σ_{j<l} P(G=j) over the exits passed so far under the additive (paper) model, ``[b]``.
        history: what the gates read about the exits passed so far (kept only for gates that read it, and only
            on the hooked path: a model run as segments carries it inside the segments, and here it is ``None``).
    """

    positions: torch.Tensor
    gate_sum: torch.Tensor
    prob_sum: torch.Tensor
    history: ExitHistory | None = None

    @classmethod
    def start(cls, batch: int, device: torch.device, with_history: bool = False) -> ExitState:
        zeros = torch.zeros(batch, device=device)
        return cls(torch.arange(batch, device=device), zeros, zeros.clone(), ExitHistory() if with_history else None)

    def advance(self, gate_logit: torch.Tensor | None, logits: torch.Tensor | None = None, sums: bool = True) -> None:
        """Add this exit's gate value and exit probability to the running sums (all running samples).

        Args:
            gate_logit: this exit's gate logits ``[b]`` (``None`` at the last exit).
            logits: this exit's IM logits ``[b, C]``, recorded in the history when the gates read it.
            sums: update ``gate_sum`` and ``prob_sum`` (skipped for policies that never read them).
        """
        if self.history is not None and logits is not None:
            self.history = self.history.after(logits)
        if gate_logit is None or not sums:
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
        if self.history is not None:
            self.history = self.history.select(index)


class ExitPolicy(Protocol):
    """Decides which running samples stop at intermediate exit ``exit_index`` (never called at the last).

    A policy may set ``reads_sums = False`` to say it never reads ``state.gate_sum`` / ``state.prob_sum`` (the
    recorder then does not update them), and ``reads_gates = False`` to say it never reads ``gate_logit``: a model
    run as eager segments then skips the gates and passes ``None`` (a few dozen small ops per exit, which count at
    batch 1); the hooked, compiled and exported paths still compute them and pass the real values.
    """

    def __call__(
        self, exit_index: int, logits: torch.Tensor, gate_logit: torch.Tensor | None, state: ExitState
    ) -> torch.Tensor:
        """Return a bool mask ``[b]``: True where the sample exits here."""
        ...


class GatePolicy:
    """JEI-DNN's deterministic rule: exit at the first l with P(G=l) / P(G>=l) >= threshold τ.

    P(G=l) / P(G>=l) comes from the gates' exit-probability model: for hazard gates it is the gate value h_l
    itself, for paper gates the additive model's ratio (``eexit.gates``). The model's own policy is
    ``ee.default_policy()``; a policy whose ``gates`` differ from the model's is refused by the forward.

    Args:
        threshold: τ in (0, 1].
        gates: the gate kind the model was built with (``ee.config.gates``).
    """

    def __init__(self, threshold: float = 0.5, gates: str = "hazard") -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
            raise EexitValueError(
                f"threshold (τ) must be in (0, 1], got {threshold!r}; τ = 1 keeps every sample to the last exit."
            )
        if gates not in GATE_KINDS:
            raise EexitValueError(f"gates={gates!r} is not a gate kind; expected one of {list(GATE_KINDS)}.")
        self.threshold = float(threshold)
        self.gates = gates

    @property
    def reads_sums(self) -> bool:
        """Only the additive (paper) model's ratio reads the running sums; the early-exit forward skips them else."""
        return self.gates == "paper"

    def score(
        self, exit_index: int, logits: torch.Tensor, gate_logit: torch.Tensor | None, state: ExitState
    ) -> torch.Tensor:
        """P(G=l) / P(G>=l) of the running samples at this exit, ``[b]``, the quantity compared with τ."""
        if gate_logit is None:
            raise EexitValueError("GatePolicy needs gates; this model has none at this exit.")
        g = torch.sigmoid(gate_logit.float())  # [b]
        if self.gates == "hazard":
            return g
        return conditional_exit_probability(g, state.gate_sum, state.prob_sum)

    def __call__(
        self, exit_index: int, logits: torch.Tensor, gate_logit: torch.Tensor | None, state: ExitState
    ) -> torch.Tensor:
        return self.score(exit_index, logits, gate_logit, state) >= self.threshold

    def __repr__(self) -> str:
        return f"GatePolicy(threshold={self.threshold:g}, gates={self.gates!r})"


class ThresholdPolicy:
    """Confidence-threshold exits (BranchyNet / MSDNet): exit where max softmax probability >= η_l."""

    #: Reads neither the gates nor their running sums (eager segments then skip the gates).
    reads_sums = False
    reads_gates = False

    def __init__(self, thresholds: Sequence[float] | torch.Tensor) -> None:
        self.thresholds = torch.as_tensor(thresholds, dtype=torch.float64)

    def __call__(
        self, exit_index: int, logits: torch.Tensor, gate_logit: torch.Tensor | None, state: ExitState
    ) -> torch.Tensor:
        # float64 like eexit.baselines.thresholds, so fitted thresholds select exactly the samples they were fit on
        confidence = torch.softmax(logits.double(), dim=-1).amax(dim=-1)  # [b]
        return confidence >= self.thresholds[exit_index].to(confidence.device)


class FixedExitPolicy:
    """Each sample exits at a given exit index (for benchmarks and tests of the exit machinery).

    Args:
        exit_index: the exit of each sample of the batch, ``[B]``.
        reads_gates: whether the forward should still compute the gates (a benchmark that wants their cost in).
    """

    reads_sums = False

    def __init__(self, exit_index: torch.Tensor, reads_gates: bool = False) -> None:
        self.exit_index = exit_index.long()
        self.reads_gates = reads_gates

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
