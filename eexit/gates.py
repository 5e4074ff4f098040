"""Gates and the additive exit-probability model of JEI-DNN.

Regol, Chataoui & Coates, "Jointly Learning to Exit and Infer in Dynamic Neural Networks", ICLR 2024
(section 1 of ``reference/jei-dnn.md``):

* gate l sees four statistics of IM l's softmax, detached: max probability, entropy, top-2 margin and the
  entropy of p²/Σp² (softmax at temperature 1/2); g_l = sigmoid(w·s + b);
* P(G=1) = g_1, P(G=l) = max(0, min(g_l, 1 - Σ_{j<l} g_j)) with the *raw* g_j, the last exit takes the rest;
* at inference a sample exits at the first l where P(G=l) / P(G>=l) >= threshold (0.5 in the paper).

The statistics are computed in torch on the IM's device; the authors' code went through numpy on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .config import GATE_FEATURES

__all__ = ["Gate", "conditional_exit_probability", "exit_probabilities", "gate_statistics"]


def gate_statistics(logits: torch.Tensor, features: Sequence[str] = GATE_FEATURES) -> torch.Tensor:
    """The gate inputs of each sample, computed without gradient.

    Args:
        logits: IM logits ``[B, C]``.
        features: which statistics, in order (names from ``eexit.config.GATE_FEATURES``).

    Returns:
        ``[B, len(features)]`` in the logits' dtype.
    """
    with torch.no_grad():
        logits = logits.detach().float()
        logp = torch.log_softmax(logits, dim=-1)  # [B, C]
        p = logp.exp()
        stats: dict[str, torch.Tensor] = {}
        if "max_prob" in features or "margin" in features:
            top = p.topk(min(2, p.shape[-1]), dim=-1).values  # [B, 2]
            stats["max_prob"] = top[:, 0]
            stats["margin"] = top[:, 0] - top[:, 1] if top.shape[-1] > 1 else top[:, 0]
        if "entropy" in features:
            stats["entropy"] = -(p * logp).sum(-1)  # [B]
        if "entropy_pow" in features:
            # p²/Σp² is softmax(2·logits): computing it that way stays finite where p² would underflow.
            logp2 = torch.log_softmax(2.0 * logits, dim=-1)
            stats["entropy_pow"] = -(logp2.exp() * logp2).sum(-1)  # [B]
        return torch.stack([stats[name] for name in features], dim=-1)  # [B, F]


class Gate(nn.Module):
    """One exit gate: ``Linear(F, 1)`` on the detached softmax statistics of its IM.

    ``forward`` returns the gate *logit* (so the BCE can use the stable ``with_logits`` form); the gate value
    is ``g = sigmoid(logit)``.
    """

    def __init__(self, features: Sequence[str] = GATE_FEATURES) -> None:
        super().__init__()
        self.features = tuple(features)
        self.linear = nn.Linear(len(self.features), 1)

    def forward(self, im_logits: torch.Tensor) -> torch.Tensor:
        stats = gate_statistics(im_logits, self.features).to(self.linear.weight.dtype)  # [B, F]
        return self.linear(stats).squeeze(-1)  # [B]


def exit_probabilities(gate_values: torch.Tensor) -> torch.Tensor:
    """P(G=l|x) for every exit under the additive min() model.

    Args:
        gate_values: g_l = sigmoid(gate logit) for the first E-1 exits, ``[E-1, B]``.

    Returns:
        ``[E, B]``, each column summing to 1.
    """
    if gate_values.shape[0] == 0:
        return torch.ones(1, gate_values.shape[1], dtype=gate_values.dtype, device=gate_values.device)
    cumulative = torch.cumsum(gate_values, dim=0)  # [E-1, B]
    before = torch.cat([torch.zeros_like(gate_values[:1]), cumulative[:-1]], dim=0)  # Σ_{j<l} g_j, [E-1, B]
    probs = torch.clamp(torch.minimum(gate_values, 1.0 - before), min=0.0)  # [E-1, B]
    last = torch.clamp(1.0 - probs.sum(dim=0, keepdim=True), min=0.0)  # [1, B]
    return torch.cat([probs, last], dim=0)  # [E, B]


def conditional_exit_probability(
    gate_value: torch.Tensor, gate_sum: torch.Tensor, prob_sum: torch.Tensor
) -> torch.Tensor:
    """P(G=l) / P(G>=l) at one exit, from the running sums of the exits before it.

    Args:
        gate_value: g_l, ``[B]``.
        gate_sum: Σ_{j<l} g_j (raw gate values), ``[B]``.
        prob_sum: Σ_{j<l} P(G=j), ``[B]``.

    Returns:
        ``[B]`` in [0, 1]. Where nothing is left to exit with (P(G>=l) = 0) it is 1: the sample must stop.
    """
    p_here = torch.clamp(torch.minimum(gate_value, 1.0 - gate_sum), min=0.0)  # [B]
    remaining = 1.0 - prob_sum  # [B]
    safe = remaining.clamp(min=1e-12)
    return torch.where(remaining > 1e-12, (p_here / safe).clamp(max=1.0), torch.ones_like(p_here))
