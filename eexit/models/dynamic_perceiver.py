"""Dynamic Perceiver (Han et al., "Dynamic Perceiver for Efficient Visual Recognition", ICCV 2023,
https://arxiv.org/abs/2306.11248), re-implemented from its description and registered with timm.

A CNN *feature branch* and a Perceiver *classification branch* (a learned latent of 128 tokens) run side
by side and talk through cross-attention both ways (x2z and z2x, Sec. 3.2). Early exits read only the latent,
plus the CNN's own head and a final merged head (Sec. 3.3, Fig. 6). The forward returns the four exits' logits
in the released order ``(y_early3, y_att, y_cnn, y_merge)``:

1. ``early_classifier3``: mean latent after self-attention stage 3, before CNN stage 3.
2. ``classifier_att``: mean latent after stage 4's self-attention, concatenated with ``isc3(y_early3)``.
3. ``classifier_cnn``: the CNN head on the pooled output of CNN stage 4.
4. ``classifier_merge``: the final map after one more z2x cross-attention, pooled, concatenated with the mean
   latent and ``isc4(y_att)`` (the paper's forward knowledge transfer).

For real early exit, :meth:`DynPerceiver.forward_stages` exposes the forward as four stages, one per exit,
over a :class:`DynPerceiverState`; :meth:`DynPerceiver.shrink` drops the samples that have left. Attribute
names are those of the released code, so its checkpoints load by name
(:func:`load_official_dyn_perceiver_checkpoint`). The architecture is a :class:`DynPerceiverConfig`; the
released ones are registered with timm under their released names (:data:`PRESETS`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import Tensor, nn

from eexit.errors import EexitTypeError, EexitValueError
from eexit.models._checkpoint import load_checkpoint_file, load_into
from eexit.models._perceiver_layers import (
    CrossAttentionLayer,
    SelfAttentionBlock,
    TokenExpander,
    TokenMixer,
    map_to_tokens,
    tokens_to_map,
)
from eexit.models._perceiver_trunks import PRESETS, DynPerceiverConfig, build_trunk, with_overrides

__all__ = [
    "EXIT_NAMES",
    "PRESETS",
    "DynPerceiver",
    "DynPerceiverConfig",
    "DynPerceiverState",
    "PerceiverStage",
    "load_official_dyn_perceiver_checkpoint",
]

#: The exits in forward order; each name is the module that produces the exit's logits.
EXIT_NAMES = ("early_classifier3", "classifier_att", "classifier_cnn", "classifier_merge")
_POOL_GRID = 7  # x2z keys are the CNN map average-pooled to a fixed 7x7 grid (the released spatial_reduction)


@dataclass
class DynPerceiverState:
    """What flows between the stages of :meth:`DynPerceiver.forward_stages`; every tensor is batch-first.

    Attributes:
        x: The CNN map [B, C, H, W] (the images before stage 1).
        z: The latent [B, N, C].
        logits: The exits' logits so far, in exit order, each [B, num_classes]; later exits read earlier ones
            through the isc links.
    """

    x: Tensor
    z: Tensor
    logits: tuple[Tensor, ...] = field(default_factory=tuple)

    @property
    def batch_size(self) -> int:
        """Samples still running."""
        return self.x.shape[0]

    def select(self, keep_index: Tensor) -> DynPerceiverState:
        """The state of the samples ``keep_index`` (indices into the batch, or a boolean mask) only."""
        if keep_index.dtype == torch.bool:
            keep_index = keep_index.nonzero().flatten()
        keep_index = keep_index.to(self.x.device)
        return DynPerceiverState(
            x=self.x.index_select(0, keep_index),
            z=self.z.index_select(0, keep_index),
            logits=tuple(y.index_select(0, keep_index) for y in self.logits),
        )


@dataclass(frozen=True)
class PerceiverStage:
    """One segment of the forward: runs ``fn`` and appends the logits of exit ``exit_name`` to the state."""

    name: str
    exit_name: str
    fn: Callable[[DynPerceiverState], DynPerceiverState]

    def __call__(self, state: DynPerceiverState) -> DynPerceiverState:
        return self.fn(state)


class DynPerceiver(nn.Module):
    """The Dynamic Perceiver: CNN branch, latent branch, cross-attention both ways and four exits.

    Parameter names and shapes are the released ones; only the order of ``state_dict()`` differs a little
    (``classifier_cnn`` comes after ``isc4`` for every trunk), which loading by name does not see. Name exits
    by :data:`EXIT_NAMES`, not by registration order.

    Args:
        config: The architecture (default: ``PRESETS["reg800m_perceiver_t128"]``).
        **overrides: Fields of :class:`DynPerceiverConfig` to change.
    """

    def __init__(self, config: DynPerceiverConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = self.config = with_overrides(config or PRESETS["reg800m_perceiver_t128"], overrides)
        trunk = build_trunk(cfg.trunk, cfg.num_classes, cfg.cnn_drop_path_rate)
        c = trunk.stage_in_channels  # latent width of stage i = input width of CNN stage i
        self.min_input_size = trunk.min_input_size
        self.num_classes = cfg.num_classes
        self.latent = nn.Parameter(torch.empty(cfg.num_latents, c[0]))
        self.cnn_stem = trunk.stem
        self._body_layout = trunk.body_layout
        if trunk.body_layout == "cnn_body":
            self.cnn_body = nn.Sequential(OrderedDict((f"block{i + 1}", s) for i, s in enumerate(trunk.stages)))
        else:
            for i, stage in enumerate(trunk.stages):
                self.add_module(f"cnn_body_stage{i + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.ca_pooling = nn.AdaptiveAvgPool2d(_POOL_GRID)
        for i in range(4):
            has_x2z = i == 0 or cfg.with_x2z
            if has_x2z and cfg.with_dwc:
                self.add_module(f"dwc{i + 1}_x2z", nn.Conv2d(c[i], c[i], 7, padding=3, groups=c[i]))
            if has_x2z:
                x2z = CrossAttentionLayer(1, c[i], c[i], dropout=cfg.dropout, num_kv_tokens=_POOL_GRID**2)
                self.add_module(f"cross_att{i + 1}_x2z", x2z)
            if i > 0 and cfg.with_z2x:
                z2x = CrossAttentionLayer(1, c[i], c[i], c[i] // 8, dropout=cfg.dropout)
                self.add_module(f"cross_att{i + 1}_z2x", z2x)
            sa = SelfAttentionBlock(cfg.sa_layers[i], cfg.num_sa_heads[i], c[i], cfg.sa_widening_factor, cfg.dropout)
            self.add_module(f"self_att{i + 1}", sa)
        c_out = trunk.out_channels
        self.last_cross_att_z2x = (
            CrossAttentionLayer(1, c_out, c[3], c_out // 8, dropout=cfg.dropout) if cfg.with_last_ca else None
        )
        k = cfg.num_classes
        self.early_classifier3 = nn.Linear(c[2], k)
        if cfg.with_isc:
            self.isc3 = _isc(k, c[3])
            self.classifier_att = nn.Linear(2 * c[3], k)
            self.isc4 = _isc(k, c[3])
        else:
            self.classifier_att = nn.Linear(c[3], k)
        self.classifier_cnn = trunk.classifier
        merge_in = c_out + (2 if cfg.with_isc else 1) * c[3]
        self.classifier_merge = _merge_head(merge_in, k, trunk.head_hidden)
        tokens = [cfg.num_latents // 2**i for i in range(4)]
        self.token_expander = nn.ModuleList(TokenExpander(c[i], c[i + 1]) for i in range(3))
        self.token_mixer = nn.ModuleList(TokenMixer(tokens[i], tokens[i + 1]) for i in range(3))
        with torch.no_grad():  # the released latent init: N(0, 0.02) clamped to +-2
            self.latent.normal_(0.0, 0.02).clamp_(-2.0, 2.0)
        # Read by timm.data.resolve_data_config; values of the released training recipe.
        self.pretrained_cfg = self.default_cfg = {
            "input_size": (3, 224, 224), "min_input_size": (3, self.min_input_size, self.min_input_size),
            "interpolation": "bicubic", "crop_pct": 0.875, "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225), "num_classes": k, "classifier": "classifier_merge",
        }  # fmt: skip

    # ----------------------------------------------------------------------------------------- staged API

    @property
    def exit_names(self) -> tuple[str, ...]:
        """Modules producing the exits' logits, in forward order."""
        return EXIT_NAMES

    def initial_state(self, images: Tensor) -> DynPerceiverState:
        """Check ``images`` [B, 3, H, W]; wrap them, with the batch's latent, as the state before stage 1."""
        self._check_input(images)
        # A copy, not expand(): under no_grad an expanded view of the latent claims requires_grad without a
        # grad_fn, which breaks torch's module tracker (and so FlopCounterMode). [N, C] is small.
        return DynPerceiverState(x=images, z=self.latent.repeat(images.shape[0], 1, 1))

    def forward_stages(self) -> tuple[PerceiverStage, ...]:
        """The forward as four stages, one per exit, in the paper's inference order (Fig. 6).

        Stage k maps a :class:`DynPerceiverState` to the next and appends exit k's logits:
        ``stage1`` stem ... SA3 -> ``early_classifier3``; ``stage2`` CNN stage 3, z2x4/x2z4, SA4, isc3 ->
        ``classifier_att``; ``stage3`` CNN stage 4, pool -> ``classifier_cnn``; ``stage4`` last z2x, pool,
        isc4 -> ``classifier_merge``. Between stages, :meth:`shrink` may drop samples that exited.
        """
        return (
            PerceiverStage("stage1", EXIT_NAMES[0], self._stage1),
            PerceiverStage("stage2", EXIT_NAMES[1], self._stage2),
            PerceiverStage("stage3", EXIT_NAMES[2], self._stage3),
            PerceiverStage("stage4", EXIT_NAMES[3], self._stage4),
        )

    @staticmethod
    def shrink(state: DynPerceiverState, keep_index: Tensor) -> DynPerceiverState:
        """Keep only the samples ``keep_index`` in every batch-sized tensor of ``state`` (both branches).

        Meant for eval mode: in training mode BatchNorm statistics depend on which samples remain.
        """
        return state.select(keep_index)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Run every stage on images ``x`` [B, 3, H, W].

        Returns:
            ``(y_early3, y_att, y_cnn, y_merge)``, each [B, num_classes], in training and eval mode alike
            (as released).
        """
        state = self.initial_state(x)
        for stage in self.forward_stages():
            state = stage(state)
        return state.logits  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------ stages

    def _stage1(self, s: DynPerceiverState) -> DynPerceiverState:
        x = self.cnn_stem(s.x)
        z = self._x2z(0, x, s.z)
        z = self.self_att1(z)
        for i in (1, 2):  # C-stages 2 and 3: CNN stage i, reshape latent, z2x, x2z, self-attention
            x = self._cnn_stage(i - 1)(x)
            z = self._between(i - 1, z)
            x = self._z2x(i, x, z)
            z = self._x2z(i, x, z)
            z = getattr(self, f"self_att{i + 1}")(z)
        y_early3 = self.early_classifier3(z.mean(dim=1))  # [B, K]
        return DynPerceiverState(x, z, (y_early3,))

    def _stage2(self, s: DynPerceiverState) -> DynPerceiverState:
        x = self._cnn_stage(2)(s.x)
        z = self._between(2, s.z)
        x = self._z2x(3, x, z)
        z = self.self_att4(self._x2z(3, x, z))
        z_mean = z.mean(dim=1)  # [B, C4]
        feats = torch.cat((z_mean, self.isc3(s.logits[0])), dim=1) if self.config.with_isc else z_mean
        return DynPerceiverState(x, z, (*s.logits, self.classifier_att(feats)))

    def _stage3(self, s: DynPerceiverState) -> DynPerceiverState:
        x = self._cnn_stage(3)(s.x)
        pooled = self.avgpool(x).flatten(1)  # [B, C_out]
        pooled = F.dropout(pooled, self.config.cnn_drop_rate, self.training)
        return DynPerceiverState(x, s.z, (*s.logits, self.classifier_cnn(pooled)))

    def _stage4(self, s: DynPerceiverState) -> DynPerceiverState:
        x = s.x
        if self.last_cross_att_z2x is not None:
            h, w = x.shape[-2:]
            x = tokens_to_map(self.last_cross_att_z2x(map_to_tokens(x), s.z), h, w)
        parts = [self.avgpool(x).flatten(1), s.z.mean(dim=1)]  # [B, C_out], [B, C4]
        if self.config.with_isc:
            parts.append(self.isc4(s.logits[1]))
        return DynPerceiverState(x, s.z, (*s.logits, self.classifier_merge(torch.cat(parts, dim=1))))

    def _cnn_stage(self, i: int) -> nn.Module:
        if self._body_layout == "cnn_body":
            return self.cnn_body[i]
        return getattr(self, f"cnn_body_stage{i + 1}")

    def _between(self, i: int, z: Tensor) -> Tensor:
        """Token mixer (fewer tokens) then expander (wider channels) between C-stages i+1 and i+2."""
        return self.token_expander[i](self.token_mixer[i](z))

    def _x2z(self, i: int, x: Tensor, z: Tensor) -> Tensor:
        """The latent reads the (dwconv-enhanced) map pooled to 7x7 (paper Fig. 3)."""
        if i > 0 and not self.config.with_x2z:
            return z
        kv = x + getattr(self, f"dwc{i + 1}_x2z")(x) if self.config.with_dwc else x
        return getattr(self, f"cross_att{i + 1}_x2z")(z, map_to_tokens(self.ca_pooling(kv)))

    def _z2x(self, i: int, x: Tensor, z: Tensor) -> Tensor:
        """Every pixel of the map reads the latent (paper Fig. 5); the result replaces the map."""
        if not self.config.with_z2x:
            return x
        h, w = x.shape[-2:]
        return tokens_to_map(getattr(self, f"cross_att{i + 1}_z2x")(map_to_tokens(x), z), h, w)

    def _check_input(self, images: Tensor) -> None:
        if not isinstance(images, Tensor):
            raise EexitTypeError(f"DynPerceiver expects a torch.Tensor of images, got {type(images).__name__}.")
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise EexitValueError(
                f"DynPerceiver expects float images [B, 3, H, W], got {images.dtype} of shape "
                f"{tuple(images.shape)}. Add the batch dimension (x.unsqueeze(0)) or convert to RGB floats."
            )
        h, w = images.shape[-2:]
        if min(h, w) < self.min_input_size:
            raise EexitValueError(
                f"Image size {h}x{w} is too small for the {self.config.trunk!r} trunk: expected at least "
                f"{self.min_input_size}x{self.min_input_size} (its total stride), got {h}x{w}. Resize the "
                "images (the released models were trained at 224x224)."
            )
        if self.training and images.shape[0] < 2:
            raise EexitValueError(
                "DynPerceiver in training mode needs a batch of at least 2 samples (the BatchNorm1d layers "
                "of the isc links and merged head cannot normalise one), got 1. Use a larger batch or "
                "model.eval()."
            )


def _isc(num_classes: int, channels: int) -> nn.Sequential:
    """Inter-stage connection: earlier logits -> features of a later exit (Linear, BatchNorm1d, ReLU)."""
    return nn.Sequential(nn.Linear(num_classes, channels), nn.BatchNorm1d(channels), nn.ReLU(inplace=True))


def _merge_head(in_features: int, num_classes: int, hidden: int | None) -> nn.Sequential:
    """BatchNorm1d + Linear, or for MobileNet BatchNorm1d + Linear -> Hardswish -> Dropout(0.2) -> Linear."""
    if hidden is None:
        return nn.Sequential(nn.BatchNorm1d(in_features), nn.Linear(in_features, num_classes))
    return nn.Sequential(
        nn.BatchNorm1d(in_features), nn.Linear(in_features, hidden), nn.Hardswish(inplace=True),
        nn.Dropout(0.2, inplace=True), nn.Linear(hidden, num_classes),
    )  # fmt: skip


def _create(name: str, pretrained: bool, kwargs: dict[str, Any]) -> DynPerceiver:
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # passed by timm.create_model
        kwargs.pop(key, None)
    if pretrained:
        raise EexitValueError(
            f"{name}: eexit does not download weights (pretrained=True). Build with pretrained=False and "
            "load the released checkpoint file with eexit.models.dynamic_perceiver."
            "load_official_dyn_perceiver_checkpoint(model, path)."
        )
    return DynPerceiver(PRESETS[name], **kwargs)


@register_model
def reg800m_perceiver_t128(pretrained: bool = False, **kwargs: Any) -> DynPerceiver:
    """Dyn-Perceiver on RegNetY-800MF, 128 latents, SA layers 3/3/9/6 (21.8M parameters)."""
    return _create("reg800m_perceiver_t128", pretrained, kwargs)


@register_model
def resnet50_0375_perceiver_t128(pretrained: bool = False, **kwargs: Any) -> DynPerceiver:
    """Dyn-Perceiver on ResNet-50 x0.375, 128 latents, SA layers 3/3/9/3 (20.3M parameters)."""
    return _create("resnet50_0375_perceiver_t128", pretrained, kwargs)


@register_model
def mobilenetV3_0x75_perceiver_t128(pretrained: bool = False, **kwargs: Any) -> DynPerceiver:
    """Dyn-Perceiver on MobileNetV3-Large x0.75, 128 latents, SA layers 3/3/9/9 (9.3M parameters)."""
    return _create("mobilenetV3_0x75_perceiver_t128", pretrained, kwargs)


@register_model
def mobilenetv3_0x75_perceiver_t128(pretrained: bool = False, **kwargs: Any) -> DynPerceiver:
    """Lower-case alias of ``mobilenetV3_0x75_perceiver_t128``, for timm's usual naming."""
    return _create("mobilenetV3_0x75_perceiver_t128", pretrained, kwargs)


@register_model
def dyn_perceiver_tiny(pretrained: bool = False, **kwargs: Any) -> DynPerceiver:
    """A tiny Dyn-Perceiver for tests: 4-conv trunk (widths 8-64), 8 latents, 1 SA layer/stage, 5 classes."""
    return _create("dyn_perceiver_tiny", pretrained, kwargs)


def load_official_dyn_perceiver_checkpoint(
    model: DynPerceiver, path: str | os.PathLike[str], *, prefer_ema: bool = True, strict: bool = True
) -> DynPerceiver:
    """Load a released Dyn-Perceiver checkpoint (or one saved by its training script) into ``model``.

    The released layout is a pickle with ``model``, ``model_ema``, ``epoch``, ``optimizer`` and ``args`` (an
    ``argparse.Namespace``); it is read with the weights-only unpickler (``eexit.models._checkpoint``), which
    refuses any other pickled type. Bare state dicts, ``module.`` prefixes and ``.safetensors`` work too.

    Args:
        model: A DynPerceiver built with the checkpoint's configuration.
        path: The checkpoint file.
        prefer_ema: Take ``model_ema`` when present (the README's evaluation uses the EMA weights).
        strict: Require the keys to match exactly.

    Returns:
        ``model``, loaded.

    Raises:
        CheckpointError: The file is unsafe or unreadable, or its keys or shapes do not fit (listed by name).
    """
    load_into(model, load_checkpoint_file(path, prefer_ema=prefer_ema), strict=strict)
    return model
