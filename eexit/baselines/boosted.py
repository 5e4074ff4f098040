"""BoostedNet: each exit learns the residual of the ensemble of the exits before it.

Yu et al., "Boosted Dynamic Neural Networks", AAAI 2023 (``SHI-Labs/Boosted-Dynamic-Networks``;
``reference/jei-dnn.md`` §7). Exit k predicts with the ensemble

    F_0 = f_0,    F_k = f_k + γ·F_{k-1}

where f_k is IM k's logits, and weak learner k is trained on CE(y, f_k + γ·stopgrad(F_{k-1})): it learns what
the ensemble before it gets wrong. Exits are then taken with confidence thresholds on the softmax of F_k, fitted
by the MSDNet budgeted-batch protocol (:func:`eexit.baselines.budgeted_curve` on :meth:`BoostedNet.logits`).

**Train/test convention.** The original code trains on F'_k = γ·(f_k + F'_{k-1}) but tests on f_k + γ·F_{k-1}
(``models/dynamic_net.py``, ``forward_all`` vs ``forward``; the JEI-DNN port copies it). By induction
F'_k = γ·F_k: the argmax is the same, but the test logits are 1/γ times those the CE was fitted on (a softmax
at temperature γ), so test confidences are sharper than trained, which moves confidence thresholds and
inflates calibration error. We use one ensemble, F_k = f_k + γ·F_{k-1}, in training and at test.

**The backbone's own head** is frozen and never learned a residual, so by default it stays out of the ensemble
(``boost_head=False``): the last exit predicts exactly as the backbone does. A headless backbone's last exit is
a trained IM and is boosted like the others.

Only the IMs learn, on cached features of the frozen backbone, as in the JEI-DNN port; the gradient rescaling
the original applies inside the backbone is moot when the backbone is frozen.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from eexit.data import FeatureCache
from eexit.errors import EexitTypeError, EexitValueError
from eexit.inference import ExitState
from eexit.model import EarlyExitModel, EarlyExitOutput

from ._common import TrainSettings, exit_logits, feature_cache, make_optimizer, mean_exit_accuracy, train_ims
from .thresholds import SCORES

__all__ = ["BoostedNet", "boosted_logits", "train_boosted"]


def _check_gamma(gamma: float) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
        raise EexitValueError(f"gamma (the ensemble re-weight γ) must be a finite number >= 0, got {gamma!r}.")
    return float(gamma)


def boosted_logits(logits: Tensor, gamma: float = 0.5, *, boost_last: bool = True) -> Tensor:
    """The ensemble logits F_k = f_k + γ·F_{k-1} (F_0 = f_0) of every exit.

    Args:
        logits: every exit's own logits f ``[E, N, C]``.
        gamma: the ensemble re-weight γ >= 0 (the original's CIFAR setting: 0.5).
        boost_last: also boost the last exit; ``False`` leaves it as f_{E-1} (a frozen backbone head).

    Returns:
        ``[E, N, C]`` ensemble logits.
    """
    if not isinstance(logits, Tensor) or logits.ndim != 3 or not logits.is_floating_point():
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise EexitValueError(f"logits: expected a float tensor [E, N, C], got {shape}.")
    gamma = _check_gamma(gamma)
    out = [logits[0]]  # F_0 = f_0
    for k in range(1, logits.shape[0]):
        if k == logits.shape[0] - 1 and not boost_last:
            out.append(logits[k])
        else:
            out.append(logits[k] + gamma * out[-1])  # [N, C]
    return torch.stack(out)  # [E, N, C]


class _BoostedThresholds:
    """The exit policy of one early-exit call: keeps each sample's running ensemble and thresholds it."""

    def __init__(self, thresholds: Tensor, gamma: float, score: str) -> None:
        self.thresholds = thresholds
        self.gamma = gamma
        self.score = SCORES[score]
        self.ensemble: Tensor | None = None  # [B, C]: F of each sample at the last exit it reached

    def __call__(self, exit_index: int, logits: Tensor, gate_logit: Tensor | None, state: ExitState) -> Tensor:
        if self.ensemble is None:  # exit 0 sees the whole batch
            self.ensemble = logits.new_zeros(state.positions.numel(), logits.shape[-1])
        if exit_index == 0:
            current = logits  # F_0 = f_0
        else:
            current = logits + self.gamma * self.ensemble[state.positions]  # [b, C]
        self.ensemble[state.positions] = current
        confidence = self.score(current)  # [b] float64
        return confidence >= self.thresholds[exit_index].to(confidence.device)


@dataclass
class BoostedNet:
    """IMs trained as a boosted ensemble (from :func:`train_boosted`), and how to predict with them.

    Attributes:
        ee: the model whose IMs were trained.
        gamma: the ensemble re-weight γ.
        boost_head: whether the backbone's own (frozen) head is part of the ensemble.
        history: per-epoch training loss and validation score (mean over exits of the ensemble accuracy).
    """

    ee: EarlyExitModel
    gamma: float = 0.5
    boost_head: bool = False
    history: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def from_model(cls, ee: EarlyExitModel) -> BoostedNet:
        """The BoostedNet whose IMs ``ee`` holds, e.g. after loading its adapter: γ and ``boost_head`` come from
        the adapter (:func:`train_boosted` records them in ``ee.boosted``, and ``save_pretrained`` saves them)."""
        if not isinstance(ee, EarlyExitModel):
            raise EexitTypeError(f"expected the EarlyExitModel from eexit.attach, got {type(ee).__name__}.")
        if ee.boosted is None:
            raise EexitValueError(
                f"adapter {ee.active_adapter!r} was not trained as a BoostedNet (no ensemble settings recorded); "
                "train it with eexit.baselines.train_boosted, or build BoostedNet(ee, gamma=...) yourself."
            )
        return cls(ee, _check_gamma(ee.boosted["gamma"]), bool(ee.boosted.get("boost_head", False)), list(ee.history))

    @property
    def boost_last(self) -> bool:
        """Whether the last exit predicts with the ensemble (always when it is a trained IM)."""
        return self.boost_head or not self.ee.has_backbone_head

    def logits(self, all_exit_logits: Tensor) -> Tensor:
        """Ensemble logits ``[E, N, C]`` from every exit's own logits (e.g. ``collect_outputs(...).logits``)."""
        return boosted_logits(all_exit_logits, self.gamma, boost_last=self.boost_last)

    @torch.no_grad()
    def forward(
        self, pixel_values: Tensor, thresholds: Sequence[float] | Tensor, score: str = "max_probability"
    ) -> EarlyExitOutput:
        """Real early exit with ensemble predictions: a sample stops at the first exit whose ensemble
        confidence reaches that exit's threshold, and the later blocks never run for it.

        Args:
            pixel_values: images ``[B, C, H, W]``.
            thresholds: per-exit thresholds ``[E]`` or ``[E-1]`` (e.g. ``OperatingPoint.thresholds``; the last
                exit always accepts).
            score: a name in :data:`eexit.baselines.SCORES`, the one the thresholds were fitted with.

        Returns:
            An :class:`~eexit.model.EarlyExitOutput` whose logits are each sample's ensemble F at its exit.
        """
        thr = torch.as_tensor(thresholds, dtype=torch.float64)
        if thr.ndim != 1 or thr.numel() not in (self.ee.num_exits, self.ee.num_exits - 1):
            raise EexitValueError(
                f"thresholds: expected {self.ee.num_exits - 1} or {self.ee.num_exits} values (one per exit), got "
                f"shape {tuple(thr.shape)}."
            )
        if score not in SCORES:
            raise EexitValueError(f"score: expected one of {sorted(SCORES)}, got {score!r}.")
        policy = _BoostedThresholds(thr, self.gamma, score)
        out = self.ee(pixel_values, policy=policy)
        assert isinstance(out, EarlyExitOutput)  # early-exit forward, not all_exits
        ensemble = policy.ensemble
        if ensemble is None:  # a single exit: nothing to ensemble
            return out
        last = self.ee.num_exits - 1
        logits = out.logits.clone()
        early = out.exit_index < last  # [B]
        logits[early] = ensemble[early].to(logits.dtype)
        if self.boost_last:
            logits[~early] = logits[~early] + self.gamma * ensemble[~early].to(logits.dtype)
        return EarlyExitOutput(logits=logits, exit_index=out.exit_index, cost=out.cost)


def boosted_loss(logits: Tensor, labels: Tensor, gamma: float, num_trained: int) -> Tensor:
    """Σ_k CE(y, f_k + γ·stopgrad(F_{k-1})) over the first ``num_trained`` exits, mean over samples.

    Args:
        logits: every exit's own logits ``[E, B, C]``.
        labels: ``[B]``.
        gamma: γ.
        num_trained: exits that learn (the IMs; a frozen backbone head is left out).
    """
    loss = logits.new_zeros(())
    previous: Tensor | None = None
    for k in range(num_trained):
        current = logits[k] if previous is None else logits[k] + gamma * previous.detach()  # [B, C]
        loss = loss + F.cross_entropy(current.float(), labels)
        previous = current
    return loss


def train_boosted(
    ee: EarlyExitModel,
    train_loader: Iterable[Any] | FeatureCache,
    val_loader: Iterable[Any] | FeatureCache,
    *,
    gamma: float = 0.5,
    boost_head: bool = False,
    **settings: Any,
) -> BoostedNet:
    """Train the IMs of ``ee`` as a boosted ensemble (the backbone stays frozen; the gates are not used).

    Args:
        ee: the model :func:`eexit.attach` returned; its IMs are trained in place from their current state.
        train_loader: training data (a loader or a FeatureCache of this model).
        val_loader: validation data for model selection (mean over exits of the ensemble accuracy).
        gamma: the ensemble re-weight γ (0.5 in the original's CIFAR script).
        boost_head: also put the backbone's frozen head in the ensemble.
        **settings: :class:`~eexit.baselines._common.TrainSettings` fields (``epochs``, ``lr``, ...).

    Returns:
        A :class:`BoostedNet`; evaluate it with ``budgeted_curve(net.logits(val.logits), net.logits(test.logits),
        ...)`` and run real early exit with ``net.forward(images, point.thresholds)``.
    """
    if not isinstance(ee, EarlyExitModel):
        raise EexitTypeError(f"train_boosted expects the EarlyExitModel from eexit.attach, got {type(ee).__name__}.")
    gamma = _check_gamma(gamma)
    config = TrainSettings(**settings)
    train, val = feature_cache(ee, train_loader, "train_loader"), feature_cache(ee, val_loader, "val_loader")
    net = BoostedNet(ee, gamma, bool(boost_head))
    torch.manual_seed(config.seed)
    optimizer = make_optimizer(list(ee.heads.parameters()), config)

    def step(feats: list[Tensor], final: Tensor | None, labels: Tensor, index: int, lr: float) -> float:
        loss = boosted_loss(exit_logits(ee, feats, final), labels, gamma, len(ee.heads))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    def score(logits: Tensor, labels: Tensor) -> float:
        return mean_exit_accuracy(net.logits(logits), labels)

    net.history = train_ims(ee, train, val, config, step, score, optimizer, f"BoostedNet γ={gamma:g}")
    ee.fit_config, ee.history = None, net.history
    ee.boosted = {"gamma": gamma, "boost_head": net.boost_head}  # saved with the adapter: its IMs are an ensemble
    return net
