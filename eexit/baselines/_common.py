"""What the trained baselines share: IM training on cached features of a frozen backbone.

As in the JEI-DNN authors' ports of BoostedNet and L2W-DEN (``reference/jei-dnn.md`` §7), only the IMs learn;
the backbone and its own head stay frozen, so each exit's features are computed once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from eexit.data import FeatureCache, check_loader
from eexit.errors import EexitTypeError, EexitValueError, TrainingError
from eexit.evaluation import collect_outputs
from eexit.model import EarlyExitModel

__all__ = ["TrainSettings", "exit_logits", "feature_cache", "train_ims"]


@dataclass
class TrainSettings:
    """Optimiser and schedule of a baseline's IM training (validated on construction).

    Attributes:
        epochs: passes over the training features.
        optimizer: ``"adamw"`` or ``"sgd"`` (momentum).
        lr, min_lr: cosine schedule from ``lr`` to ``min_lr``, stepped once per epoch.
        weight_decay, momentum: optimiser settings (momentum only for SGD).
        batch_size: mini-batch size over the cached features.
        select: ``"best"`` keeps the epoch with the best validation score, ``"last"`` the final one.
        seed: seed of the shuffling (and of any new module the baseline builds).
        progress: show a progress bar.
    """

    epochs: int = 30
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 5e-3
    min_lr: float = 1e-4
    weight_decay: float = 1e-4
    momentum: float = 0.9
    batch_size: int = 64
    select: Literal["best", "last"] = "best"
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EexitValueError(f"{name} must be a positive int, got {value!r}.")
        if self.optimizer not in ("adamw", "sgd"):
            raise EexitValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}.")
        if self.select not in ("best", "last"):
            raise EexitValueError(f"select must be 'best' or 'last', got {self.select!r}.")
        for name in ("lr", "min_lr", "weight_decay", "momentum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise EexitValueError(f"{name} must be a finite number, got {value!r}.")
            if value < 0 or (name == "lr" and value == 0):
                raise EexitValueError(f"{name} must be {'> 0' if name == 'lr' else '>= 0'}, got {value!r}.")
        if self.min_lr > self.lr:
            raise EexitValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr}).")

    def lr_at(self, epoch: int) -> float:
        """Cosine from lr to min_lr over the epochs."""
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * epoch / self.epochs))


def feature_cache(ee: EarlyExitModel, source: Iterable[Any] | FeatureCache, name: str) -> FeatureCache:
    """``source`` itself if it is a cache, else the features of one pass of the frozen backbone over it."""
    if not isinstance(ee, EarlyExitModel):
        raise EexitTypeError(f"expected the EarlyExitModel from eexit.attach, got {type(ee).__name__}.")
    if isinstance(source, FeatureCache):
        return source
    check_loader(source, name)
    return FeatureCache.collect(ee, source, name, progress=False)


def exit_logits(ee: EarlyExitModel, features: list[torch.Tensor], final: torch.Tensor | None) -> torch.Tensor:
    """Every exit's logits ``[E, B, C]`` from cached features.

    Goes through the model's own ``outputs_from_features`` so that exits reading earlier exits (the Dynamic
    Perceiver's isc links) are computed as the model computes them; the gate logits are not used here.
    """
    return ee.outputs_from_features(features, final).logits  # [E, B, C]


def make_optimizer(params: list[torch.nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)


#: One training step: (features, head logits or None, labels, step index, current lr) -> loss value.
StepFn = Callable[[list[torch.Tensor], "torch.Tensor | None", torch.Tensor, int, float], float]
#: Validation score, higher is better: (all-exit logits [E, N, C], labels [N]) -> float.
ScoreFn = Callable[[torch.Tensor, torch.Tensor], float]


def train_ims(
    ee: EarlyExitModel,
    train: FeatureCache,
    val: FeatureCache,
    settings: TrainSettings,
    step: StepFn,
    score: ScoreFn,
    optimizer: torch.optim.Optimizer,
    desc: str,
) -> list[dict[str, float]]:
    """The loop the baselines share: epochs of ``step`` over shuffled cached features, then validation.

    Returns:
        Per-epoch history (``train_loss``, ``val_score``); the adapter keeps the best (or last) epoch's state.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    best_state, best_score = ee.adapter_state_dict(), -math.inf
    history: list[dict[str, float]] = []
    count = 0
    try:
        for epoch in tqdm(range(settings.epochs), desc=desc, disable=not settings.progress):
            lr = settings.lr_at(epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            ee.train(True)
            total, batches = 0.0, 0
            for feats, final, labels in train.batches(settings.batch_size, True, generator):
                loss = step(feats, final, labels, count, lr)
                if not math.isfinite(loss):
                    ee.load_adapter_state_dict(best_state)
                    raise TrainingError(
                        f"{desc}: the loss became {loss} at epoch {epoch}; the adapter was reset to the best state "
                        "so far. Lower lr or check the inputs' normalisation."
                    )
                total, batches, count = total + loss, batches + 1, count + 1
            ee.eval()
            out = collect_outputs(ee, val)  # logits and labels both on the CPU, wherever the cache lives
            val_score = score(out.logits, out.labels)
            history.append({"epoch": float(epoch), "train_loss": total / max(batches, 1), "val_score": val_score})
            if val_score > best_score:
                best_state, best_score = ee.adapter_state_dict(), val_score
    finally:
        ee.eval()
    if settings.select == "best":
        ee.load_adapter_state_dict(best_state)
    return history


def mean_exit_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Validation score of the baselines: accuracy averaged over the exits (anytime quality)."""
    return float((logits.argmax(-1) == labels.to(logits.device).unsqueeze(0)).double().mean())
