"""L2W-DEN: a meta-learned network weights each sample's per-exit losses.

Han et al., "Learning to Weight Samples for Dynamic Early-exiting Networks", ECCV 2022 (``LeapLabTHU/L2W-DEN``;
``reference/jei-dnn.md`` §7). The IMs train on Σ_k mean_i w_ik·CE_ik, with weights from a small MLP (one hidden
layer of 500, ReLU, tanh output) fed with the sample's per-exit CE losses:

    w_i = 1 + ε·(ŵ_i − mean_k ŵ_ik),    ε = 0.3

(centred over the exits of each sample, so a sample's weights average 1). Every ``meta_interval`` iterations
the weight net takes a meta step: the batch is cut in two halves; a virtual SGD step of the IMs on half A with
the predicted weights (``torch.func.functional_call``, graph kept), then a meta loss on half B that imitates
test-time thresholded exiting: with the target exit distribution q (geometric, p = 15 of base 20, ρ = 0.75),
the samples fill the exits in order, the most confident first, and the meta loss sums over exits the mean CE
of the samples each exit receives. Its gradient flows back through the virtual step into the weight net (Adam,
lr 1e-4, weight decay 1e-4). Then the halves swap roles.

Differences from the original, kept small on purpose: the original updates the network on each half after
its meta step (two updates per batch); here one update on the whole batch follows the two meta steps. Like the
JEI-DNN port, only the IMs learn (frozen backbone, cached features) and the weight net covers the IMs, not the
frozen backbone head; that head still receives its share of samples in the meta loss' exit assignment.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from eexit.data import FeatureCache
from eexit.errors import EexitTypeError, EexitValueError
from eexit.model import EarlyExitModel

from ._common import TrainSettings, exit_logits, feature_cache, make_optimizer, mean_exit_accuracy, train_ims
from .thresholds import geometric_exit_distribution

__all__ = ["L2WResult", "WeightNet", "l2w_weights", "meta_loss", "meta_step", "threshold_assignment", "train_l2w"]


class WeightNet(nn.Module):
    """Per-exit CE losses ``[B, K]`` -> raw weights ŵ in (-1, 1) ``[B, K]`` (Linear-ReLU-Linear-tanh)."""

    def __init__(self, num_exits: int, hidden: int = 500) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_exits, hidden), nn.ReLU(), nn.Linear(hidden, num_exits))

    def forward(self, losses: Tensor) -> Tensor:
        return torch.tanh(self.net(losses))  # [B, K]


def l2w_weights(raw: Tensor, epsilon: float = 0.3) -> Tensor:
    """w = 1 + ε·(ŵ − mean over exits of ŵ): each sample's weights average exactly 1.

    Args:
        raw: the weight net's output ŵ ``[B, K]``.
        epsilon: ε, how far weights may move from 1 (|w − 1| <= 2ε since ŵ is in (-1, 1)).
    """
    return 1.0 + epsilon * (raw - raw.mean(dim=1, keepdim=True))  # [B, K]


def threshold_assignment(confidence: Tensor, q: Tensor) -> Tensor:
    """The exit each sample would take under budgeted thresholding: exits fill in order, most confident first.

    Exit k (k < E−1) receives the ⌊N·q_k⌋ most confident samples (by its own confidence) among those not yet
    assigned; the last exit receives the rest.

    Args:
        confidence: ``[E, N]`` confidence of every exit on every sample (higher = more confident).
        q: ``[E]`` target exit fractions summing to 1.

    Returns:
        ``[N]`` exit index of each sample.
    """
    num_exits, n = confidence.shape
    assigned = torch.full((n,), num_exits - 1, dtype=torch.long, device=confidence.device)
    free = torch.ones(n, dtype=torch.bool, device=confidence.device)
    for k in range(num_exits - 1):
        take = min(math.floor(n * float(q[k]) + 1e-9), int(free.sum()))
        if take == 0:
            continue
        scores = confidence[k].masked_fill(~free, -math.inf)  # [N]
        chosen = scores.topk(take).indices
        assigned[chosen] = k
        free[chosen] = False
    return assigned


def meta_loss(logits: Tensor, labels: Tensor, q: Tensor) -> Tensor:
    """Σ_k mean CE of the samples assigned to exit k by :func:`threshold_assignment` (on max probability).

    Args:
        logits: ``[E, N, C]`` (differentiable).
        labels: ``[N]``.
        q: ``[E]`` target exit fractions.
    """
    with torch.no_grad():
        confidence = logits.detach().softmax(-1).amax(-1)  # [E, N]
        assigned = threshold_assignment(confidence, q)  # [N]
    loss = logits.new_zeros(())
    for k in range(logits.shape[0]):
        here = assigned == k
        if bool(here.any()):
            loss = loss + F.cross_entropy(logits[k, here].float(), labels[here])
    return loss


def _weighted_loss(logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """Σ_k mean_i w_ik·CE_ik over the K trained exits (logits ``[E, B, C]``, weights ``[B, K]``)."""
    num = weights.shape[1]
    ce = F.cross_entropy(logits[:num].flatten(0, 1).float(), labels.repeat(num), reduction="none")
    return (weights * ce.view(num, -1).T).mean(0).sum()


def _per_exit_ce(logits: Tensor, labels: Tensor, num: int) -> Tensor:
    ce = F.cross_entropy(logits[:num].flatten(0, 1).float(), labels.repeat(num), reduction="none")
    return ce.view(num, -1).T  # [B, K]


def meta_step(
    ee: EarlyExitModel,
    weight_net: WeightNet,
    meta_optimizer: torch.optim.Optimizer,
    train_half: tuple[list[Tensor], Tensor | None, Tensor],
    meta_half: tuple[list[Tensor], Tensor | None, Tensor],
    *,
    virtual_lr: float,
    epsilon: float = 0.3,
    q: Tensor | None = None,
    weight_decay: float = 0.0,
) -> float:
    """One meta update of the weight net (the IMs themselves are not changed).

    Args:
        ee: the model whose IMs learn.
        weight_net: the weight-prediction network.
        meta_optimizer: its optimiser (Adam in L2W-DEN).
        train_half: (features, head logits or None, labels) of the half that takes the virtual step.
        meta_half: the same for the half the meta loss is measured on.
        virtual_lr: learning rate of the virtual SGD step.
        epsilon: ε of :func:`l2w_weights`.
        q: target exit fractions ``[E]`` (default: geometric p = 15, base 20).
        weight_decay: weight decay of the virtual SGD step.

    Returns:
        The meta loss.
    """
    num = len(ee.heads)
    q = q if q is not None else geometric_exit_distribution(15, ee.num_exits, 20)
    params = dict(ee.heads.named_parameters())
    feats, final, labels = train_half
    logits = exit_logits(ee, feats, final)  # [E, b, C]
    ce = _per_exit_ce(logits, labels, num)  # [b, K]
    weights = l2w_weights(weight_net(ce.detach()), epsilon)  # [b, K], differentiable in the weight net
    loss = (weights * ce).mean(0).sum()
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    virtual = {name: p - virtual_lr * (g + weight_decay * p) for (name, p), g in zip(params.items(), grads)}
    feats_m, final_m, labels_m = meta_half
    meta_logits = []
    for k, head in enumerate(ee.heads):
        prefix = f"{k}."
        own = {n[len(prefix) :]: v for n, v in virtual.items() if n.startswith(prefix)}
        meta_logits.append(functional_call(head, own, (feats_m[k],)))  # [b, C]
    if final_m is not None:
        meta_logits.append(final_m.to(meta_logits[0].dtype))
    value = meta_loss(torch.stack(meta_logits), labels_m, q.to(labels_m.device))
    meta_grads = torch.autograd.grad(value, list(weight_net.parameters()), allow_unused=True)
    meta_optimizer.zero_grad(set_to_none=True)
    for p, g in zip(weight_net.parameters(), meta_grads):
        p.grad = g
    meta_optimizer.step()
    return value.item()


@dataclass
class L2WResult:
    """What :func:`train_l2w` returns: the weight net and the training record. Predict with thresholds."""

    weight_net: WeightNet
    history: list[dict[str, float]] = field(default_factory=list)
    meta_losses: list[float] = field(default_factory=list)


def _halves(feats: list[Tensor], final: Tensor | None, labels: Tensor, first: bool) -> tuple[Any, ...]:
    half = labels.shape[0] // 2
    part = slice(0, half) if first else slice(half, None)
    return [f[part] for f in feats], (final[part] if final is not None else None), labels[part]


def train_l2w(
    ee: EarlyExitModel,
    train_loader: Iterable[Any] | FeatureCache,
    val_loader: Iterable[Any] | FeatureCache,
    *,
    meta_interval: int = 100,
    epsilon: float = 0.3,
    hidden: int = 500,
    meta_lr: float = 1e-4,
    meta_weight_decay: float = 1e-4,
    target_p: float = 15,
    virtual_lr: float | None = None,
    **settings: Any,
) -> L2WResult:
    """Train the IMs of ``ee`` with L2W-DEN sample weighting (frozen backbone; the gates are not used).

    Args:
        ee: the model :func:`eexit.attach` returned; its IMs are trained in place from their current state.
        train_loader: training data (a loader or a FeatureCache of this model).
        val_loader: validation data for model selection (mean over exits of the accuracy).
        meta_interval: a meta step every this many iterations (100 in the JEI-DNN port).
        epsilon: ε of the weights w = 1 + ε(ŵ − mean ŵ).
        hidden: hidden width of the weight net.
        meta_lr, meta_weight_decay: Adam settings of the weight net.
        target_p: the meta loss' target exit distribution, geometric with p = target_p of base 20.
        virtual_lr: learning rate of the virtual step (default: the IMs' current learning rate).
        **settings: :class:`~eexit.baselines._common.TrainSettings` fields (``epochs``, ``lr``, ...).

    Returns:
        An :class:`L2WResult`. Evaluate the IMs with confidence thresholds (:func:`budgeted_curve`) and run real
        early exit with ``ee(images, policy=ThresholdPolicy(point.thresholds[:-1]))``.
    """
    if not isinstance(ee, EarlyExitModel):
        raise EexitTypeError(f"train_l2w expects the EarlyExitModel from eexit.attach, got {type(ee).__name__}.")
    if ee.driver.reads_earlier_exits:
        # The virtual step re-runs each IM on its own features; staged exits read earlier exits' logits.
        raise EexitValueError(
            "train_l2w needs independent exit heads, but this backbone's exits read earlier exits (e.g. the "
            "Dynamic Perceiver's isc links). Use eexit.fit or eexit.baselines.train_boosted for this backbone."
        )
    if isinstance(meta_interval, bool) or not isinstance(meta_interval, int) or meta_interval < 1:
        raise EexitValueError(f"meta_interval must be a positive int, got {meta_interval!r}.")
    if not isinstance(epsilon, (int, float)) or not 0 <= epsilon <= 0.5:
        raise EexitValueError(f"epsilon must be in [0, 0.5] (weights stay positive), got {epsilon!r}.")
    if virtual_lr is not None and not (isinstance(virtual_lr, (int, float)) and virtual_lr > 0):
        raise EexitValueError(f"virtual_lr must be a number > 0 or None, got {virtual_lr!r}.")
    config = TrainSettings(**settings)
    train, val = feature_cache(ee, train_loader, "train_loader"), feature_cache(ee, val_loader, "val_loader")
    torch.manual_seed(config.seed)
    device = next(ee.heads.parameters()).device
    weight_net = WeightNet(len(ee.heads), hidden).to(device)
    meta_optimizer = torch.optim.Adam(weight_net.parameters(), lr=meta_lr, weight_decay=meta_weight_decay)
    optimizer = make_optimizer(list(ee.heads.parameters()), config)
    q = geometric_exit_distribution(target_p, ee.num_exits, 20).to(device)
    result = L2WResult(weight_net)
    num = len(ee.heads)

    def step(feats: list[Tensor], final: Tensor | None, labels: Tensor, index: int, lr: float) -> float:
        if index % meta_interval == 0 and labels.shape[0] >= 4:
            a, b = _halves(feats, final, labels, True), _halves(feats, final, labels, False)
            for train_half, meta_half in ((a, b), (b, a)):
                result.meta_losses.append(
                    meta_step(
                        ee,
                        weight_net,
                        meta_optimizer,
                        train_half,
                        meta_half,
                        virtual_lr=virtual_lr or lr,
                        epsilon=epsilon,
                        q=q,
                        weight_decay=config.weight_decay,
                    )
                )
        logits = exit_logits(ee, feats, final)  # [E, B, C]
        with torch.no_grad():
            weights = l2w_weights(weight_net(_per_exit_ce(logits, labels, num)), epsilon)  # [B, K]
        loss = _weighted_loss(logits, labels, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    result.history = train_ims(ee, train, val, config, step, mean_exit_accuracy, optimizer, "L2W-DEN")
    ee.fit_config, ee.history, ee.boosted = None, result.history, None
    return result
