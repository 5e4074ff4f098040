"""What an early-exit model returns: :class:`EarlyExitOutput` (real early exit) and :class:`AllExitsOutput`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .gates import exit_probabilities

__all__ = ["AllExitsOutput", "EarlyExitOutput"]


@dataclass
class EarlyExitOutput:
    """Result of an early-exit forward, in input order.

    Attributes:
        logits: the prediction of the exit each sample took, ``[B, C]``.
        exit_index: 0-based exit each sample took, ``[B]`` (E-1 is the last exit).
        cost: FLOPs each sample used, from the cost table, ``[B]`` (float64).
    """

    logits: torch.Tensor
    exit_index: torch.Tensor
    cost: torch.Tensor

    @property
    def gflops(self) -> torch.Tensor:
        return self.cost / 1e9


@dataclass
class AllExitsOutput:
    """Every exit's output on every sample.

    Attributes:
        logits: ``[E, B, C]``, the last row from the backbone's own head when it has one.
        gate_logits: pre-sigmoid gate outputs of the E-1 intermediate exits, ``[E-1, B]``.
        gates: the gate kind (``ExitConfig.gates``), which says how gate values make exit probabilities.
    """

    logits: torch.Tensor
    gate_logits: torch.Tensor
    gates: str = "hazard"

    @property
    def gate_values(self) -> torch.Tensor:
        return torch.sigmoid(self.gate_logits)  # [E-1, B]

    @property
    def exit_probs(self) -> torch.Tensor:
        """P(G=l|x) under the gates' exit-probability model, ``[E, B]``."""
        return exit_probabilities(self.gate_values, self.gates)
