"""The exact gate phase: every gate refitted to the optimum of its JEI-DNN gate loss (``FitConfig(gate_fit="exact")``).

A gate is ``Linear(F, 1)`` + sigmoid on *detached* statistics of the exits (``eexit.gates``), so with the IMs
held fixed the gate loss of JEI-DNN (a weighted binary cross-entropy against λ-priced targets) is convex in each
gate's F + 1 numbers. Instead of K stochastic steps per gate phase, :func:`fit_gates_exact` solves it: inputs
standardised on the data, L-BFGS in float64 with a small L2 term (the targets can be separable), then the
standardisation folded back into the Linear, so the saved gate is the same F + 1 numbers as ever.

For hazard gates, gate j only decides for the samples that reach it, so its samples are weighted by their
probability of reaching j under the gates fitted before it, Π_{m<j}(1 - h_m) (the gates are fitted in order).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .config import FitConfig
from .gates import ExitHistory, gate_statistics
from .model import AllExitsOutput, EarlyExitModel
from .objective import (
    exit_costs,
    gate_pos_weights,
    gate_targets,
    hazard_targets,
    optimal_exit,
    per_exit_ce,
    task_pos_weights,
)

__all__ = ["GateProblem", "fit_gates_exact", "gate_problem"]

#: L2 penalty on the standardised weights: keeps separable targets finite, too small to bias real fits.
_L2 = 1e-4


@dataclass
class GateProblem:
    """What the gates are fitted on: their inputs, and the per-exit costs that make the targets.

    Attributes:
        inputs: gate inputs ``[E-1, N, F]`` (float64).
        costs: C_il = CE_il + λ·IC_l ``[E, N]`` (float64).
    """

    inputs: torch.Tensor
    costs: torch.Tensor


@torch.no_grad()
def gate_problem(
    ee: EarlyExitModel,
    batches: Iterator[tuple[AllExitsOutput, torch.Tensor]] | Iterable[tuple[AllExitsOutput, torch.Tensor]],
    price: torch.Tensor,
    lam: float,
) -> GateProblem:
    """Collect every gate's inputs and every exit's cost over a split (all-exit outputs and labels per batch)."""
    features = ee.gates[0].features
    inputs, costs = [], []
    for out, labels in batches:
        history = ExitHistory() if ee.uses_history else None
        per_gate = []
        for k in range(ee.num_exits - 1):
            per_gate.append(gate_statistics(out.logits[k], features, history).double())  # [b, F]
            if history is not None:
                history = history.after(out.logits[k])
        inputs.append(torch.stack(per_gate))  # [E-1, b, F]
        ce = per_exit_ce(out.logits.detach(), labels)  # [E, b]
        costs.append(exit_costs(ce, price.to(ce.device), lam).double())
    return GateProblem(torch.cat(inputs, dim=1).cpu(), torch.cat(costs, dim=1).cpu())


def _solve(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Weighted logistic regression on raw inputs ``x`` [N, F]: returns (weight [F], bias) on the raw scale."""
    mean = (w.unsqueeze(1) * x).sum(0) / w.sum()
    std = ((w.unsqueeze(1) * (x - mean) ** 2).sum(0) / w.sum()).sqrt()
    constant = std < 1e-8  # e.g. the history features at the first exit: no information, weight 0
    std = torch.where(constant, torch.ones_like(std), std)
    z = torch.where(constant, torch.zeros_like(x), (x - mean) / std)  # [N, F]
    params = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    prior = (w * y).sum() / w.sum()
    with torch.no_grad():  # start at the base rate: L-BFGS then only has the slopes to find
        params[-1] = torch.logit(prior.clamp(1e-6, 1 - 1e-6))
    optimizer = torch.optim.LBFGS([params], lr=1.0, max_iter=200, tolerance_grad=1e-9, line_search_fn="strong_wolfe")
    total = w.sum()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = z @ params[:-1] + params[-1]  # [N]
        loss = (w * F.binary_cross_entropy_with_logits(logits, y, reduction="none")).sum() / total
        loss = loss + _L2 * (params[:-1] ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    slope = params.detach()[:-1] / std
    slope = torch.where(constant, torch.zeros_like(slope), slope)
    bias = float(params.detach()[-1] - (slope * mean).sum())
    return slope, bias


@torch.no_grad()
def _gate_values(x: torch.Tensor, slope: torch.Tensor, bias: float) -> torch.Tensor:
    return torch.sigmoid(x @ slope + bias)


def fit_gates_exact(ee: EarlyExitModel, problem: GateProblem, config: FitConfig) -> dict[str, float]:
    """Refit every gate of ``ee`` to its loss optimum on ``problem`` (in place); returns the mean gate loss.

    Args:
        ee: the model; its gate kind (``ee.config.gates``) chooses the targets.
        problem: from :func:`gate_problem`.
        config: a resolved :class:`FitConfig` (``pos_weight`` and ``pos_weight_cap`` are read).
    """
    x, costs = problem.inputs, problem.costs  # [E-1, N, F], [E, N]
    hazard = ee.config.gates == "hazard"
    if hazard:
        targets = hazard_targets(costs).double()  # [E-1, N]
    else:
        targets = gate_targets(optimal_exit(costs), ee.num_exits).double()
    reach = torch.ones(x.shape[1], dtype=torch.float64)  # P(reach gate j) under the gates fitted so far
    if config.pos_weight == "paper":
        pos = gate_pos_weights(optimal_exit(costs), ee.num_exits, config.pos_weight_cap).double()  # [E-1]
    losses = []
    for j, gate in enumerate(ee.gates):
        weight = reach.clone() if hazard else torch.ones_like(reach)
        if config.pos_weight == "task":
            r = task_pos_weights(targets[j : j + 1], weight.unsqueeze(0), config.pos_weight_cap)[0]
            weight = weight * (1.0 + (r - 1.0) * targets[j])
        elif config.pos_weight == "paper":
            weight = weight * (1.0 + (pos[j] - 1.0) * targets[j])
        if float(weight.sum()) <= 1e-12:
            weight = torch.ones_like(weight)  # nobody reaches this gate on this data: fit it on everyone
        slope, bias = _solve(x[j], targets[j], weight)
        with torch.no_grad():
            gate.linear.weight.copy_(slope.to(gate.linear.weight).unsqueeze(0))
            gate.linear.bias.fill_(bias)
        h = _gate_values(x[j], slope, bias)
        loss = F.binary_cross_entropy(h.clamp(1e-12, 1 - 1e-12), targets[j], weight=weight, reduction="sum")
        losses.append(float(loss / weight.sum()))
        reach = reach * (1.0 - h)
    return {"gate_loss": sum(losses) / max(len(losses), 1)}


def solve_gates(
    ee: EarlyExitModel, batches: Iterable[tuple[AllExitsOutput, torch.Tensor]], price: torch.Tensor, config: FitConfig
) -> dict[str, Any]:
    """:func:`gate_problem` then :func:`fit_gates_exact` (what one exact gate phase of :func:`eexit.fit` does)."""
    return fit_gates_exact(ee, gate_problem(ee, batches, price, config.lam), config)
