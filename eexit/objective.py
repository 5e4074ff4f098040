"""The JEI-DNN training objective as pure functions (Regol, Chataoui & Coates, ICLR 2024).

Notation (``reference/jei-dnn.md`` sections 1.5 and 3.2): E exits, B samples, C classes.

* cost of exiting at l:           C_il = CE(y_i, IM_l(x_i)) + λ·IC_l
* best exit:                      l*_i = argmin_l C_il
* gate (outer) targets:           paper gates: t_ij = 1 if j >= l*_i else 0 (a CDF), for the E-1 gates;
                                  hazard gates: h_ij = 1 if C_ij <= min_{m>j} C_im (exit j is the best of the
                                  exits still ahead), see hazard_targets
* gate loss:                      BCE-with-logits, positives of gate j weighted by r_j = min((N - n_j)/n_j, cap)
                                  with n_j the validation samples whose l* = j (recomputed each epoch),
                                  bounded below by 1/cap (see gate_pos_weights)
* IM (inner) loss:                Σ_l w_il·CE_il, with w from a weighting function (detached P(G=l|x) by default)

Users with their own training loop can call these directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "WEIGHTINGS",
    "depth_ic",
    "depth_weights",
    "exit_costs",
    "gate_loss",
    "gate_pos_weights",
    "gate_targets",
    "gate_weights",
    "hazard_targets",
    "im_loss",
    "mixed_weights",
    "optimal_exit",
    "per_exit_ce",
    "pos_weights_from_counts",
    "task_pos_weights",
    "uniform_weights",
]

#: A weighting maps the per-exit CE ``[E, B]`` and the exit probabilities ``[E, B]`` (or ``None``) to weights.
Weighting = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def per_exit_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every exit on every sample.

    Args:
        logits: ``[E, B, C]``.
        labels: ``[B]`` class indices.

    Returns:
        ``[E, B]``.
    """
    num_exits, batch, classes = logits.shape
    flat = F.cross_entropy(logits.reshape(-1, classes).float(), labels.repeat(num_exits), reduction="none")
    return flat.view(num_exits, batch)  # [E, B]


def exit_costs(ce: torch.Tensor, ic: torch.Tensor, lam: float) -> torch.Tensor:
    """C_il = CE_il + λ·IC_l.

    Args:
        ce: per-exit CE ``[E, B]``.
        ic: normalised inference cost of each exit ``[E]`` (the last is 1).
        lam: λ >= 0.
    """
    return ce + lam * ic.to(ce).unsqueeze(1)  # [E, B]


def depth_ic(blocks_run: Sequence[int]) -> torch.Tensor:
    """IC_l as a depth fraction d_l / d_last, with d_l the backbone blocks a sample runs to reach exit l.

    The JEI-DNN paper-time code priced exits this way ((l+1)/L, ``reference/jei-dnn.md`` §4 pitfall 2) while
    it evaluated with measured costs; offered for that ablation (``FitConfig(ic="depth")``).

    Args:
        blocks_run: ``[E]`` positive, non-decreasing block counts (e.g. block index + 1; the backbone's own head
            counts every block).

    Returns:
        ``[E]`` float32, the last entry 1.
    """
    runs = torch.as_tensor(list(blocks_run), dtype=torch.float64)  # [E]
    if runs.ndim != 1 or runs.numel() == 0 or bool((runs <= 0).any()) or bool((runs.diff() < 0).any()):
        raise ValueError(f"blocks_run must be positive and non-decreasing, got {runs.tolist()}")
    return (runs / runs[-1]).float()  # [E]


def optimal_exit(costs: torch.Tensor) -> torch.Tensor:
    """l*_i = argmin_l C_il (the earliest exit on ties), ``[E, B] -> [B]``."""
    return costs.argmin(dim=0)


def gate_targets(best_exit: torch.Tensor, num_exits: int) -> torch.Tensor:
    """Cumulative surrogate targets: gate j should fire (1) for every j >= l*.

    Args:
        best_exit: l* per sample ``[B]``.
        num_exits: E.

    Returns:
        ``[E-1, B]`` float targets; a sample whose best exit is the last one has all zeros.
    """
    gates = torch.arange(num_exits - 1, device=best_exit.device).unsqueeze(1)  # [E-1, 1]
    return (gates >= best_exit.unsqueeze(0)).float()  # [E-1, B]


def hazard_targets(costs: torch.Tensor) -> torch.Tensor:
    """Hazard targets: gate j should fire (1) when exit j is the best of the exits j, j+1, ... still ahead.

    h_ij = [C_ij <= min_{m>j} C_im], ties going to the earlier exit as in :func:`optimal_exit`. A calibrated
    hazard gate estimates P(exit here is best | the sample got here), which is what the product model and the rule
    "exit when h_j >= τ" read (``eexit.gates``). The first gate that fires on these targets is at l*.

    Args:
        costs: C_il ``[E, B]`` from :func:`exit_costs`.

    Returns:
        ``[E-1, B]`` float targets.
    """
    if costs.shape[0] < 2:
        return costs.new_zeros(0, costs.shape[1])
    # min over the later exits m > j: a reverse cumulative minimum, [E-1, B]
    later = torch.flip(torch.cummin(torch.flip(costs[1:], dims=[0]), dim=0).values, dims=[0])
    return (costs[:-1] <= later).float()  # [E-1, B]


def task_pos_weights(
    targets: torch.Tensor,
    weights: torch.Tensor | None = None,
    cap: float = 5.0,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """r_j = clamp(negatives_j / positives_j, 1/cap, cap) of gate j's own targets (``pos_weight="task"``).

    Unlike :func:`gate_pos_weights` (the authors' counts of l* = j), these are the counts of the task gate j is
    trained on, on the samples the loss sees (optionally weighted).

    Args:
        targets: ``[E-1, B]`` 0/1 targets.
        weights: optional ``[E-1, B]`` sample weights.
        cap: bound of the ratio.
        reduce: sums the ``[2, E-1]`` positive/negative counts over the processes of a distributed fit, so
            every rank uses the global batch's ratio.
    """
    w = torch.ones_like(targets) if weights is None else weights.to(targets)
    counts = torch.stack([(w * targets).sum(dim=1), (w * (1 - targets)).sum(dim=1)])  # [2, E-1]
    if reduce is not None:
        counts = reduce(counts)
    return (counts[1] / counts[0].clamp(min=1e-6)).clamp(min=1.0 / cap, max=cap)  # [E-1]


def gate_pos_weights(best_exit: torch.Tensor, num_exits: int, cap: float = 5.0) -> torch.Tensor:
    """Positive weights r_j = clamp((N - n_j) / n_j, 1/cap, cap) of the E-1 gates, n_j floored at 0.1.

    As in the authors' code, n_j counts the samples whose best exit is exactly j (not those with l* <= j),
    which pushes up the gates that are rarely the optimum. The authors' formula has no lower bound: when every
    sample's best exit is j, r_j = 0 and gate j gets no signal from its (all positive) targets, so it never
    learns to fire where it should. We bound r_j below by 1/cap, symmetric to the cap.
    """
    counts = torch.bincount(best_exit.flatten(), minlength=num_exits).float()  # [E]
    return pos_weights_from_counts(counts, cap)


def pos_weights_from_counts(counts: torch.Tensor, cap: float = 5.0) -> torch.Tensor:
    """:func:`gate_pos_weights` from the counts of l* = j over all E exits (summed over the ranks of a distributed
    fit), ``[E]`` -> ``[E-1]``."""
    total = float(counts.sum())
    counts = counts[:-1].float().clamp(min=0.1)
    return ((total - counts) / counts).clamp(min=1.0 / cap, max=cap)  # [E-1]


def gate_loss(gate_logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted BCE of the gates, averaged over every (gate, sample) pair.

    Args:
        gate_logits: ``[E-1, B]`` pre-sigmoid gate outputs.
        targets: ``[E-1, B]`` from :func:`gate_targets`.
        pos_weight: ``[E-1]`` weight of the positives of each gate, or ``None`` for 1.
    """
    weight = None
    if pos_weight is not None:
        weight = 1.0 + (pos_weight.to(gate_logits).unsqueeze(1) - 1.0) * targets  # [E-1, B]
    return F.binary_cross_entropy_with_logits(gate_logits.float(), targets.float(), weight=weight)


def uniform_weights(ce: torch.Tensor, exit_probs: torch.Tensor | None = None) -> torch.Tensor:
    """Weight 1/E for every exit: the plain mean CE (what the authors' released code computes in effect)."""
    return torch.full_like(ce, 1.0 / ce.shape[0])


def gate_weights(ce: torch.Tensor, exit_probs: torch.Tensor | None = None) -> torch.Tensor:
    """The detached P(G=l|x): each IM learns most from the samples that will exit there (the paper's intent)."""
    if exit_probs is None:
        raise ValueError("gate_weights needs the exit probabilities")
    return exit_probs.detach().to(ce)


def mixed_weights(ce: torch.Tensor, exit_probs: torch.Tensor | None = None, beta: float = 0.5) -> torch.Tensor:
    """(1 - β)/E + β·P(G=l|x), detached and not renormalised per sample (``im_weighting="mixed"``).

    Every IM keeps a floor (1 - β)/E of every sample, so the late IMs that few samples reach do not starve, and
    a sample certain to exit at l still pushes the other IMs only by that floor.
    """
    if exit_probs is None:
        raise ValueError("mixed_weights needs the exit probabilities")
    return (1.0 - beta) / ce.shape[0] + beta * exit_probs.detach().to(ce)


def depth_weights(ce: torch.Tensor, exit_probs: torch.Tensor | None = None) -> torch.Tensor:
    """Warm-up weights: IM l gets (E - l) for l = 0..E-1, normalised to sum to 1 (earlier IMs weigh more)."""
    num_exits = ce.shape[0]
    w = torch.arange(num_exits, 0, -1, dtype=ce.dtype, device=ce.device)  # [E]
    return (w / w.sum()).unsqueeze(1).expand_as(ce)


WEIGHTINGS: dict[str, Weighting] = {
    "uniform": uniform_weights,
    "gate": gate_weights,
    "mixed": mixed_weights,
    "depth": depth_weights,
}


def im_loss(ce: torch.Tensor, weights: torch.Tensor, trainable: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_l w_il·CE_il, averaged over samples.

    Args:
        ce: ``[E, B]``.
        weights: ``[E, B]`` (no gradient expected).
        trainable: optional ``[E]`` bool mask; exits that cannot learn (a frozen backbone head) are left out.
    """
    if trainable is not None:
        weights = weights * trainable.to(weights).unsqueeze(1)
    return (weights * ce).sum(dim=0).mean()
