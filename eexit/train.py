"""fit(): train exits with the JEI-DNN objective (Regol, Chataoui & Coates, ICLR 2024).

The loop, top to bottom (``reference/jei-dnn.md`` section 3.2):

1. with a frozen backbone, compute every exit's pooled features once and cache them (every epoch after that
   costs only the heads and gates);
2. warm-up: train the IMs alone on CE weighted (E - l) (or uniformly);
3. then phases alternate every K batches, starting with the gates:
   * GATE: BCE of each gate against the surrogate targets t_ij = [j >= l*_i], positives weighted by r_j from
     the validation set (recomputed at the start of every epoch);
   * IM:   Σ_l w_il·CE_il with w the detached P(G=l|x) (``im_weighting="gate"``) or 1/E (``"uniform"``);
4. after every epoch, validate with the deterministic exit rule; keep the best (or last) adapter state.

That is the paper's gates (``ExitConfig(gates="paper")``), kept exactly. The default hazard gates change what
the gate phase fits (``FitConfig`` docs, ``eexit.gate_fit``): targets [exit j is the best of the exits still
ahead], gates refitted exactly after warm-up and after each epoch on the held-out validation outputs, so every
batch of an epoch trains the IMs, with weights (1 - β)/E + β·P(G=l|x).
"""

from __future__ import annotations

import enum
import logging
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

import torch
from tqdm.auto import tqdm

from .config import FitConfig
from .data import FeatureCache, check_images, check_labels, check_loader, estimated_cache_bytes, unpack_batch
from .errors import EexitTypeError, EexitValueError, TrainingError
from .gate_fit import solve_gates
from .inference import decide_exits
from .model import AllExitsOutput, EarlyExitModel
from .objective import (
    WEIGHTINGS,
    depth_ic,
    exit_costs,
    gate_loss,
    gate_pos_weights,
    gate_targets,
    hazard_targets,
    im_loss,
    mixed_weights,
    optimal_exit,
    per_exit_ce,
    task_pos_weights,
)

__all__ = ["Phase", "fit", "phase_at", "priced_ic", "validate"]

#: Auto caching is skipped (with a warning) above this estimated size.
_CACHE_LIMIT_BYTES = 4 * 1024**3

logger = logging.getLogger("eexit")


class Phase(enum.Enum):
    WARMUP = "warmup"
    GATE = "gate"
    IM = "im"


def phase_at(epoch: int, step: int, config: FitConfig) -> Phase:
    """Which phase a batch belongs to: warm-up epochs first, then GATE/IM alternating every K batches.

    With ``gate_fit="exact"`` the gates are solved between epochs, so every batch after warm-up is IM.

    Args:
        epoch: 0-based epoch.
        step: batches trained since warm-up ended (counted across epochs).
        config: the fit config (``warmup_epochs``, ``phase_batches``).
    """
    if epoch < config.warmup_epochs:
        return Phase.WARMUP
    if config.gate_fit == "exact":
        return Phase.IM
    return Phase.GATE if (step // config.phase_batches) % 2 == 0 else Phase.IM


def _lr_factor(epoch: int, config: FitConfig) -> float:
    """Cosine from 1 to min_lr/lr over the epochs, stepped once per epoch (as the paper's code)."""
    floor = config.min_lr / config.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * epoch / config.epochs))


def priced_ic(ee: EarlyExitModel, config: FitConfig) -> torch.Tensor:
    """The IC_l that λ prices in training, ``[E]``: measured FLOPs (default) or depth fraction (``ic="depth"``)."""
    if config.ic == "depth":
        blocks = [b + 1 for b in ee.exit_blocks]
        if ee.has_backbone_head:
            blocks.append(len(ee.spec.blocks(ee.backbone)))
        return depth_ic(blocks)
    return ee.cost_table.ic


def _make_optimizer(ee: EarlyExitModel, config: FitConfig) -> torch.optim.Optimizer:
    groups: list[dict[str, Any]] = [
        {"params": [p for p in [*ee.heads.parameters(), *ee.gates.parameters()]], "lr": config.lr},
    ]
    if config.train_backbone:
        groups.append({"params": [p for p in ee.backbone.parameters() if p.requires_grad], "lr": config.backbone_lr})
    for group in groups:
        group["base_lr"] = group["lr"]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    return torch.optim.SGD(groups, momentum=config.momentum, weight_decay=config.weight_decay)


def _loss(
    out: AllExitsOutput,
    labels: torch.Tensor,
    phase: Phase,
    ee: EarlyExitModel,
    config: FitConfig,
    pos_weight: torch.Tensor,
) -> torch.Tensor:
    ce = per_exit_ce(out.logits, labels)  # [E, B]
    trainable = torch.ones(ee.num_exits, dtype=torch.bool, device=ce.device)
    if ee.has_backbone_head and not config.train_backbone:
        trainable[-1] = False  # the frozen backbone head cannot learn; its CE only shapes the weights
    if phase is Phase.GATE:
        costs = exit_costs(ce.detach(), priced_ic(ee, config).to(ce.device), config.lam)  # [E, B]
        if ee.config.gates == "hazard":
            targets = hazard_targets(costs)
        else:
            targets = gate_targets(optimal_exit(costs), ee.num_exits)
        if config.pos_weight == "task":
            pos_weight = task_pos_weights(targets, cap=config.pos_weight_cap)
        elif config.pos_weight == "none":
            pos_weight = torch.ones_like(pos_weight)
        return gate_loss(out.gate_logits, targets, pos_weight)
    if phase is Phase.WARMUP:
        weights = WEIGHTINGS[config.warmup_weighting](ce, None)
    elif config.im_weighting == "mixed":
        # Not renormalised per sample (not even over the exits that learn): that is the point of the mix.
        return im_loss(ce, mixed_weights(ce, out.exit_probs.detach(), config.im_mix), trainable)
    else:
        probs = out.exit_probs.detach() if config.im_weighting == "gate" else None
        weights = WEIGHTINGS[config.im_weighting](ce, probs)
    if not trainable.all():
        # Renormalise over the exits that learn, so dropping the frozen head does not shrink the loss scale.
        weights = (
            weights * trainable.unsqueeze(1) / (weights * trainable.unsqueeze(1)).sum(0, keepdim=True).clamp(min=1e-12)
        )
    return im_loss(ce, weights, trainable)


def _batches(
    ee: EarlyExitModel,
    source: FeatureCache | Iterable[Any],
    config: FitConfig,
    shuffle: bool,
    generator: torch.Generator,
    grad: bool,
) -> Iterator[tuple[AllExitsOutput, torch.Tensor]]:
    """All-exit outputs and labels per batch, from the cache or from the loader."""
    if isinstance(source, FeatureCache):
        for feats, final, labels in source.batches(config.batch_size, shuffle, generator):
            with torch.set_grad_enabled(grad):
                yield ee.outputs_from_features(feats, final), labels
        return
    device = next(ee.parameters()).device
    for batch in source:
        images, labels = unpack_batch(batch)
        images = check_images(images, "train_loader" if grad else "val_loader").to(device)
        labels = check_labels(labels, ee.num_classes).to(device)
        with torch.set_grad_enabled(grad):
            yield ee(images, all_exits=True), labels  # type: ignore[misc]


@torch.no_grad()
def validate(
    ee: EarlyExitModel, source: FeatureCache | Iterable[Any], config: FitConfig
) -> tuple[dict[str, float], torch.Tensor]:
    """Validation metrics under the deterministic exit rule, and each sample's best exit l* (for r_j).

    Returns:
        (metrics, best_exit): metrics has ``accuracy``, ``cost_fraction`` (mean measured IC) and ``objective``
        (mean of CE + λ·IC at the exit taken with the priced IC of ``config.ic``, the quantity model selection
        minimises).
    """
    was_training = ee.training
    ee.eval()
    ic = ee.cost_table.ic
    price = priced_ic(ee, config)
    correct = cost = objective = count = 0.0
    best: list[torch.Tensor] = []
    policy = ee.default_policy()
    for out, labels in _batches(ee, source, config, False, torch.Generator(), grad=False):
        ce = per_exit_ce(out.logits, labels)  # [E, B]
        best.append(optimal_exit(exit_costs(ce, price.to(ce.device), config.lam)).cpu())
        taken = decide_exits(out.logits, out.gate_logits, policy)  # [B]
        cols = torch.arange(labels.shape[0], device=labels.device)
        pred = out.logits[taken, cols].argmax(-1)
        correct += float((pred == labels).sum())
        cost += float(ic.to(ce.device)[taken].sum())
        objective += float((ce[taken, cols] + config.lam * price.to(ce.device)[taken]).sum())
        count += labels.shape[0]
    ee.train(was_training)
    metrics = {"accuracy": correct / count, "cost_fraction": cost / count, "objective": objective / count}
    return metrics, torch.cat(best)


def _cycle(
    ee: EarlyExitModel, source: FeatureCache | Iterable[Any], config: FitConfig, generator: torch.Generator
) -> Iterator[tuple[AllExitsOutput, torch.Tensor]]:
    """Shuffled batches of ``source`` without end (gate batches drawn from the held-out split)."""
    while True:
        yield from _batches(ee, source, config, True, generator, grad=True)


def _solve_gates(
    ee: EarlyExitModel, source: FeatureCache | Iterable[Any], config: FitConfig, generator: torch.Generator
) -> dict[str, Any]:
    """One exact gate phase: every gate refitted on ``source`` with the IMs as they are now."""
    was_training = ee.training
    ee.eval()
    try:  # the outputs are collected without gradient; L-BFGS enables it for the gates' own solve
        return solve_gates(
            ee, _batches(ee, source, config, False, generator, grad=False), priced_ic(ee, config), config
        )
    finally:
        ee.train(was_training)


def _snapshot(ee: EarlyExitModel, with_backbone: bool) -> dict[str, Any]:
    snap: dict[str, Any] = {"adapter": ee.adapter_state_dict()}
    if with_backbone:
        snap["backbone"] = {k: v.detach().clone() for k, v in ee.backbone.state_dict().items()}
    return snap


def _restore(ee: EarlyExitModel, snap: dict[str, Any]) -> None:
    ee.load_adapter_state_dict(snap["adapter"])
    if "backbone" in snap:
        ee.backbone.load_state_dict(snap["backbone"])


def _check_cache(ee: EarlyExitModel, cache: FeatureCache, name: str, config: FitConfig) -> None:
    """Refuse a feature cache that cannot stand for this model's frozen backbone."""
    if config.train_backbone or config.cache_features is False:
        raise EexitValueError(
            f"{name} is a FeatureCache, but the config asks for train_backbone={config.train_backbone} and "
            f"cache_features={config.cache_features}: cached features only stand for a frozen backbone. Pass "
            "the data loader instead."
        )
    widths, with_head = ee.feature_layout()
    expected = [(w,) for w in widths]
    got = [tuple(f.shape[1:]) for f in cache.features]
    final_ok = (cache.final_logits is not None) == with_head and (
        cache.final_logits is None or cache.final_logits.shape[-1] == ee.num_classes
    )
    if got != expected or not final_ok:
        raise EexitValueError(
            f"{name}: the FeatureCache does not fit this model: expected exit features of widths {expected} and "
            f"{'head logits' if with_head else 'no head logits'}, got widths {got} and "
            f"{'no' if cache.final_logits is None else 'some'} head logits. Collect it with "
            "FeatureCache.collect(ee, loader, name) on this model."
        )
    check_labels(cache.labels, ee.num_classes)


def _use_cache(ee: EarlyExitModel, train_loader: Iterable[Any], config: FitConfig) -> bool:
    if config.cache_features is not None:
        return config.cache_features
    if config.train_backbone:
        return False
    size = estimated_cache_bytes(ee, train_loader)
    if size is not None and size > _CACHE_LIMIT_BYTES:
        warnings.warn(
            f"not caching exit features: they would take about {size / 1024**3:.1f} GiB. Every epoch will run "
            "the backbone; pass cache_features=True to cache anyway.",
            UserWarning,
            stacklevel=3,
        )
        return False
    return True


def fit(
    ee: EarlyExitModel,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any],
    lam: float | None = None,
    *,
    config: FitConfig | None = None,
    **overrides: Any,
) -> list[dict[str, float]]:
    """Train the exits (and optionally the backbone) with JEI-DNN.

    Args:
        ee: the model :func:`eexit.attach` returned.
        train_loader: yields ``(images, labels)`` or dicts with ``pixel_values`` and ``labels``; or a
            :class:`~eexit.data.FeatureCache` already collected from this model's frozen backbone (reused as is,
            so several runs share one backbone pass, see :func:`eexit.sweep.sweep_lambda`).
        val_loader: the same, for the gate weights r_j, per-epoch metrics and model selection.
        lam: λ, the accuracy/cost trade-off (overrides ``config.lam``).
        config: a :class:`FitConfig`; keyword arguments override its fields (``epochs=5``, ...).

    Returns:
        The per-epoch history (also stored as ``ee.history``): phase counts, training loss, validation
        accuracy, mean cost fraction and objective.

    Raises:
        EexitValueError: bad settings, empty loaders, labels outside the class range, NaN/Inf inputs.
        TrainingError: the loss became NaN/Inf; the adapter is reset to the last good state before raising.
    """
    if not isinstance(ee, EarlyExitModel):
        raise EexitTypeError(f"fit expects the EarlyExitModel from eexit.attach, got {type(ee).__name__}.")
    if lam is not None:
        overrides["lam"] = lam
    config = replace(config or FitConfig(), **overrides) if overrides else (config or FitConfig())
    config = config.resolved(ee.config.gates)  # every "auto" made explicit: the record says what ran
    check_loader(train_loader, "train_loader")
    check_loader(val_loader, "val_loader")
    for name, source in (("train_loader", train_loader), ("val_loader", val_loader)):
        if isinstance(source, FeatureCache):
            _check_cache(ee, source, name, config)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)

    grad_flags = [(p, p.requires_grad) for p in ee.backbone.parameters()]
    if config.train_backbone:
        for p in ee.backbone.parameters():
            p.requires_grad_(True)
        ee.backbone_trainable = True
    try:
        history = _fit_loop(ee, train_loader, val_loader, config, generator)
    finally:
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        ee.backbone_trainable = False
        ee.eval()
    ee.fit_config, ee.history, ee.boosted = config, history, None
    return history


def _fit_loop(
    ee: EarlyExitModel,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any],
    config: FitConfig,
    generator: torch.Generator,
) -> list[dict[str, float]]:
    train_src: FeatureCache | Iterable[Any] = train_loader
    val_src: FeatureCache | Iterable[Any] = val_loader
    if _use_cache(ee, train_loader, config):
        if not isinstance(train_loader, FeatureCache):
            train_src = FeatureCache.collect(ee, train_loader, "train_loader", config.progress)
        if not isinstance(val_loader, FeatureCache):
            val_src = FeatureCache.collect(ee, val_loader, "val_loader", config.progress)
    optimizer = _make_optimizer(ee, config)
    device = next(ee.parameters()).device
    pos_weight = torch.ones(max(ee.num_exits - 1, 0), device=device)
    gate_src = val_src if config.gate_data == "val" else train_src
    exact = config.gate_fit == "exact" and ee.num_exits > 1
    good = _snapshot(ee, config.train_backbone)
    best_state, best_objective = good, math.inf
    history: list[dict[str, float]] = []
    step = 0
    gate_batches: Iterator[tuple[AllExitsOutput, torch.Tensor]] | None = None
    bar = tqdm(range(config.epochs), desc=f"JEI-DNN λ={config.lam:g}", disable=not config.progress)
    for epoch in bar:
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * _lr_factor(epoch, config)
        if exact and epoch == 0 and config.warmup_epochs == 0:
            _solve_gates(ee, gate_src, config, generator)  # the first IM epoch needs gates fitted to the IMs
        elif epoch >= config.warmup_epochs and ee.num_exits > 1 and config.pos_weight == "paper":
            _, best_exit = validate(ee, val_src, config)
            pos_weight = gate_pos_weights(best_exit, ee.num_exits, config.pos_weight_cap).to(device)
        ee.train(True)
        totals = {Phase.WARMUP: 0.0, Phase.GATE: 0.0, Phase.IM: 0.0}
        counts = {Phase.WARMUP: 0, Phase.GATE: 0, Phase.IM: 0}
        for out, labels in _batches(ee, train_src, config, True, generator, grad=True):
            phase = phase_at(epoch, step, config)
            if phase is Phase.GATE and ee.num_exits < 2:
                phase = Phase.IM
            if phase is Phase.GATE and gate_src is not train_src:
                # Gates learn from held-out outputs: the gate phase's batch comes from the gate split instead.
                gate_batches = gate_batches or _cycle(ee, gate_src, config, generator)
                out, labels = next(gate_batches)
            loss = _loss(out, labels, phase, ee, config, pos_weight)
            if not torch.isfinite(loss):
                _restore(ee, good)
                raise TrainingError(
                    f"the {phase.value} loss became {loss.item()} at epoch {epoch}; training stopped and the "
                    "adapter was reset to the last good state (end of the previous epoch). Lower lr, check the "
                    "inputs' normalisation, or use optimizer='adamw'."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            totals[phase] += loss.item()
            counts[phase] += 1
            if phase is not Phase.WARMUP:
                step += 1
        solved = {}
        if exact and epoch + 1 >= config.warmup_epochs:
            # After the last warm-up epoch and after every IM epoch: the next epoch's IM weights and this epoch's
            # validation read gates fitted to the IMs as they are now.
            solved = _solve_gates(ee, gate_src, config, generator)
        metrics, _ = validate(ee, val_src, config)
        record = {"epoch": float(epoch), **{f"val_{k}": v for k, v in metrics.items()}, **solved}
        for phase in Phase:
            if counts[phase]:
                record[f"{phase.value}_loss"] = totals[phase] / counts[phase]
                record[f"{phase.value}_batches"] = float(counts[phase])
        history.append(record)
        logger.info(
            "epoch %d/%d λ=%g: val accuracy %.4f, mean cost %.3f of the last exit, objective %.4f",
            epoch + 1,
            config.epochs,
            config.lam,
            metrics["accuracy"],
            metrics["cost_fraction"],
            metrics["objective"],
        )
        bar.set_postfix(acc=f"{metrics['accuracy']:.3f}", cost=f"{metrics['cost_fraction']:.2f}")
        good = _snapshot(ee, config.train_backbone)
        if epoch >= config.warmup_epochs and metrics["objective"] < best_objective:
            best_objective, best_state = metrics["objective"], good
    if config.select == "best" and math.isfinite(best_objective):
        _restore(ee, best_state)
    return history
