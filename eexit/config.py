"""Configuration dataclasses, validated on construction and stored as JSON.

Two configs describe an adapter: :class:`ExitConfig` (where the exits are and what they look like, chosen at
:func:`eexit.attach`) and :class:`FitConfig` (how JEI-DNN trains them, Regol, Chataoui & Coates, ICLR 2024,
section 3 of ``reference/jei-dnn.md``). Both serialise to JSON with sorted keys, stamped with
``format_version`` and the eexit version; a file from a newer eexit loses unknown keys with a warning.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar

from .errors import EexitTypeError, EexitValueError

__all__ = ["FORMAT_VERSION", "ExitConfig", "FitConfig"]

#: Version of the saved adapter format. Bump it (and note it in CHANGELOG.md) whenever a saved file changes
#: in a way an older eexit cannot read.
#: 2: gate kinds (``ExitConfig.gates``) and history gate features; a version-1 file is read as ``gates="paper"``.
FORMAT_VERSION = 2

#: The paper's gate inputs: statistics of the gate's own IM softmax.
GATE_FEATURES = ("max_prob", "entropy", "margin", "entropy_pow")
#: Inputs that read the exits passed before (previous exit's max probability, whether its argmax agrees, for how
#: many consecutive exits, KL to it): what a confidence threshold cannot use.
HISTORY_FEATURES = ("prev_max_prob", "agree_prev", "agree_run", "kl_prev")
#: Gate formulations (DESIGN.md): the default consistent hazard gates, and the paper's additive gates.
GATE_KINDS = ("hazard", "paper")
#: What ``FitConfig.train_backbone`` accepts: frozen, every weight, or only a PEFT (LoRA) adapter's.
TRAIN_BACKBONE = (False, True, "lora")

_C = TypeVar("_C", bound="_JsonConfig")


def _eexit_version() -> str:
    from ._version import __version__

    return __version__


def _check_choice(name: str, value: object, allowed: Sequence[object]) -> None:
    if value not in allowed:
        raise EexitValueError(f"{name}={value!r} is not allowed; expected one of {list(allowed)}.")


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise EexitValueError(f"{name} must be a finite number, got {value!r}.")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise EexitValueError(f"{name} must be {bound}, got {value!r}.")


class _JsonConfig:
    """Shared JSON round trip of the config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (lists instead of tuples) with ``format_version`` and ``eexit_version``."""
        out = dataclasses.asdict(self)  # type: ignore[call-overload]
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        out["format_version"] = FORMAT_VERSION
        out["eexit_version"] = _eexit_version()
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls: type[_C], data: Mapping[str, Any]) -> _C:
        """Build a config from :meth:`to_dict` output.

        Unknown keys (written by a newer eexit) are dropped with a warning; a ``format_version`` newer than
        this eexit understands is an error, because the meaning of known keys may have changed.
        """
        if not isinstance(data, Mapping):
            raise EexitTypeError(f"{cls.__name__}.from_dict expects a mapping, got {type(data).__name__}.")
        version = data.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise EexitValueError(
                f"{cls.__name__} has format_version={version!r}, but this eexit reads format_version "
                f"1..{FORMAT_VERSION}. Upgrade eexit (pip install -U eexit) to read it."
            )
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known - {"format_version", "eexit_version"})
        if unknown:
            warnings.warn(
                f"{cls.__name__}: ignoring unknown keys {unknown} (written by eexit "
                f"{data.get('eexit_version', '?')}, a newer version?).",
                UserWarning,
                stacklevel=2,
            )
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known}
        return cls(**kwargs)


@dataclass
class ExitConfig(_JsonConfig):
    """Where exits sit on the backbone and what each one is.

    Attributes:
        exit_blocks: 0-based indices of the blocks whose outputs feed an IM (exit head). ``None`` puts one
            after every block but the last when the backbone has its own classifier (that classifier is the
            last exit), and after every block when it has none.
        head: ``"linear"`` (the paper's IM: one Linear on the pooled token), ``"mlp"`` (Linear-GELU-Linear), or, on
            graph backbones (GRIT), ``"graph_head"``: a fresh copy of the model's own graph head (the JEI-DNN
            authors' IMs there).
        head_hidden: hidden width of the ``"mlp"`` head; ``None`` uses the feature width.
        gates: the gate formulation (DESIGN.md, "the gate formulations"). ``"hazard"`` (default): gate l
            estimates the chance that exit l is the best of the exits still ahead, P(G=l) = h_l Π_{j<l}(1 - h_j),
            so the rule below is "exit when h_l >= threshold" and a threshold reaches every cost. ``"paper"``:
            JEI-DNN exactly as published (CDF targets, the additive min() model); reproduction and ablation.
        gate_features: statistics fed to each gate, in this order; ``None`` takes the kind's default: the four
            softmax statistics of the gate's IM (``GATE_FEATURES``) for ``"paper"``, plus the cross-exit ones
            (``HISTORY_FEATURES``) for ``"hazard"``.
        threshold: τ, an exit is taken at the first exit l with P(G=l) / P(G>=l) >= τ (JEI-DNN uses 0.5); in
            (0, 1]. Budget mode (:func:`eexit.sweep.budget_threshold`) moves it to meet a cost.
    """

    exit_blocks: tuple[int, ...] | None = None
    head: Literal["linear", "mlp", "graph_head"] = "linear"
    head_hidden: int | None = None
    gates: Literal["hazard", "paper"] = "hazard"
    gate_features: tuple[str, ...] | None = None
    threshold: float = 0.5

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExitConfig:
        """Build the config from JSON; a file written before gate kinds existed (no ``gates``) holds paper gates."""
        if isinstance(data, Mapping) and "gates" not in data:
            data = {**data, "gates": "paper"}
        return super().from_dict(data)

    def __post_init__(self) -> None:
        if self.exit_blocks is not None:
            blocks = tuple(self.exit_blocks)
            if not blocks or any(not isinstance(b, int) or isinstance(b, bool) for b in blocks):
                raise EexitValueError(
                    f"exit_blocks must be a non-empty sequence of block indices, got {self.exit_blocks!r}."
                )
            if list(blocks) != sorted(set(blocks)):
                raise EexitValueError(f"exit_blocks must be strictly increasing, got {list(blocks)}.")
            self.exit_blocks = blocks
        _check_choice("head", self.head, ["linear", "mlp", "graph_head"])
        if self.head_hidden is not None and (not isinstance(self.head_hidden, int) or self.head_hidden < 1):
            raise EexitValueError(f"head_hidden must be a positive int or None, got {self.head_hidden!r}.")
        _check_choice("gates", self.gates, GATE_KINDS)
        if self.gate_features is None:
            self.gate_features = GATE_FEATURES + (HISTORY_FEATURES if self.gates == "hazard" else ())
        self.gate_features = tuple(self.gate_features)
        allowed = GATE_FEATURES + HISTORY_FEATURES
        if not self.gate_features:
            raise EexitValueError(f"gate_features must name at least one of {list(allowed)}.")
        for feature in self.gate_features:
            _check_choice("gate_features entry", feature, allowed)
        if not isinstance(self.threshold, (int, float)) or not 0.0 < self.threshold <= 1.0:
            raise EexitValueError(
                f"threshold (τ) must be in (0, 1], got {self.threshold!r}: a sample exits at the first exit where "
                "P(G=l) / P(G>=l) >= τ; τ = 1 keeps every sample to the last exit."
            )


@dataclass
class FitConfig(_JsonConfig):
    """How :func:`eexit.fit` trains the exits (defaults follow the JEI-DNN paper's code, section 3.2).

    Attributes:
        lam: λ, the accuracy/cost trade-off (larger: earlier exits). Must be >= 0.
        epochs: total epochs, warm-up included.
        warmup_epochs: epochs that train the IMs alone before the gate/IM phases alternate.
        warmup_weighting: ``"depth"`` weights IM l's CE by (L - l) as the authors did; ``"uniform"`` weights all 1.
        im_weighting: ``"gate"`` weights IM l's CE by the detached P(G=l|x) (the paper's intent);
            ``"uniform"`` uses the plain mean CE (what the authors' released code computes in effect);
            ``"mixed"`` uses (1 - β)/E + β·P(G=l|x) with β = ``im_mix``, never renormalised per sample, so IMs
            that few samples reach still learn; ``"auto"``: ``"mixed"`` for hazard gates, ``"gate"`` for paper.
        im_mix: β of ``"mixed"``, in [0, 1].
        phase_batches: K, batches per phase before switching between the gate and the IM phase. The count
            runs across epochs, so small datasets still see both phases.
        optimizer: ``"sgd"`` (momentum, as the paper) or ``"adamw"``.
        lr, momentum, weight_decay, min_lr: optimiser settings; the learning rate follows a cosine from ``lr``
            to ``min_lr`` over the epochs, stepped once per epoch.
        pos_weight_cap: cap of the gate BCE positive weights r_j = min((N - n_j) / n_j, cap).
        pos_weight: which positive weights the gate loss uses: ``"paper"`` (r_j with n_j the validation samples
            whose l* = j, as the authors), ``"task"`` (r_j from gate j's own negatives/positives on the split the
            gates learn from), ``"none"`` (1: calibrated gates, what a threshold τ = 0.5 reads best);
            ``"auto"``: ``"none"`` for hazard gates, ``"paper"`` for paper gates.
        gate_fit: how gates learn. ``"sgd"``: gate phases of K batches in the JEI-DNN alternation (the paper).
            ``"exact"``: the gate loss is convex in each gate's F + 1 weights (its inputs are detached), so after
            warm-up and after every epoch of IM training every gate is refitted to its optimum by L-BFGS on
            standardised inputs, samples weighted by their probability of reaching it; every batch trains IMs.
            ``"auto"``: ``"exact"`` for hazard gates, ``"sgd"`` for paper gates.
        gate_data: which split the gates learn from: ``"train"`` (the paper) or ``"val"``, the held-out exit
            outputs, which look like test outputs (on the training images a backbone has memorised, every exit
            is right and l* says little); ``"auto"``: ``"val"`` for hazard gates, ``"train"`` for paper gates.
        ic: the normalised cost IC_l that λ prices in the gate targets and the validation objective:
            ``"measured"`` (the cost table's FLOPs, as the authors' current code) or ``"depth"`` (the depth
            fraction (block + 1) / depth, as their paper-time code, ``reference/jei-dnn.md`` §4 pitfall 2).
            Reported costs are always the measured ones.
        train_backbone: fine-tune the backbone too (the paper's end-to-end variant), with ``backbone_lr``:
            ``True`` trains every backbone weight; ``"lora"``, the cheap variant, trains only the PEFT adapter's
            trainable parameters (what PEFT marked ``requires_grad``) of a backbone attached as a ``peft.PeftModel``,
            the base weights staying frozen; ``False`` keeps the backbone frozen.
        backbone_lr: learning rate of the backbone parameters when ``train_backbone`` is set.
        cache_features: compute each exit's pooled features once and reuse them every epoch. ``None`` (auto)
            caches whenever the backbone is frozen. Turn it off when the train loader augments its images.
        select: ``"best"`` restores the adapter state of the epoch with the lowest validation objective,
            ``"last"`` keeps the final one.
        batch_size: batch size used to iterate cached features (the loaders' own batch size is used otherwise).
        seed: seed of the head/gate initialisation and of the cached-feature shuffling.
        progress: show tqdm progress bars.
    """

    lam: float = 0.5
    epochs: int = 15
    warmup_epochs: int = 3
    warmup_weighting: Literal["depth", "uniform"] = "depth"
    im_weighting: Literal["auto", "gate", "uniform", "mixed"] = "auto"
    im_mix: float = 0.5
    phase_batches: int = 200
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    min_lr: float = 2e-4
    pos_weight_cap: float = 5.0
    pos_weight: Literal["auto", "paper", "task", "none"] = "auto"
    gate_fit: Literal["auto", "sgd", "exact"] = "auto"
    gate_data: Literal["auto", "train", "val"] = "auto"
    ic: Literal["measured", "depth"] = "measured"
    train_backbone: bool | Literal["lora"] = False
    backbone_lr: float = 1e-4
    cache_features: bool | None = None
    select: Literal["best", "last"] = "best"
    batch_size: int = 64
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.lam, (int, float)) or isinstance(self.lam, bool) or not math.isfinite(self.lam):
            raise EexitValueError(f"lam (λ) must be a finite number, got {self.lam!r}.")
        if self.lam < 0:
            raise EexitValueError(
                f"lam (λ) must be >= 0, got {self.lam}: λ prices computation, a negative price would reward "
                "running longer. Use lam=0 to ignore cost."
            )
        for name in ("epochs", "phase_batches", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise EexitValueError(f"{name} must be a positive int, got {value!r}.")
        if not isinstance(self.warmup_epochs, int) or not 0 <= self.warmup_epochs <= self.epochs:
            raise EexitValueError(
                f"warmup_epochs must be an int in [0, epochs={self.epochs}], got {self.warmup_epochs!r}."
            )
        _check_choice("warmup_weighting", self.warmup_weighting, ["depth", "uniform"])
        _check_choice("im_weighting", self.im_weighting, ["auto", "gate", "uniform", "mixed"])
        _check_choice("pos_weight", self.pos_weight, ["auto", "paper", "task", "none"])
        _check_choice("gate_fit", self.gate_fit, ["auto", "sgd", "exact"])
        _check_choice("gate_data", self.gate_data, ["auto", "train", "val"])
        if isinstance(self.im_mix, bool) or not isinstance(self.im_mix, (int, float)) or not 0 <= self.im_mix <= 1:
            raise EexitValueError(f"im_mix (β) must be a number in [0, 1], got {self.im_mix!r}.")
        _check_choice("optimizer", self.optimizer, ["sgd", "adamw"])
        _check_choice("select", self.select, ["best", "last"])
        _check_choice("ic", self.ic, ["measured", "depth"])
        if not isinstance(self.train_backbone, bool) and self.train_backbone != "lora":
            raise EexitValueError(
                f"train_backbone={self.train_backbone!r} is not allowed; expected one of {list(TRAIN_BACKBONE)}: "
                "False (frozen backbone), True (train every backbone weight) or 'lora' (train only the LoRA / PEFT "
                "adapter of a backbone wrapped with peft.get_peft_model)."
            )
        _check_positive("lr", self.lr)
        _check_positive("backbone_lr", self.backbone_lr)
        _check_positive("momentum", self.momentum, allow_zero=True)
        _check_positive("weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("min_lr", self.min_lr, allow_zero=True)
        _check_positive("pos_weight_cap", self.pos_weight_cap)
        if self.min_lr > self.lr:
            raise EexitValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr}).")
        if self.cache_features and self.train_backbone:
            raise EexitValueError(
                f"cache_features=True cannot be combined with train_backbone={self.train_backbone!r}: the features "
                "change as the backbone trains. Leave cache_features=None (auto)."
            )

    def resolved(self, gates: str) -> FitConfig:
        """This config with every ``"auto"`` replaced by the choice for gates of kind ``gates``."""
        hazard = gates == "hazard"
        auto = {
            "im_weighting": "mixed" if hazard else "gate",
            "pos_weight": "none" if hazard else "paper",
            "gate_fit": "exact" if hazard else "sgd",
            "gate_data": "val" if hazard else "train",
        }
        return dataclasses.replace(self, **{k: v for k, v in auto.items() if getattr(self, k) == "auto"})
