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
import os
import warnings
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch
from tqdm.auto import tqdm

from ._fit_data import GateStream, batches, check_cache, feature_cache, use_cache
from ._peft import lora_fix
from .checkpoint import (
    FitRun,
    backbone_identity,
    backbone_parameters,
    backbone_state,
    data_identity,
    load_backbone_state,
    load_fit_checkpoint,
    save_fit_checkpoint,
)
from .config import FitConfig
from .data import FeatureCache, check_loader
from .distributed import Dist, current
from .errors import EexitTypeError, EexitValueError, TrainingError
from .gate_fit import solve_gates
from .inference import decide_exits
from .model import AllExitsOutput, EarlyExitModel
from .objective import (
    WEIGHTINGS,
    depth_ic,
    exit_costs,
    gate_loss,
    gate_targets,
    hazard_targets,
    im_loss,
    mixed_weights,
    optimal_exit,
    per_exit_ce,
    pos_weights_from_counts,
    task_pos_weights,
)

__all__ = ["Phase", "fit", "phase_at", "priced_ic", "validate"]

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
    out: AllExitsOutput | None,
    labels: torch.Tensor | None,
    total: int,
    phase: Phase,
    ee: EarlyExitModel,
    config: FitConfig,
    pos_weight: torch.Tensor,
    dist: Dist,
) -> torch.Tensor | None:
    """This process's part of the global batch's loss: its rows' mean loss scaled by rows / ``total``.

    In one process the scale is 1. ``None`` when this process has no rows of the batch (a short last batch
    split over more processes than it has samples); it still takes part in the batch's collective operations.
    """
    rows = 0 if labels is None else labels.shape[0]
    if phase is Phase.GATE:
        if out is None or labels is None:
            if config.pos_weight == "task":  # the other ranks sum their target counts with this one's zeros
                task_pos_weights(torch.zeros(ee.num_exits - 1, 0), cap=config.pos_weight_cap, reduce=dist.sum)
            return None
        ce = per_exit_ce(out.logits, labels)  # [E, B]
        costs = exit_costs(ce.detach(), priced_ic(ee, config).to(ce.device), config.lam)  # [E, B]
        if ee.config.gates == "hazard":
            targets = hazard_targets(costs)
        else:
            targets = gate_targets(optimal_exit(costs), ee.num_exits)
        if config.pos_weight == "task":
            pos_weight = task_pos_weights(targets, cap=config.pos_weight_cap, reduce=dist.sum)
        elif config.pos_weight == "none":
            pos_weight = torch.ones_like(pos_weight)
        return gate_loss(out.gate_logits, targets, pos_weight) * (rows / total)
    if out is None or labels is None:
        return None
    ce = per_exit_ce(out.logits, labels)  # [E, B]
    trainable = torch.ones(ee.num_exits, dtype=torch.bool, device=ce.device)
    if ee.has_backbone_head and not config.train_backbone:
        trainable[-1] = False  # the frozen backbone head cannot learn; its CE only shapes the weights
    if phase is Phase.WARMUP:
        weights = WEIGHTINGS[config.warmup_weighting](ce, None)
    elif config.im_weighting == "mixed":
        # Not renormalised per sample (not even over the exits that learn): that is the point of the mix.
        return im_loss(ce, mixed_weights(ce, out.exit_probs.detach(), config.im_mix), trainable) * (rows / total)
    else:
        probs = out.exit_probs.detach() if config.im_weighting == "gate" else None
        weights = WEIGHTINGS[config.im_weighting](ce, probs)
    if not trainable.all():
        # Renormalise over the exits that learn, so dropping the frozen head does not shrink the loss scale.
        weights = (
            weights * trainable.unsqueeze(1) / (weights * trainable.unsqueeze(1)).sum(0, keepdim=True).clamp(min=1e-12)
        )
    return im_loss(ce, weights, trainable) * (rows / total)


@torch.no_grad()
def _validate(
    ee: EarlyExitModel,
    source: FeatureCache | Iterable[Any],
    config: FitConfig,
    dist: Dist,
    best_exits: list[torch.Tensor] | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """:func:`validate` over every process's share of the data: sums and l* counts reduced over the ranks."""
    was_training = ee.training
    ee.eval()
    ic = ee.cost_table.ic
    price = priced_ic(ee, config)
    sums = torch.zeros(4, dtype=torch.float64)  # correct, cost, objective, count
    counts = torch.zeros(ee.num_exits, dtype=torch.float64)  # samples whose best exit is l
    policy = ee.default_policy()
    for out, labels, _ in batches(ee, source, config, False, torch.Generator(), grad=False, dist=dist):
        if out is None or labels is None:
            continue
        ce = per_exit_ce(out.logits, labels)  # [E, B]
        best = optimal_exit(exit_costs(ce, price.to(ce.device), config.lam))
        counts += torch.bincount(best.cpu(), minlength=ee.num_exits).double()
        if best_exits is not None:
            best_exits.append(best.cpu())
        taken = decide_exits(out.logits, out.gate_logits, policy)  # [B]
        cols = torch.arange(labels.shape[0], device=labels.device)
        pred = out.logits[taken, cols].argmax(-1)
        sums[0] += float((pred == labels).sum())
        sums[1] += float(ic.to(ce.device)[taken].sum())
        sums[2] += float((ce[taken, cols] + config.lam * price.to(ce.device)[taken]).sum())
        sums[3] += labels.shape[0]
    ee.train(was_training)
    reduced = dist.sum(torch.cat([sums, counts]))
    sums, counts = reduced[:4], reduced[4:]
    correct, cost, objective, count = sums.tolist()
    metrics = {"accuracy": correct / count, "cost_fraction": cost / count, "objective": objective / count}
    return metrics, counts


def validate(
    ee: EarlyExitModel, source: FeatureCache | Iterable[Any], config: FitConfig
) -> tuple[dict[str, float], torch.Tensor]:
    """Validation metrics under the deterministic exit rule, and each sample's best exit l* (for r_j).

    Returns:
        (metrics, best_exit): metrics has ``accuracy``, ``cost_fraction`` (mean measured IC) and ``objective``
        (mean of CE + λ·IC at the exit taken with the priced IC of ``config.ic``, the quantity model selection
        minimises); ``best_exit`` ``[N]``.
    """
    best: list[torch.Tensor] = []
    metrics, _ = _validate(ee, source, config, Dist(), best)
    return metrics, torch.cat(best)


def _solve_gates(
    ee: EarlyExitModel, source: FeatureCache | Iterable[Any], config: FitConfig, dist: Dist
) -> dict[str, Any]:
    """One exact gate phase: every gate refitted on ``source`` with the IMs as they are now.

    Every process solves on the whole of ``source`` (the gates are a few numbers each; the solve is cheap next
    to an epoch), then takes rank 0's result, so the ranks agree even where the hardware is not deterministic.
    """
    was_training = ee.training
    ee.eval()
    try:  # the outputs are collected without gradient; L-BFGS enables it for the gates' own solve
        pairs = (
            (out, labels)
            for out, labels, _ in batches(ee, source, config, False, torch.Generator(), grad=False, dist=Dist())
        )
        solved = solve_gates(ee, pairs, priced_ic(ee, config), config)
    finally:
        ee.train(was_training)
    dist.broadcast_(list(ee.gates.parameters()))
    return solved


def _snapshot(ee: EarlyExitModel, train_backbone: bool | str) -> dict[str, Any]:
    snap: dict[str, Any] = {"adapter": ee.adapter_state_dict()}
    if train_backbone:
        snap["backbone"] = backbone_state(ee, train_backbone)
    return snap


def _restore(ee: EarlyExitModel, snap: dict[str, Any], train_backbone: bool | str) -> None:
    ee.load_adapter_state_dict(snap["adapter"])
    if "backbone" in snap:
        load_backbone_state(ee, train_backbone, snap["backbone"])


def _check_lora(ee: EarlyExitModel) -> None:
    """Refuse ``train_backbone="lora"`` on a model without a PEFT adapter to train, saying how to get one."""
    if ee.peft_model is None:
        blocks = ee.spec.blocks(ee.backbone)
        raise EexitValueError(
            f"train_backbone='lora' trains the LoRA adapter of a PEFT-wrapped backbone, but this "
            f"{type(ee.backbone).__name__} was attached without one. Take the backbone back with model = "
            f"ee.detach(), then wrap it: {lora_fix(blocks[0][1] if blocks else None)}; or pass "
            "train_backbone=True to train every weight."
        )
    if len(ee.peft_model.peft_config) > 1:
        raise EexitValueError(
            f"train_backbone='lora', but the PeftModel holds several PEFT adapters "
            f"({sorted(ee.peft_model.peft_config)}); the exits trained with one could not be saved with it. Remove "
            "the unused ones first: ee.peft_model.delete_adapter(name) (it works while attached)."
        )
    if not ee.peft_trainable:
        raise EexitValueError(
            "train_backbone='lora', but no parameter of the PeftModel was trainable when it was attached (PEFT "
            "adapters are loaded frozen, for inference, by PeftModel.from_pretrained and eexit.from_pretrained). "
            "To train further an adapter saved with ee.save_pretrained(dir), load its LoRA trainable: "
            'model = ee.detach(); pm = peft.PeftModel.from_pretrained(<a fresh plain base model>, "<dir>/'
            'peft_adapter", is_trainable=True); ee = eexit.from_pretrained(pm, "<dir>"). Or attach a new LoRA '
            "from peft.get_peft_model."
        )


_AUTOCAST = {None: None, "no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def fit(
    ee: EarlyExitModel,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any],
    lam: float | None = None,
    *,
    config: FitConfig | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    mixed_precision: str | None = None,
    **overrides: Any,
) -> list[dict[str, float]]:
    """Train the exits (and optionally the backbone) with JEI-DNN, in one process or under ``accelerate launch``.

    ``train_backbone=True`` fine-tunes every backbone weight with the exits (the paper's end-to-end variant);
    ``train_backbone="lora"`` is its cheap variant for a backbone attached as a ``peft.PeftModel``: only the
    parameters PEFT marked trainable (the LoRA weights, and any ``modules_to_save``) learn, with ``backbone_lr``,
    jointly with the IMs and gates, while the base weights stay frozen. Both run the backbone every epoch (no
    feature cache); ``ee.save_pretrained`` then writes the trained LoRA next to the exits.

    Under a multi-process launcher (``accelerate launch --num_processes N``, ``torchrun``) the same call trains
    on N processes: each computes its share of every global batch (the loaders' batches, or ``batch_size`` rows
    of the feature cache), gradients and validation sums are reduced over the processes, and the result is the
    adapter one process gives with the same global batch and the same cache (several processes always cache on
    disk, in fp16 unless told otherwise; one process without ``cache_dir`` keeps full-precision features in RAM,
    which moves the result by about the fp16 rounding). The frozen backbone is never wrapped; only the
    exits' gradients are exchanged (``eexit.distributed``). Save the adapter from the main process only
    (``eexit.distributed.current().is_main``).

    Args:
        ee: the model :func:`eexit.attach` returned.
        train_loader: yields ``(images, labels)`` or dicts with ``pixel_values`` and ``labels``; or a
            :class:`~eexit.data.FeatureCache` already collected from this model's frozen backbone (reused as is,
            so several runs share one backbone pass, see :func:`eexit.sweep.sweep_lambda`).
        val_loader: the same, for the gate weights r_j, per-epoch metrics and model selection.
        lam: λ, the accuracy/cost trade-off (overrides ``config.lam``).
        config: a :class:`FitConfig`; keyword arguments override its fields (``epochs=5``, ...).
        cache_dir: cache the exit features on disk under this folder (memory-mapped, fp16, keyed by backbone,
            exits and data; reused by later fits: :func:`eexit.feature_store.disk_cache`). Needs DataLoaders over
            map-style datasets. With several processes the cache is always on disk (default
            :func:`eexit.feature_store.default_cache_dir`).
        checkpoint_dir: write a checkpoint after every epoch (adapter, optimiser, random states, counters;
            safetensors + JSON, atomically) into this folder.
        resume: continue from the latest checkpoint in ``checkpoint_dir`` (a fresh start if there is none). The
            settings, backbone and data must be those of the interrupted fit. On cached features the result is the
            adapter an uninterrupted fit gives; on a loader (``train_backbone``) the loader's own shuffling is not
            in the checkpoint, so the data order after the resume differs.
        mixed_precision: ``"bf16"`` or ``"fp16"`` runs the backbone under ``torch.autocast`` (GPU); ``"no"``
            keeps full precision; ``None`` takes what ``accelerate launch --mixed_precision`` set
            (``$ACCELERATE_MIXED_PRECISION``).

    Returns:
        The per-epoch history (also stored as ``ee.history``): phase counts, training loss, validation
        accuracy, mean cost fraction and objective.

    Raises:
        EexitValueError: bad settings, empty loaders, labels outside the class range, NaN/Inf inputs, a
            checkpoint from other settings or another backbone, ``train_backbone="lora"`` on a backbone that is
            not a PeftModel (or has nothing trainable).
        TrainingError: the loss became NaN/Inf; the adapter is reset to the last good state before raising.
    """
    if not isinstance(ee, EarlyExitModel):
        raise EexitTypeError(f"fit expects the EarlyExitModel from eexit.attach, got {type(ee).__name__}.")
    if mixed_precision is None:  # `accelerate launch --mixed_precision bf16` says it through the environment
        mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if mixed_precision not in _AUTOCAST:
        raise EexitValueError(f"mixed_precision must be one of {list(_AUTOCAST)}, got {mixed_precision!r}.")
    if resume and checkpoint_dir is None:
        raise EexitValueError("resume=True needs checkpoint_dir=, the folder the interrupted fit wrote to.")
    if lam is not None:
        overrides["lam"] = lam
    config = replace(config or FitConfig(), **overrides) if overrides else (config or FitConfig())
    config = config.resolved(ee.config.gates)  # every "auto" made explicit: the record says what ran
    if config.train_backbone == "lora":
        _check_lora(ee)
    elif config.train_backbone and ee.peft_model is not None:
        warnings.warn(
            "train_backbone=True on a backbone attached as a peft.PeftModel trains every base weight as well as the "
            "PEFT adapter, and the base weights are not saved with the exits; to train only the LoRA pass "
            "train_backbone='lora'.",
            UserWarning,
            stacklevel=2,
        )
    check_loader(train_loader, "train_loader")
    check_loader(val_loader, "val_loader")
    for name, source in (("train_loader", train_loader), ("val_loader", val_loader)):
        if isinstance(source, FeatureCache):
            check_cache(ee, source, name, config)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    run = FitRun(current(), _AUTOCAST[mixed_precision], cache_dir, checkpoint_dir, resume)

    grad_flags = [(p, p.requires_grad) for p in ee.backbone.parameters()]
    if config.train_backbone:
        for p in backbone_parameters(ee, config.train_backbone).values():
            p.requires_grad_(True)
        ee.backbone_trainable = config.train_backbone  # True, or "lora": the base stays in eval mode
    try:
        history = _fit_loop(ee, train_loader, val_loader, config, generator, run)
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
    run: FitRun,
) -> list[dict[str, float]]:
    dist = run.dist
    train_src: FeatureCache | Iterable[Any] = train_loader
    val_src: FeatureCache | Iterable[Any] = val_loader
    if use_cache(ee, train_loader, config, on_disk=run.cache_dir is not None or dist.active):
        train_src = feature_cache(ee, train_loader, "train_loader", config, run.cache_dir, dist, run.autocast)
        val_src = feature_cache(ee, val_loader, "val_loader", config, run.cache_dir, dist, run.autocast)
    optimizer = _make_optimizer(ee, config)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # Every process starts from rank 0's exits (and backbone, when it trains), as DDP would make them.
    dist.broadcast_(params if config.train_backbone else [*ee.heads.parameters(), *ee.gates.parameters()])
    device = next(ee.parameters()).device
    pos_weight = torch.ones(max(ee.num_exits - 1, 0), device=device)
    separate_gate_data = config.gate_data == "val"
    gate_src = val_src if separate_gate_data else train_src
    exact = config.gate_fit == "exact" and ee.num_exits > 1
    good = _snapshot(ee, config.train_backbone)
    best_state, best_objective = good, math.inf
    history: list[dict[str, float]] = []
    step, start = 0, 0
    gate_passes = gate_position = 0
    if run.checkpoint_dir is not None:  # what a checkpoint must match to be resumed; hashed once per fit
        fingerprint = backbone_identity(ee, config.train_backbone)
        run.identity = {"backbone": fingerprint, "data": [data_identity(train_src), data_identity(val_src)]}
    if run.resume:
        error: BaseException | None = None
        try:
            restored = load_fit_checkpoint(ee, run, config, optimizer, generator)
            if restored is not None:
                start, counters, best_state = restored
                step, history = counters["step"], counters["history"]
                best_objective = counters["best_objective"] if counters["best_objective"] is not None else math.inf
                gate_passes, gate_position = counters["gate_passes"], counters["gate_position"]
                pos_weight = torch.tensor(counters["pos_weight"], device=device)
                good = _snapshot(ee, config.train_backbone)
                logger.info("resuming at epoch %d/%d from %s", start + 1, config.epochs, run.checkpoint_dir)
        except KeyError as err:
            error = EexitValueError(f"the checkpoint in {run.checkpoint_dir} lacks {err}; delete it to start afresh.")
        except Exception as err:
            error = err
        dist.agree(error, "reading the checkpoint")
        first = torch.tensor([float(start)])
        if dist.max(first).item() != -dist.max(-first).item():
            raise EexitValueError(
                f"the processes found different checkpoints in {run.checkpoint_dir} (or none): checkpoint_dir must be "
                "on a file system every process sees."
            )
    gate_batches = GateStream(ee, gate_src, config, dist, gate_passes, gate_position)
    bar = tqdm(
        range(start, config.epochs),
        desc=f"JEI-DNN λ={config.lam:g}",
        disable=not (config.progress and dist.is_main),
        initial=start,
        total=config.epochs,
    )
    for epoch in bar:
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * _lr_factor(epoch, config)
        if exact and epoch == 0 and config.warmup_epochs == 0:
            _solve_gates(ee, gate_src, config, dist)  # the first IM epoch needs gates fitted to the IMs
        elif epoch >= config.warmup_epochs and ee.num_exits > 1 and config.pos_weight == "paper":
            _, counts = _validate(ee, val_src, config, dist)
            pos_weight = pos_weights_from_counts(counts, config.pos_weight_cap).float().to(device)
        ee.train(True)
        totals = {Phase.WARMUP: 0.0, Phase.GATE: 0.0, Phase.IM: 0.0}
        counts_ = {Phase.WARMUP: 0, Phase.GATE: 0, Phase.IM: 0}
        for out, labels, total in batches(ee, train_src, config, True, generator, True, dist, run.autocast):
            phase = phase_at(epoch, step, config)
            if phase is Phase.GATE and ee.num_exits < 2:
                phase = Phase.IM
            if phase is Phase.GATE and separate_gate_data:
                # Gates learn from held-out outputs: the gate phase's batch comes from the gate split instead.
                out, labels, total = next(gate_batches)
            loss = _loss(out, labels, total, phase, ee, config, pos_weight, dist)
            optimizer.zero_grad(set_to_none=True)
            if loss is not None:
                loss.backward()
            global_loss = dist.sync_grads(params, loss if loss is not None else torch.zeros((), device=device))
            if not torch.isfinite(global_loss):
                _restore(ee, good, config.train_backbone)
                raise TrainingError(
                    f"the {phase.value} loss became {global_loss.item()} at epoch {epoch}; training stopped and the "
                    "adapter was reset to the last good state (end of the previous epoch). Lower lr, check the "
                    "inputs' normalisation, or use optimizer='adamw'."
                )
            optimizer.step()
            totals[phase] += global_loss.item()
            counts_[phase] += 1
            if phase is not Phase.WARMUP:
                step += 1
        solved = {}
        if exact and epoch + 1 >= config.warmup_epochs:
            # After the last warm-up epoch and after every IM epoch: the next epoch's IM weights and this epoch's
            # validation read gates fitted to the IMs as they are now.
            solved = _solve_gates(ee, gate_src, config, dist)
        metrics, _ = _validate(ee, val_src, config, dist)
        record = {"epoch": float(epoch), **{f"val_{k}": v for k, v in metrics.items()}, **solved}
        for phase in Phase:
            if counts_[phase]:
                record[f"{phase.value}_loss"] = totals[phase] / counts_[phase]
                record[f"{phase.value}batches"] = float(counts_[phase])
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
        if run.checkpoint_dir is not None:
            error = None
            if dist.is_main:
                counters = {
                    "step": step,
                    "history": history,
                    "best_objective": best_objective if math.isfinite(best_objective) else None,
                    "gate_passes": gate_batches.passes,
                    "gate_position": gate_batches.position,
                    "pos_weight": pos_weight.tolist(),
                }
                try:
                    save_fit_checkpoint(ee, run, config, epoch, optimizer, generator, counters, best_state)
                except Exception as err:  # a full disk, say: every rank stops, none waits in the next epoch
                    error = err
            dist.agree(error, f"writing the checkpoint of epoch {epoch}")
    if config.select == "best" and math.isfinite(best_objective):
        _restore(ee, best_state, config.train_backbone)
    return history
