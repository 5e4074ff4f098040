"""T2T-ViT (Yuan et al., ICCV 2021: "Tokens-to-Token ViT: Training Vision Transformers from Scratch on
ImageNet", arXiv:2101.11986).

No maintained package ships the performer T2T-ViT that JEI-DNN used (T2T-ViT-7 and -14), so eexit carries its
own, written from the paper and the released architecture, with the released parameter names so the official
``*.pth.tar`` checkpoints load unchanged:

- Tokens-to-token module: three soft splits (``nn.Unfold`` 7x7/s4/p2, then 3x3/s2/p1 twice) with a
  one-head token-performer (linear attention with m positive random features, Choromanski et al. 2021)
  between them, then a linear projection to the trunk width. An image of side S gives (S/16)^2 tokens.
- Trunk: CLS token, a fixed sinusoidal position table, pre-norm ViT blocks, a final LayerNorm and a linear
  head on the CLS token.

Importing this module registers ``t2t_vit_7``, ``_10``, ``_12``, ``_14``, ``_19``, ``_24`` and the test-size
``t2t_vit_tiny`` with timm, so ``timm.create_model("t2t_vit_14", num_classes=10, img_size=224)`` works.
No weights can be downloaded: load a released file with :func:`load_official_t2t_checkpoint`.

The model keeps timm's contract for vision transformers and passes timm's own model tests
(``tests/test_timm_suite.py``): ``forward_features`` / ``forward_head(pre_logits=True)``, ``reset_classifier``,
``forward_intermediates`` with the signature of timm's ``VisionTransformer``, ``prune_intermediate_layers``,
``features_only=True`` (the blocks' token maps [B, D, S/16, S/16]), TorchScript and torch.fx, and the
``device=`` / ``dtype=`` factory arguments. Where the release differs from that contract, the release's
state-dict keys win: the fixed position table and the performer's random matrices, non-trainable Parameters
in the released code, are persistent buffers under the same names, so official checkpoints load strictly and
``parameters()`` holds only what trains. The release's parameter counts are state-dict counts.
"""

# No `from __future__ import annotations` here: torch.fx copies the forward's annotations into the code it
# generates, and TorchScript (scripting that code) cannot read them back as strings.
import math
import os
import warnings
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import trunc_normal_
from timm.models import (
    build_model_with_cfg,
    checkpoint_seq,
    generate_default_cfgs,
    register_model,
    register_notrace_function,
)
from torch import nn

from eexit.errors import EexitValueError
from eexit.models._checkpoint import CheckpointError, load_checkpoint_file, load_into
from eexit.models._indices import feature_indices
from eexit.models._t2t_layers import TOTAL_STRIDE, Block, T2TModule, sinusoid_table

__all__ = ["T2TViT", "checkpoint_filter_fn", "load_official_t2t_checkpoint"]

_DYNN_PREFIXES = ("intermediate_heads.", "gates.")  # JEI-DNN's own exits; eexit's adapter replaces them


def _square_side(img_size: int | tuple[int, int] | list[int]) -> int:
    """The side of the square input, or a teaching error for sizes the soft splits cannot take."""
    if isinstance(img_size, (tuple, list)):
        if len(img_size) != 2 or img_size[0] != img_size[1]:
            raise EexitValueError(
                "T2T-ViT needs a square input (its tokens-to-token module rebuilds a square token grid "
                f"between soft splits); got img_size={tuple(img_size)}. Pass one side, e.g. "
                f"img_size={max(img_size)}."
            )
        img_size = img_size[0]
    side = int(img_size)
    if side <= 0 or side % TOTAL_STRIDE:
        lower = max(TOTAL_STRIDE, side // TOTAL_STRIDE * TOTAL_STRIDE)
        raise EexitValueError(
            f"T2T-ViT's img_size must be a positive multiple of {TOTAL_STRIDE} (the three soft splits have "
            f"strides 4, 2, 2 and the position table has (img_size/16)^2 + 1 rows); got {img_size}. Use "
            f"{lower} or {lower + TOTAL_STRIDE} and resize the inputs to match."
        )
    return side


class T2TViT(nn.Module):
    """T2T-ViT with the performer tokens-to-token module (Yuan et al., ICCV 2021), timm-style.

    Attribute and parameter names follow the released model (``tokens_to_token``, ``cls_token``,
    ``pos_embed``, ``blocks``, ``norm``, ``head``), so official state dicts load as they are.
    ``forward_features`` returns every token after the final norm ([B, 1 + (S/16)^2, D]);
    ``forward_head`` pools the CLS token (``global_pool="token"``) or the patch-token mean (``"avg"``).
    ``pos_embed`` (the fixed sinusoid table) is a persistent buffer, not a Parameter as released: same key,
    nothing to train.

    Args:
        device: Where to create the tensors (timm's factory argument; e.g. ``"meta"``).
        dtype: Their floating-point type.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        token_dim: int = 64,
        tokens_type: str = "performer",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if tokens_type != "performer":
            raise EexitValueError(
                f"Only the performer tokens-to-token module (T2T-ViT-7/10/12/14/19/24) is implemented; got "
                f"tokens_type={tokens_type!r}. Use tokens_type='performer'."
            )
        if embed_dim % num_heads:
            raise EexitValueError(
                f"embed_dim must be divisible by num_heads; got embed_dim={embed_dim}, num_heads={num_heads}."
            )
        _check_pool(global_pool)
        self.img_size = _square_side(img_size)
        # The whole model is built on ``device``; dtype is applied at the end (the sinusoid table and the
        # orthogonal draw are computed in float32/float64 first, as released).
        with torch.device(device) if device is not None else nullcontext():
            self._build(in_chans, num_classes, global_pool, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
                        qk_scale, drop_rate, attn_drop_rate, drop_path_rate, token_dim)  # fmt: skip
        if dtype is not None:
            self.to(dtype)

    def _build(
        self,
        in_chans: int,
        num_classes: int,
        global_pool: str,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: float | None,
        drop_rate: float,
        attn_drop_rate: float,
        drop_path_rate: float,
        token_dim: int,
    ) -> None:
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False

        self.tokens_to_token = T2TModule(self.img_size, in_chans, embed_dim, token_dim)
        num_patches = self.tokens_to_token.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed, not learned (as released). A persistent buffer keeps the released key "pos_embed".
        self.register_buffer("pos_embed", sinusoid_table(num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        # Stochastic depth rate grows linearly with depth, as released.
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.Sequential(
            *[
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, dpr[i])
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        # What forward_intermediates / features_only offer: every block's tokens as a [D, S/16, S/16] map.
        self.feature_info = [
            {"module": f"blocks.{i}", "num_chs": embed_dim, "reduction": TOTAL_STRIDE} for i in range(depth)
        ]

        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {
            "stem": r"^cls_token|pos_embed|tokens_to_token",
            "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        }

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh one for ``num_classes`` (0 gives an identity head).

        The new head is created on the model's device and dtype. ``global_pool`` None keeps the pooling.
        """
        if global_pool is not None:
            _check_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = self.cls_token
        self.head = (
            nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
            if num_classes > 0
            else nn.Identity()
        )
        self.head.train(self.training)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Prepend the CLS token and add the fixed position table: [B, T, D] -> [B, T + 1, D]."""
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.pos_drop(x + self.pos_embed)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, S, S] (checked) -> tokens with CLS and positions [B, 1 + (S/16)^2, D]."""
        if not torch.jit.is_scripting():
            check_images(x, self.in_chans, self.img_size)
        return self._pos_embed(self.tokens_to_token(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, S, S] -> normed tokens [B, 1 + (S/16)^2, D], CLS first."""
        x = self._embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The blocks' outputs, with the signature of timm's ``VisionTransformer.forward_intermediates``.

        Args:
            x: Images [B, C, S, S].
            indices: Blocks to return: the last n if an int, these (negative from the end) if a list, all if None.
            return_prefix_tokens: Return (patch tokens, CLS token) pairs instead of the patch tokens alone.
            norm: Pass every intermediate through the final LayerNorm.
            stop_early: Run only up to the last block asked for (then the final output is not computed
                from every block; with ``intermediates_only`` that is all one needs).
            output_fmt: ``"NCHW"`` (patch tokens as a [B, D, S/16, S/16] map) or ``"NLC"`` ([B, (S/16)^2, D]).
            intermediates_only: Return only the list of intermediates.

        Returns:
            The intermediates, or ``(final normed tokens, intermediates)``, the former equal to
            :meth:`forward_features`.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise EexitValueError(f"Output format must be one of NCHW or NLC; got output_fmt={output_fmt!r}.")
        take_indices, max_index = feature_indices(
            len(self.blocks), indices, f"this T2T-ViT has {len(self.blocks)} blocks"
        )
        intermediates: list[torch.Tensor] = []
        x = self._embed(x)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[: max_index + 1]
        for i, blk in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        prefix = [y[:, : self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens :] for y in intermediates]
        if output_fmt == "NCHW":
            side = self.tokens_to_token.grid_size
            intermediates = [y.transpose(1, 2).unflatten(2, (side, side)).contiguous() for y in intermediates]
        if not torch.jit.is_scripting() and return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix))  # type: ignore[arg-type]
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and the norm / head if asked); returns the indices.

        This is what ``features_only=True`` does (timm's ``FeatureGetterNet``): the model keeps only what its
        features need.
        """
        take_indices, max_index = feature_indices(
            len(self.blocks), indices, f"this T2T-ViT has {len(self.blocks)} blocks"
        )
        self.blocks = self.blocks[: max_index + 1]
        self.feature_info = self.feature_info[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Normed tokens -> pooled features [B, D] (``pre_logits``) or logits [B, num_classes]."""
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# torch.fx records one call; the checks run on real tensors, not on traced ones. (fx only wraps public names.)
@register_notrace_function
def check_images(x: torch.Tensor, in_chans: int, img_size: int) -> None:
    """Refuse images the fixed position table cannot take, saying how to fix them."""
    if x.ndim != 4 or tuple(x.shape[1:]) != (in_chans, img_size, img_size):
        raise EexitValueError(
            f"This T2T-ViT takes images of shape [B, {in_chans}, {img_size}, {img_size}] (its position table is "
            f"fixed at construction); got {tuple(x.shape)}. Resize the inputs to {img_size} px, or build the "
            f"model with img_size=<your side> (a multiple of {TOTAL_STRIDE})."
        )


def _check_pool(global_pool: str) -> None:
    if global_pool not in ("token", "avg", ""):
        raise EexitValueError(
            "global_pool must be 'token' (CLS, as released), 'avg' (mean of patch tokens) or '' (no "
            f"pooling); got {global_pool!r}."
        )


def _init_weights(m: nn.Module) -> None:
    """Truncated-normal (0.02) Linear weights and zero biases, unit LayerNorms, as released."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _resize_pos_embed(posemb: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Keep the CLS row and bicubically resize the square grid of the rest to ``num_tokens - 1`` rows.

    This is the official transfer routine (itself from the ViT JAX code). T2T-ViT's table is sinusoidal, so
    the result is not the sinusoidal table of the new size; we follow the official routine regardless, since
    the fine-tuned models that JEI-DNN started from were produced by it.
    """
    cls_row, grid = posemb[:, :1], posemb[0, 1:]  # [1, 1, D], [G*G, D]
    old, new = math.isqrt(grid.shape[0]), math.isqrt(num_tokens - 1)
    if old * old != grid.shape[0] or new * new != num_tokens - 1:
        raise CheckpointError(
            f"pos_embed has {posemb.shape[1]} rows in the checkpoint and {num_tokens} in the model; both "
            "must be 1 + a square number to be resized. The checkpoint is not a T2T-ViT one, or was cut."
        )
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()  # [1, D, G, G]
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(posemb.dtype)  # [1, G'*G', D]
    return torch.cat([cls_row, grid], dim=1)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: T2TViT) -> dict[str, torch.Tensor]:
    """Adapt an official or JEI-DNN T2T-ViT state dict to ``model`` (also timm's ``pretrained_filter_fn``).

    Strips ``module.``, drops JEI-DNN's ``intermediate_heads.*`` / ``gates.*``, drops the head when its shape
    differs from the model's (another class count), and resizes ``pos_embed`` when the image size differs.
    """
    out = {k.removeprefix("module."): v for k, v in state_dict.items()}
    dropped = [k for k in out if k.startswith(_DYNN_PREFIXES)]
    if dropped:
        warnings.warn(
            f"Ignoring {len(dropped)} JEI-DNN exit tensors (intermediate_heads.*, gates.*) in the "
            "checkpoint: eexit's adapter brings its own exits. Only the backbone is loaded.",
            stacklevel=3,
        )
        out = {k: v for k, v in out.items() if k not in dropped}
    own = model.state_dict()
    for key in ("head.weight", "head.bias"):
        if key in out and (key not in own or own[key].shape != out[key].shape):
            del out[key]  # another class count: the head is re-initialised, as the official loader does
    if "pos_embed" in out and out["pos_embed"].shape != model.pos_embed.shape:
        out["pos_embed"] = _resize_pos_embed(out["pos_embed"], model.pos_embed.shape[1])
    return out


def load_official_t2t_checkpoint(
    model: T2TViT, path: str | os.PathLike[str], *, prefer_ema: bool = True
) -> nn.modules.module._IncompatibleKeys:
    """Load a released T2T-ViT checkpoint (e.g. ``81.5_T2T_ViT_14.pth.tar``) or a JEI-DNN one into ``model``.

    Does what the official transfer loader does, safely: reads the file without unpickling arbitrary types,
    takes the EMA weights if asked and present, strips ``module.``, drops the head when the class count
    differs (keeping the model's fresh head), resizes ``pos_embed`` to the model's image size, and loads.
    Every other tensor must match, so a wrong variant fails loudly instead of loading half a model.

    Args:
        model: A :class:`T2TViT` built with the checkpoint's variant (any ``num_classes``, ``img_size``).
        path: ``.pth.tar`` / ``.pth`` / ``.pt`` / ``.safetensors`` file.
        prefer_ema: Use ``state_dict_ema`` when the file has it (the official evaluation does).

    Returns:
        The missing and unexpected keys (empty: every remaining tensor is loaded strictly).

    Raises:
        CheckpointError: The file cannot be read safely, or its tensors do not fit the model's variant.
    """
    state_dict = checkpoint_filter_fn(load_checkpoint_file(path, prefer_ema=prefer_ema), model)
    own = model.state_dict()
    for key in ("head.weight", "head.bias"):
        if key in own and key not in state_dict:
            state_dict[key] = own[key]  # keep the fresh head, so the rest still loads strictly
    return load_into(model, state_dict, strict=True)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "fixed_input_size": True,  # lets timm pass img_size through to the model
        "pool_size": None,  # as timm's ViTs: the pooled output is one token, not a spatial map
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        # The first layer that reads pixels: a Linear over unfolded 7x7 patches (a 7x7/4 conv in Linear form).
        "first_conv": "tokens_to_token.attention1.kqv",
        "classifier": "head",
        "license": "bsd-3-clause-clear",
        "origin_url": "https://github.com/yitu-opensource/T2T-ViT",
        "paper_ids": "arXiv:2101.11986",
        **kwargs,
    }


# No url / hf_hub_id: nothing can be downloaded. pretrained=True works only with a local file, e.g.
# timm.create_model("t2t_vit_14", pretrained=True, pretrained_cfg_overlay={"file": "81.5_T2T_ViT_14.pth.tar"})
# is read by load_official_t2t_checkpoint (EMA weights preferred).
default_cfgs = generate_default_cfgs(
    {
        **{f"t2t_vit_{n}": _cfg() for n in (7, 10, 12, 14, 19, 24)},
        "t2t_vit_tiny": _cfg(input_size=(3, 32, 32), crop_pct=1.0),
    }
)


def _create(variant: str, pretrained: bool, model_args: dict[str, Any], **kwargs: Any) -> T2TViT:
    # A local file given through timm goes through our safe loader: timm's own file loading would refuse
    # the argparse.Namespace inside the released .pth.tar files and would not resize pos_embed.
    file = (kwargs.get("pretrained_cfg_overlay") or {}).get("file") if pretrained else None
    # features_only=True: the last 3 blocks' token maps, through forward_intermediates (as timm's ViTs).
    out_indices = kwargs.pop("out_indices", 3)
    model = build_model_with_cfg(
        T2TViT,
        variant,
        pretrained and not file,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg={"out_indices": out_indices, "feature_cls": "getter"},
        **dict(model_args, **kwargs),  # user kwargs override the variant's, as in timm's own factories
    )
    if file:
        load_official_t2t_checkpoint(model, file)
    return model


def _args(embed_dim: int, depth: int, num_heads: int, mlp_ratio: float) -> dict[str, Any]:
    return {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, "mlp_ratio": mlp_ratio}


# Sizes as released (yitu-opensource/T2T-ViT, models/t2t_vit.py); all use the performer T2T module.
@register_model
def t2t_vit_7(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-7: D 256, depth 7, 4 heads, MLP ratio 2 (4.31 M parameters)."""
    return _create("t2t_vit_7", pretrained, _args(256, 7, 4, 2.0), **kwargs)


@register_model
def t2t_vit_10(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-10: D 256, depth 10, 4 heads, MLP ratio 2."""
    return _create("t2t_vit_10", pretrained, _args(256, 10, 4, 2.0), **kwargs)


@register_model
def t2t_vit_12(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-12: D 256, depth 12, 4 heads, MLP ratio 2."""
    return _create("t2t_vit_12", pretrained, _args(256, 12, 4, 2.0), **kwargs)


@register_model
def t2t_vit_14(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-14: D 384, depth 14, 6 heads, MLP ratio 3 (21.5 M parameters)."""
    return _create("t2t_vit_14", pretrained, _args(384, 14, 6, 3.0), **kwargs)


@register_model
def t2t_vit_19(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-19: D 448, depth 19, 7 heads, MLP ratio 3."""
    return _create("t2t_vit_19", pretrained, _args(448, 19, 7, 3.0), **kwargs)


@register_model
def t2t_vit_24(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-24: D 512, depth 24, 8 heads, MLP ratio 3."""
    return _create("t2t_vit_24", pretrained, _args(512, 24, 8, 3.0), **kwargs)


@register_model
def t2t_vit_tiny(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """Test-size T2T-ViT: D 32, depth 3, 2 heads, MLP ratio 2, token_dim 16, 32 px (4 patch tokens + CLS)."""
    return _create("t2t_vit_tiny", pretrained, {**_args(32, 3, 2, 2.0), "token_dim": 16}, **kwargs)
