"""Gates and the two exit-probability models of JEI-DNN.

Regol, Chataoui & Coates, "Jointly Learning to Exit and Infer in Dynamic Neural Networks", ICLR 2024
(section 1 of ``reference/jei-dnn.md``). Gate l is ``Linear(F, 1)`` + sigmoid on detached statistics of the
exits a sample has seen; the rule is the paper's in both models: exit at the first l where
P(G=l) / P(G>=l) >= τ. What differs is what g_l means (DESIGN.md, "the gate formulations"):

* ``"paper"``, the additive model: P(G=1) = g_1, P(G=l) = max(0, min(g_l, 1 - Σ_{j<l} g_j)) with the *raw*
  g_j, the last exit takes the rest. Its gates are trained on CDF targets [j >= l*], so the model and the
  targets disagree: once Σ g_j reaches 1 every sample is forced out (kept exactly, for reproduction);
* ``"hazard"``, the product model: g_l = h_l estimates P(exit l is the best of the exits l, l+1, ...); then
  P(G=l) = h_l Π_{j<l}(1 - h_j) and P(G=l) / P(G>=l) = h_l, so "exit when h_l >= τ" is the same rule, consistent
  with the targets, and τ reaches every cost from the first exit's (τ -> 0) to the backbone's (τ = 1).

Gate inputs (``GATE_FEATURES`` of the paper, plus ``HISTORY_FEATURES`` that read the exits passed before, which a
confidence threshold cannot use) are computed in torch on the IM's device; the authors' code went through
numpy on the CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import GATE_FEATURES, HISTORY_FEATURES

__all__ = [
    "ExitHistory",
    "Gate",
    "conditional_exit_probability",
    "exit_probabilities",
    "gate_statistics",
    "hazard_exit_probabilities",
]


@dataclass
class ExitHistory:
    """What a gate may read about the exits a sample passed before the current one (all detached).

    Attributes:
        log_probs: log-softmax of the previous exit, ``[b, C]`` (``None`` before the first exit).
        run: how many consecutive exits before the previous one agreed with its argmax, ``[b]`` float.
    """

    log_probs: torch.Tensor | None = None
    run: torch.Tensor | None = None

    def after(self, logits: torch.Tensor) -> ExitHistory:
        """The history the next exit sees once the running samples have passed an exit with ``logits`` [b, C]."""
        with torch.no_grad():
            return self.after_log_probs(torch.log_softmax(logits.detach().float(), dim=-1))

    def after_log_probs(self, logp: torch.Tensor) -> ExitHistory:
        """:meth:`after`, from the exit's log-softmax ``[b, C]`` float32 when the caller has it already."""
        return ExitHistory(logp, _agree_run(logp, self))

    def select(self, index: torch.Tensor) -> ExitHistory:
        """Keep the samples at ``index`` (positions in the running batch)."""
        if self.log_probs is None or self.run is None:
            return self
        return ExitHistory(self.log_probs.index_select(0, index), self.run.index_select(0, index))


def _agree_run(logp: torch.Tensor, history: ExitHistory) -> torch.Tensor:
    """Consecutive earlier exits whose argmax equals this exit's, ``[b]`` float (0 at the first exit)."""
    if history.log_probs is None or history.run is None:
        return logp.new_zeros(logp.shape[0])
    agree = (logp.argmax(-1) == history.log_probs.argmax(-1)).float()  # [b]
    return agree * (1.0 + history.run)


def gate_statistics(
    logits: torch.Tensor, features: Sequence[str] = GATE_FEATURES, history: ExitHistory | None = None
) -> torch.Tensor:
    """The gate inputs of each sample, computed without gradient.

    Args:
        logits: IM logits ``[B, C]``.
        features: which statistics, in order (names from ``eexit.config.GATE_FEATURES`` and
            ``HISTORY_FEATURES``).
        history: the exits passed before this one (needed by the history features; ``None`` at the first exit,
            where they are 0).

    Returns:
        ``[B, len(features)]`` float32.
    """
    with torch.no_grad():
        logits = logits.detach().float()
        return _statistics(logits, features, history)[0]


def _statistics(
    logits: torch.Tensor, features: Sequence[str], history: ExitHistory | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`gate_statistics` from float32 ``logits`` ``[B, C]``, with the log-softmax ``[B, C]`` and the agreement
    run ``[B]`` it computed on the way (``None`` when no history feature asked for it), which the next exit's
    history reuses (at batch 1 each small op's dispatch costs more than its arithmetic: none is done twice).
    """
    stats: dict[str, torch.Tensor] = {}
    run = None
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    if "entropy" in features:
        stats["entropy"] = -(p * logp).sum(-1)  # [B]
    if "entropy_pow" in features:
        # p²/Σp² is softmax(2·logits): computing it that way stays finite where p² would underflow.
        logp2 = torch.log_softmax(2.0 * logits, dim=-1)
        stats["entropy_pow"] = -(logp2.exp() * logp2).sum(-1)  # [B]
    if any(f in HISTORY_FEATURES for f in features):
        history_stats, run = _history_statistics(logp, p, history or ExitHistory())
        stats.update(history_stats)
    if "max_prob" in features or "margin" in features:
        top = p.topk(min(2, p.shape[-1]), dim=-1).values  # [B, 2]
        stats["max_prob"] = top[:, 0]
        stats["margin"] = top[:, 0] - top[:, 1] if top.shape[-1] > 1 else top[:, 0]
    return torch.stack([stats[name] for name in features], dim=-1), logp, run  # [B, F], [B, C], [B]


def _history_statistics(
    logp: torch.Tensor, p: torch.Tensor, history: ExitHistory
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Agreement and confidence across exits: what a per-exit confidence threshold cannot see; and the run."""
    if history.log_probs is None:
        zeros = logp.new_zeros(logp.shape[0])
        return {"prev_max_prob": zeros, "agree_prev": zeros, "agree_run": zeros, "kl_prev": zeros}, zeros
    prev = history.log_probs  # [B, C]
    run = _agree_run(logp, history)  # [B]
    stats = {
        "prev_max_prob": prev.exp().amax(-1),
        "agree_prev": (run > 0).float(),
        "agree_run": run,
        "kl_prev": (p * (logp - prev)).sum(-1).clamp(min=0.0),  # KL(p_l || p_{l-1})
    }
    return stats, run


class Gate(nn.Module):
    """One exit gate: ``Linear(F, 1)`` on detached statistics of its IM (and of the exits before it).

    ``forward`` returns the gate *logit* (so the BCE can use the stable ``with_logits`` form); the gate value
    is ``g = sigmoid(logit)``. Gates fitted by the exact solver fold their input standardisation into the
    Linear, so a gate is always just these F + 1 numbers.
    """

    def __init__(self, features: Sequence[str] = GATE_FEATURES) -> None:
        super().__init__()
        self.features = tuple(features)
        self.uses_history = any(f in HISTORY_FEATURES for f in self.features)
        self.linear = nn.Linear(len(self.features), 1)

    def forward(self, im_logits: torch.Tensor, history: ExitHistory | None = None) -> torch.Tensor:
        stats = gate_statistics(im_logits, self.features, history).to(self.linear.weight.dtype)  # [B, F]
        return self.linear(stats).squeeze(-1)  # [B]

    def step(self, im_logits: torch.Tensor, history: ExitHistory | None) -> tuple[torch.Tensor, ExitHistory | None]:
        """The gate logit ``[B]`` and the history the next exit sees, from one log-softmax of the IM's logits.

        What ``forward`` and ``history.after`` compute, with the same numbers, without computing the log-softmax
        and the agreement run twice (the early-exit forward and the exported segments). ``history`` is ``None``
        when the gates read no earlier exit; then ``None`` comes back.
        """
        with _no_grad():
            stats, logp, run = _statistics(im_logits.detach().float(), self.features, history)
            after = None
            if history is not None:
                after = ExitHistory(logp, run if run is not None else _agree_run(logp, history))
        return self.linear(stats.to(self.linear.weight.dtype)).squeeze(-1), after


def _no_grad() -> Any:
    # Entering no_grad costs a few microseconds per exit; under inference_mode / no_grad it is already off.
    return torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext()


def hazard_exit_probabilities(gate_values: torch.Tensor) -> torch.Tensor:
    """P(G=l|x) for every exit under the product (hazard) model: h_l Π_{j<l}(1 - h_j), the last takes the rest.

    Args:
        gate_values: h_l = sigmoid(gate logit) for the first E-1 exits, ``[E-1, B]``.

    Returns:
        ``[E, B]``, each column summing to 1.
    """
    ones = gate_values.new_ones(1, gate_values.shape[1])
    survive = torch.cumprod(torch.cat([ones, 1.0 - gate_values], dim=0), dim=0)  # P(G >= l), [E, B]
    return torch.cat([gate_values * survive[:-1], survive[-1:]], dim=0)  # [E, B]


def exit_probabilities(gate_values: torch.Tensor, gates: str = "paper") -> torch.Tensor:
    """P(G=l|x) for every exit under the additive min() model (``gates="paper"``) or the product model.

    Args:
        gate_values: g_l = sigmoid(gate logit) for the first E-1 exits, ``[E-1, B]``.

    Returns:
        ``[E, B]``, each column summing to 1.
    """
    if gates == "hazard":
        return hazard_exit_probabilities(gate_values)
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
