"""Dynamic Perceiver (Han et al., "Dynamic Perceiver for Efficient Visual Recognition", ICCV 2023,
https://arxiv.org/abs/2306.11248), re-implemented from its description and registered with timm.

A CNN *feature branch* and a Perceiver *classification branch* (a learned latent of 128 tokens) run side
by side and talk through cross-attention both ways (x2z and z2x, Sec. 3.2). Early exits read only the latent,
plus the CNN's own head and a final merged head (Sec. 3.3, Fig. 6). Four exits, in the released order:

1. ``early_classifier3``: mean latent after self-attention stage 3, before CNN stage 3.
2. ``classifier_att``: mean latent after stage 4's self-attention, concatenated with ``isc3(y_early3)``.
3. ``classifier_cnn``: the CNN head on the pooled output of CNN stage 4.
4. ``classifier_merge``: the final map after one more z2x cross-attention, pooled, concatenated with the mean
   latent and ``isc4(y_att)`` (the paper's forward knowledge transfer).

The model is a timm classifier: ``model(x)`` in eval mode returns the merged logits ``y_merge`` [B, K];
:meth:`DynPerceiver.forward_exits` returns all four exits ``(y_early3, y_att, y_cnn, y_merge)`` (what the
released forward returns). In training mode ``model(x)`` returns the four exits too, since the released
training puts a loss on every exit (as timm's distilled DeiT / LeViT do after ``set_distilled_training(True)``;
here it is the default, because timm's backward test requires a gradient for every parameter and
``classifier_cnn`` feeds no other exit). ``model.set_exits_training(False)`` makes it return the merged logits
in training as well, e.g. for timm's ``train.py`` (then ``classifier_cnn`` gets no gradient: under DDP use
``find_unused_parameters=True`` or freeze it).

timm's model API: ``forward_features(x)`` is what the merged head reads, the list ``[final map [B, C, H, W],
latent [B, N, C4], y_att [B, K]]``; ``forward_head(features, pre_logits=False)`` the merged logits, or with
``pre_logits=True`` the vector the merged head's final Linear reads (``num_features == head_hidden_size`` wide);
``reset_classifier`` / ``get_classifier``; ``forward_intermediates`` / ``prune_intermediate_layers`` /
``features_only=True`` over the CNN maps after each of the four stages (and the z2x cross-attention that
follows it); the ``device=`` / ``dtype=`` factory arguments; TorchScript and torch.fx. The forward is plain
tensor code over the same step methods that the staged API below runs (in two orderings: the forward's and
the stages'; tests check that their outputs are equal).

For real early exit, :meth:`DynPerceiver.forward_stages` exposes the forward as four stages, one per exit,
over a :class:`DynPerceiverState`; :meth:`DynPerceiver.shrink` drops the samples that have left. Attribute
names are those of the released code, so its checkpoints load by name
(:func:`load_official_dyn_perceiver_checkpoint`). The architecture is a :class:`DynPerceiverConfig`; the
released ones are registered with timm under their released names (:data:`PRESETS`). No weights can be
downloaded: load a released file with :func:`load_official_dyn_perceiver_checkpoint`.
"""

# No `from __future__ import annotations` here: torch.fx copies the forward's annotations into the code it
# generates, and TorchScript (scripting that code) cannot read them back as strings.
import os
from collections import OrderedDict
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, register_notrace_function
from torch import Tensor, nn

from eexit.errors import EexitTypeError, EexitValueError
from eexit.models._checkpoint import load_checkpoint_file, load_into
from eexit.models._indices import feature_indices
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
_NUM_TAPS = 4  # forward_intermediates / features_only: the CNN map after each of the four stages


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

    def select(self, keep_index: Tensor) -> "DynPerceiverState":
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
    by :data:`EXIT_NAMES`, not by registration order. Modules a configuration lacks (``isc3`` without
    ``with_isc``, ``dwc2_x2z`` without ``with_dwc`` ...) are ``None`` attributes; so are those that
    :meth:`prune_intermediate_layers` removed.

    Args:
        config: The architecture (default: ``PRESETS["reg800m_perceiver_t128"]``).
        in_chans: Image channels; 3 only (timm passes it).
        global_pool: ``"avg"`` or ``None``: the merged head averages the final map, as released.
        device: Where to create the tensors (timm's factory argument; e.g. ``"meta"``).
        dtype: Their floating-point type.
        **overrides: Fields of :class:`DynPerceiverConfig` to change, in the released spellings too.
            ``num_classes=0`` removes the merged head's final Linear only (``forward`` then returns its
            ``pre_logits`` vector); the other exits keep the configuration's class count, since the merged
            head reads them through the isc links.

    Raises:
        EexitTypeError: An unknown option (named, with the valid ones).
        EexitValueError: A value the architecture cannot take.
    """

    __jit_unused_properties__ = ["exit_names"]  # noqa: RUF012  (TorchScript's hook, read from the class)

    def __init__(
        self,
        config: DynPerceiverConfig | None = None,
        *,
        in_chans: int = 3,
        global_pool: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        if in_chans != 3:
            raise EexitValueError(
                f"The Dynamic Perceiver takes RGB images (in_chans=3); got in_chans={in_chans!r}. Convert the "
                "images to 3 channels (e.g. repeat a grey channel) and leave in_chans at 3."
            )
        _check_pool(global_pool)
        num_classes = overrides.pop("num_classes", None)
        if num_classes is not None:
            _check_num_classes(num_classes)
            if num_classes > 0:
                overrides["num_classes"] = num_classes
        cfg = with_overrides(config or PRESETS["reg800m_perceiver_t128"], overrides)
        # The whole model is built on ``device`` (torchvision's trunk constructors take no device argument);
        # dtype is applied at the end, after the float32 initialisation.
        with torch.device(device) if device is not None else nullcontext():
            self._build(cfg)
        if num_classes == 0:
            self.reset_classifier(0)
        if dtype is not None:
            self.to(dtype)

    def _build(self, cfg: DynPerceiverConfig) -> None:
        self.config = cfg
        trunk = build_trunk(cfg.trunk, cfg.num_classes, cfg.cnn_drop_path_rate)
        c = trunk.stage_in_channels  # latent width of stage i = input width of CNN stage i
        self.in_chans = 3
        self.num_classes = cfg.num_classes
        self.global_pool = "avg"
        self.min_input_size = trunk.min_input_size
        self.cnn_drop_rate = float(cfg.cnn_drop_rate)
        self.exits_training = True
        self.latent = nn.Parameter(torch.empty(cfg.num_latents, c[0]))
        self.cnn_stem = trunk.stem
        stage_names = []
        if trunk.body_layout == "cnn_body":
            self.cnn_body = nn.Sequential(OrderedDict((f"block{i + 1}", s) for i, s in enumerate(trunk.stages)))
            for i in range(4):
                setattr(self, f"cnn_body_stage{i + 1}", None)
                stage_names.append(f"cnn_body.block{i + 1}")
        else:
            self.cnn_body = None
            for i, stage in enumerate(trunk.stages):
                self.add_module(f"cnn_body_stage{i + 1}", stage)
                stage_names.append(f"cnn_body_stage{i + 1}")
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.ca_pooling = nn.AdaptiveAvgPool2d(_POOL_GRID)
        for i in range(4):
            has_x2z = i == 0 or cfg.with_x2z
            dwc = nn.Conv2d(c[i], c[i], 7, padding=3, groups=c[i]) if has_x2z and cfg.with_dwc else None
            setattr(self, f"dwc{i + 1}_x2z", dwc)
            x2z = CrossAttentionLayer(1, c[i], c[i], dropout=cfg.dropout, num_kv_tokens=_POOL_GRID**2)
            setattr(self, f"cross_att{i + 1}_x2z", x2z if has_x2z else None)
            if i > 0:
                z2x = CrossAttentionLayer(1, c[i], c[i], c[i] // 8, dropout=cfg.dropout) if cfg.with_z2x else None
                setattr(self, f"cross_att{i + 1}_z2x", z2x)
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
            self.isc3 = self.isc4 = None
            self.classifier_att = nn.Linear(c[3], k)
        self.classifier_cnn = trunk.classifier
        merge_in = c_out + (2 if cfg.with_isc else 1) * c[3]
        self.classifier_merge = _merge_head(merge_in, k, trunk.head_hidden)
        # timm: the width of forward_head(pre_logits=True), i.e. of what the merged head's final Linear reads.
        self.num_features = self.head_hidden_size = trunk.head_hidden or merge_in
        tokens = [cfg.num_latents // 2**i for i in range(4)]
        self.token_expander = nn.ModuleList(TokenExpander(c[i], c[i + 1]) for i in range(3))
        self.token_mixer = nn.ModuleList(TokenMixer(tokens[i], tokens[i + 1]) for i in range(3))
        with torch.no_grad():  # the released latent init: N(0, 0.02) clamped to +-2
            self.latent.normal_(0.0, 0.02).clamp_(-2.0, 2.0)

        # timm: one feature per CNN stage, the map after the stage and the z2x cross-attention that follows it.
        tap_modules = [f"cross_att{i + 2}_z2x" if cfg.with_z2x else stage_names[i] for i in range(3)]
        tap_modules.append("last_cross_att_z2x" if cfg.with_last_ca else stage_names[3])
        tap_channels = (c[1], c[2], c[3], c_out)
        self.feature_info = [
            {"num_chs": tap_channels[i], "reduction": trunk.stage_reductions[i], "module": tap_modules[i]}
            for i in range(_NUM_TAPS)
        ]
        self._latent_channels = (c[1], c[2], c[3], c[3])  # latent width at each tap
        # Read by timm.data.resolve_data_config; timm.create_model replaces it with the registered cfg (same values).
        side = trunk.default_input_size
        self.pretrained_cfg = self.default_cfg = _cfg(
            num_classes=k,
            input_size=(3, side, side),
            pool_size=(side // trunk.stage_reductions[-1],) * 2,
            min_input_size=(3, trunk.min_input_size, trunk.min_input_size),
            crop_pct=0.875 if side == 224 else 1.0,
            first_conv="cnn_stem." + next(n for n, m in trunk.stem.named_modules() if isinstance(m, nn.Conv2d)),
            classifier=self._classifier_names(),
        )

    def _classifier_names(self) -> tuple[str, ...]:
        """Every Linear whose shape depends on the class count: the merged head's final one first."""
        names = [f"classifier_merge.{len(self.classifier_merge) - 1}", "early_classifier3", "classifier_att"]
        cnn = self.classifier_cnn
        names.append(f"classifier_cnn.{len(cnn) - 1}" if isinstance(cnn, nn.Sequential) else "classifier_cnn")
        names += [f"{isc}.0" for isc in ("isc3", "isc4") if getattr(self, isc) is not None]
        return tuple(names)

    # ------------------------------------------------------------------------------------------- timm API

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor, Tensor, Tensor]:
        """Images [B, 3, H, W] -> the merged logits [B, num_classes] (eval mode, or ``exits_training`` off).

        In training mode (with ``exits_training``, the default) the four exits
        ``(y_early3, y_att, y_cnn, y_merge)`` of :meth:`forward_exits`, for a loss on every exit as released.
        A scripted model (TorchScript) always returns the merged logits; a model without a final classifier
        (``num_classes=0``, or pruned) returns the ``pre_logits`` vector in training too.
        """
        if self.training and self.exits_training and self.num_classes > 0 and not torch.jit.is_scripting():
            return self.forward_exits(x)
        return self.forward_head(self.forward_features(x))

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Images [B, 3, H, W] -> what the merged head reads: ``[final map, latent, y_att]``.

        ``final map`` [B, C_out, H/s, W/s] (s: the trunk's stride, 32 for the released ones) is the last CNN
        map after the last z2x cross-attention,
        ``latent`` [B, N/8, C4] the latent after stage 4's self-attention, ``y_att`` [B, K] exit 2's logits
        (the merged head reads them through ``isc4``). After :meth:`prune_intermediate_layers`:
        ``[map at the last kept stage, latent it read]``.
        """
        if not torch.jit.is_scripting():
            check_dyn_perceiver_images(x, self.min_input_size, self._needs_batch_stats(), self.config.trunk)
        return self._forward_taps(x, 3)[1]  # every stage (a literal: TorchScript reads no module globals)

    def forward_head(self, x: list[Tensor], pre_logits: bool = False) -> Tensor:
        """:meth:`forward_features`' list -> the merged logits [B, K], or (``pre_logits``) what their Linear reads.

        The merged head pools the final map, takes the mean latent and ``isc4(y_att)``, concatenates them,
        then runs ``classifier_merge``. Once the exits are pruned, the pooled map and mean latent only.
        """
        feats = self._merge_feature(x[0], x[1])
        if self.classifier_merge is None:  # pruned (prune_intermediate_layers / features_only)
            return feats
        if self.isc4 is not None:
            feats = torch.cat((feats, self.isc4(x[2])), dim=1)
        if not pre_logits:
            return self.classifier_merge(feats)  # as a module: its hooks see the logits
        last = len(self.classifier_merge) - 1
        for i, layer in enumerate(self.classifier_merge):
            if i < last:
                feats = layer(feats)
        return feats

    def forward_exits(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Every exit's logits on images ``x`` [B, 3, H, W], in the released order.

        Returns:
            ``(y_early3, y_att, y_cnn, y_merge)``, each [B, num_classes]; ``y_merge`` is ``model(x)`` in eval
            mode. The same computation as running :meth:`forward_stages` in order.
        """
        if not torch.jit.is_scripting():
            check_dyn_perceiver_images(x, self.min_input_size, self._needs_batch_stats(), self.config.trunk)
            self._check_not_pruned("forward_exits")
        x, z = self._trunk1(x, self._batch_latent(x))
        y_early3 = self._exit_early(z)
        x, z = self._trunk2(x, z)
        y_att = self._exit_att(z, y_early3)
        x = self._trunk3(x)
        y_cnn = self._exit_cnn(x)
        x = self._trunk4(x, z)
        return y_early3, y_att, y_cnn, self.forward_head([x, z, y_att])

    @torch.jit.ignore
    def set_exits_training(self, enable: bool = True) -> None:
        """Whether ``model(x)`` in training mode returns all four exits (default) or the merged logits only.

        With ``False``, ``classifier_cnn`` (and without isc links also the latent exits) gets no gradient from
        ``model(x)``: under DistributedDataParallel pass ``find_unused_parameters=True`` or freeze them.
        """
        self.exits_training = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The merged head's final Linear (``nn.Identity`` once removed by ``num_classes=0``)."""
        return self.classifier_merge[-1] if self.classifier_merge is not None else nn.Identity()

    @torch.jit.ignore
    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New classifiers for ``num_classes`` classes, created on the model's device and dtype.

        ``num_classes > 0`` rebuilds every exit's final Linear (``early_classifier3``, ``classifier_att``,
        ``classifier_cnn``'s, ``classifier_merge``'s) and the first Linear of the isc links, which read the
        earlier exits' logits. ``num_classes=0`` removes the merged head's final Linear only: ``forward`` then
        returns the ``pre_logits`` vector; the latent exits feed the merged head through the isc links, so they
        are part of how that vector is computed and keep their class count. ``global_pool``: ``None`` or
        ``"avg"`` (the released pooling, the only one).
        """
        _check_pool(global_pool)
        _check_num_classes(num_classes)
        if self.classifier_merge is None:
            if num_classes == 0:
                return
            raise EexitValueError(
                "This Dynamic Perceiver's exits were pruned (prune_intermediate_layers with prune_head=True, as "
                "features_only=True does), so it has no classifiers to reset. Build a new model instead: "
                "timm.create_model(name, num_classes=...)."
            )
        dd = {"device": self.latent.device, "dtype": self.latent.dtype}
        if num_classes > 0:
            k = num_classes
            self.early_classifier3 = self._fresh(nn.Linear(self.early_classifier3.in_features, k, **dd))
            self.classifier_att = self._fresh(nn.Linear(self.classifier_att.in_features, k, **dd))
            if isinstance(self.classifier_cnn, nn.Sequential):  # MobileNet's MLP head: its last Linear
                last = self.classifier_cnn[-1]
                self.classifier_cnn[-1] = self._fresh(nn.Linear(last.in_features, k, **dd))
            else:
                self.classifier_cnn = self._fresh(nn.Linear(self.classifier_cnn.in_features, k, **dd))
            for isc in (self.isc3, self.isc4):
                if isc is not None:
                    isc[0] = self._fresh(nn.Linear(k, isc[0].out_features, **dd))
            self.classifier_merge[-1] = self._fresh(nn.Linear(self.head_hidden_size, k, **dd))
            self.config = replace(self.config, num_classes=k)
        else:
            self.classifier_merge[-1] = self._fresh(nn.Identity())
        self.num_classes = num_classes

    def _fresh(self, module: nn.Module) -> nn.Module:
        """A new module in the model's mode (train / eval)."""
        return module.train(self.training)

    @torch.jit.ignore
    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[list[Tensor], list[Tensor]]:
        """The CNN maps after each stage (and the z2x cross-attention that follows it), timm's signature.

        Feature ``i`` is the map after CNN stage ``i + 1`` once it has read the latent (``feature_info[i]``:
        channels, stride). The last one is the final map the merged head pools.

        Args:
            x: Images [B, 3, H, W].
            indices: Features to return: the last n if an int, these (negative from the end) if a list, all if
                None.
            norm: Accepted for timm's API; the Dynamic Perceiver has no final norm.
            stop_early: Stop after the last feature asked for (the final output is then the state there).
            output_fmt: ``"NCHW"`` or ``"NHWC"``.
            intermediates_only: Return only the features (the model stops after the last one asked for).

        Returns:
            The features, or ``(final, features)`` with ``final`` equal to :meth:`forward_features`.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise EexitValueError(f"output_fmt must be 'NCHW' or 'NHWC'; got {output_fmt!r}.")
        take_indices, max_index = self._feature_indices(indices)
        last = max_index if stop_early or intermediates_only else len(self.feature_info) - 1
        batch_stats = self._needs_batch_stats() and last == len(self.feature_info) - 1  # the exits run
        check_dyn_perceiver_images(x, self.min_input_size, batch_stats, self.config.trunk)
        taps, final = self._forward_taps(x, last)
        features = [taps[i] for i in take_indices]
        if output_fmt == "NHWC":
            features = [f.permute(0, 2, 3, 1) for f in features]
        return features if intermediates_only else (final, features)

    @torch.jit.ignore
    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Remove what the features ``indices`` do not need; returns their indices (timm's ``features_only``).

        Everything after the last feature asked for goes: the later stages of both branches, and the exits,
        which read later states. At the last feature only the exits can go, with ``prune_head`` (then every
        exit, the isc links and the merged head: ``forward_features`` returns ``[final map, latent]`` and
        ``forward`` their pooled concatenation). ``prune_norm`` does nothing (there is no final norm).
        """
        take_indices, max_index = self._feature_indices(indices)
        for i in range(max_index + 1, len(self.feature_info)):
            self._remove_stage(i)
        if max_index < len(self.feature_info) - 1 or prune_head:
            for name in ("early_classifier3", "isc3", "classifier_att", "classifier_cnn", "isc4", "classifier_merge"):
                setattr(self, name, None)
            self.num_classes = 0
            self.num_features = self.head_hidden_size = (
                self.feature_info[max_index]["num_chs"] + self._latent_channels[max_index]
            )
        self.feature_info = self.feature_info[: max_index + 1]
        return take_indices

    def _feature_indices(self, indices: int | list[int] | tuple[int, ...] | None) -> tuple[list[int], int]:
        count = len(self.feature_info)
        return feature_indices(count, indices, f"this Dynamic Perceiver has {count} feature maps (one per CNN stage)")

    def _remove_stage(self, i: int) -> None:
        """Remove what runs only for feature ``i`` (1-3): its CNN stage, x2z, self-attention and z2x."""
        for name in (f"dwc{i + 1}_x2z", f"cross_att{i + 1}_x2z", f"self_att{i + 1}", f"cnn_body_stage{i + 1}"):
            setattr(self, name, None)
        if self.cnn_body is not None:
            setattr(self.cnn_body, f"block{i + 1}", None)
        setattr(self, f"cross_att{i + 2}_z2x" if i < 3 else "last_cross_att_z2x", None)
        if i < 3:
            self.token_mixer = self.token_mixer[:i]
            self.token_expander = self.token_expander[:i]

    # ----------------------------------------------------------------------------------------- staged API

    @property
    def exit_names(self) -> tuple[str, ...]:
        """Modules producing the exits' logits, in forward order."""
        return EXIT_NAMES

    @torch.jit.ignore
    def initial_state(self, images: Tensor) -> DynPerceiverState:
        """Check ``images`` [B, 3, H, W]; wrap them, with the batch's latent, as the state before stage 1."""
        check_dyn_perceiver_images(images, self.min_input_size, self._needs_batch_stats(), self.config.trunk)
        self._check_not_pruned("the staged forward")
        return DynPerceiverState(x=images, z=self._batch_latent(images))

    @torch.jit.ignore
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

    def _stage1(self, s: DynPerceiverState) -> DynPerceiverState:
        x, z = self._trunk1(s.x, s.z)
        return DynPerceiverState(x, z, (self._exit_early(z),))

    def _stage2(self, s: DynPerceiverState) -> DynPerceiverState:
        x, z = self._trunk2(s.x, s.z)
        return DynPerceiverState(x, z, (*s.logits, self._exit_att(z, s.logits[0])))

    def _stage3(self, s: DynPerceiverState) -> DynPerceiverState:
        x = self._trunk3(s.x)
        return DynPerceiverState(x, s.z, (*s.logits, self._exit_cnn(x)))

    def _stage4(self, s: DynPerceiverState) -> DynPerceiverState:
        x = self._trunk4(s.x, s.z)
        return DynPerceiverState(x, s.z, (*s.logits, self.forward_head([x, s.z, s.logits[1]])))

    # ------------------------------------------------------------------------------ tensor steps (scriptable)
    # Written out stage by stage with the released attribute names (TorchScript takes no getattr by a computed
    # name); a module that is None (not in this configuration, or pruned) is skipped when compiling too.
    # The paper's stages (_trunk1-4, also eexit's staged backbone) and the forward (_forward_taps) run these.

    def _trunk1(self, images: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """Paper stage 1 without its exit: stem, C-stages 1-3 -> (map after z2x3, latent after SA3)."""
        x, z = self._embed(images, z)
        x, z = self._cnn_step1(x, z)
        z = self._latent_step2(x, z)
        x, z = self._cnn_step2(x, z)
        return x, self._latent_step3(x, z)

    def _trunk2(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """Paper stage 2 without its exit: CNN stage 3, token mixer, z2x4, x2z4, SA4."""
        x, z = self._cnn_step3(x, z)
        return x, self._latent_step4(x, z)

    def _trunk3(self, x: Tensor) -> Tensor:
        """Paper stage 3 without its exit: CNN stage 4."""
        return self._cnn_stage4(x)

    def _trunk4(self, x: Tensor, z: Tensor) -> Tensor:
        """Paper stage 4 without its exit: the last z2x cross-attention -> the final map."""
        return self._last_z2x(x, z)

    def _forward_taps(self, images: Tensor, last: int) -> tuple[list[Tensor], list[Tensor]]:
        """Run up to feature ``last`` (0-3) -> (the features so far, forward_features' list at that point)."""
        taps: list[Tensor] = []
        x, z = self._embed(images, self._batch_latent(images))
        x, z = self._cnn_step1(x, z)
        taps.append(x)
        if self.self_att2 is None:  # pruned after feature 0
            return taps, [x, z]
        if last < 1:
            return taps, [x, z]
        z = self._latent_step2(x, z)
        x, z = self._cnn_step2(x, z)
        taps.append(x)
        if self.self_att3 is None:
            return taps, [x, z]
        if last < 2:
            return taps, [x, z]
        z3 = self._latent_step3(x, z)
        x, z = self._cnn_step3(x, z3)
        taps.append(x)
        if self.self_att4 is None:
            return taps, [x, z]
        if last < 3:
            return taps, [x, z]
        z = self._latent_step4(x, z)
        x = self._last_z2x(self._cnn_stage4(x), z)
        taps.append(x)
        if self.classifier_att is None:  # exits pruned
            return taps, [x, z]
        return taps, [x, z, self._exit_att(z, self._exit_early(z3))]

    def _batch_latent(self, images: Tensor) -> Tensor:
        # A copy, not expand(): under no_grad an expanded view of the latent claims requires_grad without a
        # grad_fn, which breaks torch's module tracker (and so FlopCounterMode). [N, C] is small.
        return self.latent.repeat(images.shape[0], 1, 1)

    def _embed(self, images: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """The stem; the latent reads its map (x2z1) and attends to itself (SA1)."""
        x = self.cnn_stem(images)
        kv = x
        if self.dwc1_x2z is not None:
            kv = x + self.dwc1_x2z(x)
        z = self.cross_att1_x2z(z, map_to_tokens(self.ca_pooling(kv)))
        return x, self.self_att1(z)

    def _cnn_step1(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """CNN stage 1; the latent is mixed / widened for stage 2 and the map reads it (z2x2): feature 0."""
        if self.cnn_body is not None:
            x = self.cnn_body.block1(x)
        else:
            x = self.cnn_body_stage1(x)
        z = self.token_expander[0](self.token_mixer[0](z))
        if self.cross_att2_z2x is not None:
            h, w = x.shape[-2:]
            x = tokens_to_map(self.cross_att2_z2x(map_to_tokens(x), z), h, w)
        return x, z

    def _cnn_step2(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """CNN stage 2, token mixer / expander, z2x3: feature 1."""
        if self.cnn_body is not None:
            x = self.cnn_body.block2(x)
        else:
            x = self.cnn_body_stage2(x)
        z = self.token_expander[1](self.token_mixer[1](z))
        if self.cross_att3_z2x is not None:
            h, w = x.shape[-2:]
            x = tokens_to_map(self.cross_att3_z2x(map_to_tokens(x), z), h, w)
        return x, z

    def _cnn_step3(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """CNN stage 3, token mixer / expander, z2x4: feature 2."""
        if self.cnn_body is not None:
            x = self.cnn_body.block3(x)
        else:
            x = self.cnn_body_stage3(x)
        z = self.token_expander[2](self.token_mixer[2](z))
        if self.cross_att4_z2x is not None:
            h, w = x.shape[-2:]
            x = tokens_to_map(self.cross_att4_z2x(map_to_tokens(x), z), h, w)
        return x, z

    def _cnn_stage4(self, x: Tensor) -> Tensor:
        """CNN stage 4 (no z2x after it but the last one)."""
        if self.cnn_body is not None:
            return self.cnn_body.block4(x)
        return self.cnn_body_stage4(x)

    def _last_z2x(self, x: Tensor, z: Tensor) -> Tensor:
        """Every pixel of the final map reads the latent once more: feature 3."""
        if self.last_cross_att_z2x is not None:
            h, w = x.shape[-2:]
            x = tokens_to_map(self.last_cross_att_z2x(map_to_tokens(x), z), h, w)
        return x

    def _latent_step2(self, x: Tensor, z: Tensor) -> Tensor:
        """The latent reads the (dwconv-enhanced) map pooled to 7x7 (x2z2, paper Fig. 3), then SA2."""
        if self.cross_att2_x2z is not None:
            kv = x
            if self.dwc2_x2z is not None:
                kv = x + self.dwc2_x2z(x)
            z = self.cross_att2_x2z(z, map_to_tokens(self.ca_pooling(kv)))
        return self.self_att2(z)

    def _latent_step3(self, x: Tensor, z: Tensor) -> Tensor:
        """x2z3, then SA3."""
        if self.cross_att3_x2z is not None:
            kv = x
            if self.dwc3_x2z is not None:
                kv = x + self.dwc3_x2z(x)
            z = self.cross_att3_x2z(z, map_to_tokens(self.ca_pooling(kv)))
        return self.self_att3(z)

    def _latent_step4(self, x: Tensor, z: Tensor) -> Tensor:
        """x2z4, then SA4."""
        if self.cross_att4_x2z is not None:
            kv = x
            if self.dwc4_x2z is not None:
                kv = x + self.dwc4_x2z(x)
            z = self.cross_att4_x2z(z, map_to_tokens(self.ca_pooling(kv)))
        return self.self_att4(z)

    def _exit_early(self, z: Tensor) -> Tensor:
        """Exit 1 on the latent after SA3."""
        return self.early_classifier3(z.mean(dim=1))

    def _exit_att(self, z: Tensor, y_early3: Tensor) -> Tensor:
        """Exit 2 on the latent after SA4 and (isc3) exit 1's logits."""
        feats = z.mean(dim=1)  # [B, C4]
        if self.isc3 is not None:
            feats = torch.cat((feats, self.isc3(y_early3)), dim=1)
        return self.classifier_att(feats)

    def _merge_feature(self, x: Tensor, z: Tensor) -> Tensor:
        """The merged head's own part of its input: [pooled final map, mean latent] [B, C_out + C4]."""
        return torch.cat((self.avgpool(x).flatten(1), z.mean(dim=1)), dim=1)

    def _cnn_feature(self, x: Tensor) -> Tensor:
        """What ``classifier_cnn`` reads: the pooled stage-4 map [B, C_out], with its dropout in training."""
        return F.dropout(self.avgpool(x).flatten(1), self.cnn_drop_rate, self.training)

    def _exit_cnn(self, x: Tensor) -> Tensor:
        """Exit 3 on the stage-4 map."""
        return self.classifier_cnn(self._cnn_feature(x))

    def _needs_batch_stats(self) -> bool:
        """Training mode with the exits' BatchNorm1d layers (isc links, merged head), which need 2+ samples."""
        return self.training and self.classifier_merge is not None

    def _check_not_pruned(self, what: str) -> None:
        if self.classifier_merge is None:
            raise EexitValueError(
                f"{what} needs every exit, but this Dynamic Perceiver was pruned (prune_intermediate_layers, as "
                "timm's features_only=True does). Use forward_intermediates / forward_features, or build an "
                "unpruned model."
            )


# torch.fx records one call (it wraps public names only); the checks run on real tensors, not on traced ones.
@register_notrace_function
def check_dyn_perceiver_images(images: Tensor, min_size: int, batch_stats: bool, trunk: str) -> None:
    """Refuse images the model cannot take, saying how to fix them (``batch_stats``: BatchNorm1d in training)."""
    if not isinstance(images, Tensor):
        raise EexitTypeError(f"DynPerceiver expects a torch.Tensor of images, got {type(images).__name__}.")
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise EexitValueError(
            f"DynPerceiver expects float images [B, 3, H, W], got {images.dtype} of shape "
            f"{tuple(images.shape)}. Add the batch dimension (x.unsqueeze(0)) or convert to RGB floats."
        )
    h, w = images.shape[-2:]
    if min(h, w) < min_size:
        raise EexitValueError(
            f"Image size {h}x{w} is too small for the {trunk!r} trunk: expected at least {min_size}x{min_size} "
            f"(its total stride), got {h}x{w}. Resize the images (the released models were trained at 224x224)."
        )
    if batch_stats and images.shape[0] < 2:
        raise EexitValueError(
            "DynPerceiver in training mode needs a batch of at least 2 samples (the BatchNorm1d layers of the "
            "isc links and merged head cannot normalise one), got 1. Use a larger batch or model.eval()."
        )


def _check_pool(global_pool: str | None) -> None:
    if global_pool not in (None, "avg"):
        raise EexitValueError(
            f"global_pool={global_pool!r} is not supported: the merged head averages the final CNN map and the "
            "latent (global_pool='avg'), as released. Leave global_pool at None or 'avg'."
        )


def _check_num_classes(num_classes: Any) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise EexitValueError(
            f"num_classes must be a non-negative integer (0 removes the merged head's final Linear); got "
            f"{num_classes!r}."
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


# ------------------------------------------------------------------------------------------ timm registration


def _cfg(**kwargs: Any) -> dict[str, Any]:
    """timm's pretrained cfg: the released training recipe's preprocessing; no weights to download."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "min_input_size": (3, 32, 32),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "cnn_stem.0",
        # Every Linear whose shape follows the class count (what reset_classifier rebuilds), merged head first.
        "classifier": (
            "classifier_merge.1",
            "early_classifier3",
            "classifier_att",
            "classifier_cnn",
            "isc3.0",
            "isc4.0",
        ),
        "origin_url": "https://github.com/LeapLabTHU/Dynamic_Perceiver",
        "paper_ids": "arXiv:2306.11248",
        "paper_name": "Dynamic Perceiver for Efficient Visual Recognition",
        **kwargs,
    }


_MOBILENET_CFG = {
    "first_conv": "cnn_stem.0.0",
    "classifier": ("classifier_merge.4", "early_classifier3", "classifier_att", "classifier_cnn.3", "isc3.0", "isc4.0"),
}

# Read by timm's register_model (below), so defined first. The registry is what timm.create_model builds with.
default_cfgs = generate_default_cfgs(
    {
        "reg800m_perceiver_t128": _cfg(),
        "resnet50_0375_perceiver_t128": _cfg(),
        "mobilenetV3_0x75_perceiver_t128": _cfg(**_MOBILENET_CFG),
        "mobilenetv3_0x75_perceiver_t128": _cfg(**_MOBILENET_CFG),
        "dyn_perceiver_tiny": _cfg(
            num_classes=5, input_size=(3, 32, 32), pool_size=(2, 2), min_input_size=(3, 16, 16), crop_pct=1.0
        ),
    }
)


def _create(variant: str, preset: str, pretrained: bool, **kwargs: Any) -> DynPerceiver:
    if pretrained:
        raise EexitValueError(
            f"{variant}: eexit does not download weights (pretrained=True). Build with pretrained=False and "
            "load the released checkpoint file with eexit.models.dynamic_perceiver."
            "load_official_dyn_perceiver_checkpoint(model, path)."
        )
    if kwargs.get("features_only") and kwargs.get("feature_cls", "getter") != "getter":
        raise EexitValueError(
            f"{variant}: features_only supports feature_cls='getter' only (the default): the two branches "
            f"cannot be walked module by module, got feature_cls={kwargs['feature_cls']!r}. Drop feature_cls."
        )
    return build_model_with_cfg(
        DynPerceiver,
        variant,
        pretrained,
        config=PRESETS[preset],
        feature_cfg={"feature_cls": "getter", "out_indices": tuple(range(_NUM_TAPS))},
        **kwargs,
    )


@register_model
def reg800m_perceiver_t128(pretrained: bool = False, **kwargs: Any) -> DynPerceiver:
    """Dyn-Perceiver on RegNetY-800MF, 128 latents, SA layers 3/3/9/6 (21.8M parameters)."""
    return _create("reg800m_perceiver_t128", "reg800m_perceiver_t128", pretrained, **kwargs)


@register_model
def resnet50_0375_perceiver_t128(pretrained: bool = False, **kwargs: Any) -> DynPerceiver:
    """Dyn-Perceiver on ResNet-50 x0.375, 128 latents, SA layers 3/3/9/3 (20.3M parameters)."""
    return _create("resnet50_0375_perceiver_t128", "resnet50_0375_perceiver_t128", pretrained, **kwargs)


@register_model
def mobilenetV3_0x75_perceiver_t128(pretrained: bool = False, **kwargs: Any) -> DynPerceiver:
    """Dyn-Perceiver on MobileNetV3-Large x0.75, 128 latents, SA layers 3/3/9/9 (9.3M parameters)."""
    return _create("mobilenetV3_0x75_perceiver_t128", "mobilenetV3_0x75_perceiver_t128", pretrained, **kwargs)


@register_model
def mobilenetv3_0x75_perceiver_t128(pretrained: bool = False, **kwargs: Any) -> DynPerceiver:
    """Lower-case alias of ``mobilenetV3_0x75_perceiver_t128``, for timm's usual naming."""
    return _create("mobilenetv3_0x75_perceiver_t128", "mobilenetV3_0x75_perceiver_t128", pretrained, **kwargs)


@register_model
def dyn_perceiver_tiny(pretrained: bool = False, **kwargs: Any) -> DynPerceiver:
    """A tiny Dyn-Perceiver for tests: 4-conv trunk (widths 8-64), 8 latents, 1 SA layer/stage, 5 classes."""
    return _create("dyn_perceiver_tiny", "dyn_perceiver_tiny", pretrained, **kwargs)


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
