"""Building blocks of T2T-ViT (Yuan et al., "Tokens-to-Token ViT", ICCV 2021); the model is in ``t2t_vit.py``.

The tokens-to-token module (soft splits and one-head token-performers) and the pre-norm ViT block of the
trunk, with the parameter names of the released model so its checkpoints load unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, use_fused_attn
from timm.models import register_notrace_function
from torch import nn

__all__ = ["Attention", "Block", "T2TModule", "TokenPerformer", "sinusoid_table"]

TOTAL_STRIDE = 16  # the three soft splits stride 4, 2, 2


def sinusoid_table(n_positions: int, dim: int) -> torch.Tensor:
    """The fixed sine/cosine position table of Vaswani et al. (2017) that T2T-ViT adds to its tokens.

    Returns:
        A [1, n_positions, dim] float32 table: sin on even channels, cos on odd ones.
    """
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]  # [P, 1]
    pair = torch.div(torch.arange(dim), 2, rounding_mode="floor").to(torch.float64)  # [D]
    angle = pos / torch.pow(10000.0, 2.0 * pair / dim)  # [P, D]; float64 as the released numpy table
    table = torch.where(torch.arange(dim) % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.to(torch.float32).unsqueeze(0)


class TokenPerformer(nn.Module):
    """One-head performer layer of the tokens-to-token module (T2T-ViT, Sec. 3.1 and its performer variant).

    Attention is linearised with positive random features phi(x) = exp(w x - |x|^2 / 2) / sqrt(m). The
    residual of the attention half is ``v``, not the input, because the layer changes the token width
    (in_dim -> dim). The random matrix ``w`` is drawn orthogonal once and scaled by sqrt(m). The released code
    keeps it as a non-trainable Parameter; here it is a persistent buffer under the same name, so checkpoints
    still carry it (and load strictly) while ``parameters()`` holds only what trains, as timm and optimizers
    expect. Both dropouts are fixed at 0.1 as released.
    """

    def __init__(self, in_dim: int, dim: int, kernel_ratio: float = 0.5, drop: float = 0.1, eps: float = 1e-8):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.num_features_rf = int(dim * kernel_ratio)
        self.kqv = nn.Linear(in_dim, 3 * dim)  # k, q, v in this order, as released
        self.dp = nn.Dropout(drop)
        self.proj = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(in_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.Dropout(drop))
        w = nn.init.orthogonal_(torch.randn(self.num_features_rf, dim)) * math.sqrt(self.num_features_rf)
        self.register_buffer("w", w)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        k, q, v = self.kqv(x).split(self.dim, dim=-1)  # 3 x [B, T, dim]
        y = performer_kernel(k, q, v, self.w, self.eps)
        return v + self.dp(self.proj(y.to(v.dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _random_features(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Positive random features phi(x) = exp(w x - |x|^2 / 2) / sqrt(m): [B, T, dim] -> [B, T, m], float32."""
    x = x.float()
    sq_half = (x * x).sum(dim=-1, keepdim=True) / 2  # [B, T, 1]
    wtx = torch.einsum("btd,md->btm", x, w.float())  # [B, T, m]
    return torch.exp(wtx - sq_half) / math.sqrt(w.shape[0])


def _linear_attention(k: torch.Tensor, q: torch.Tensor, v: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """phi(q) (phi(k)^T v) / (phi(q) sum_t phi(k_t)): the performer's attention, in float32."""
    kp, qp = _random_features(k, w), _random_features(q, w)  # [B, T, m]
    denom = torch.einsum("btm,bm->bt", qp, kp.sum(dim=1)).unsqueeze(-1)  # [B, T, 1]
    kptv = torch.einsum("btd,btm->bdm", v.float(), kp)  # [B, dim, m]
    return torch.einsum("btm,bdm->btd", qp, kptv) / (denom + eps)  # [B, T, dim]


@register_notrace_function  # torch.fx records one call: the autocast switch below cannot be traced
def performer_kernel(k: torch.Tensor, q: torch.Tensor, v: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The token-performer's attention [B, T, dim] in float32, with autocast off where it exists.

    exp() of the random features overflows in half precision, so the kernel stays in float32 even under
    autocast. TorchScript cannot compile the autocast switch (scripted models run without autocast anyway).
    """
    if torch.jit.is_scripting():
        return _linear_attention(k, q, v, w, eps)
    device_type = k.device.type
    if device_type not in ("cpu", "cuda", "xpu", "mps"):  # e.g. "meta": no autocast to switch off
        return _linear_attention(k, q, v, w, eps)
    with torch.autocast(device_type, enabled=False):
        return _linear_attention(k, q, v, w, eps)


class T2TModule(nn.Module):
    """Tokens-to-token front end: soft split, re-structurise with a performer, repeat; then project to D."""

    def __init__(self, img_size: int, in_chans: int, embed_dim: int, token_dim: int):
        super().__init__()
        self.soft_split0 = nn.Unfold(kernel_size=7, stride=4, padding=2)
        self.soft_split1 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        self.soft_split2 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        self.attention1 = TokenPerformer(in_chans * 7 * 7, token_dim)
        self.attention2 = TokenPerformer(token_dim * 3 * 3, token_dim)
        self.project = nn.Linear(token_dim * 3 * 3, embed_dim)
        self.grid_size = img_size // TOTAL_STRIDE
        self.num_patches = self.grid_size**2
        # Token grids after the first and second soft split (square inputs, sides multiples of 16). Stored as
        # ints so the forward needs no arithmetic on shapes, which torch.fx could not trace.
        self.grid1, self.grid2 = img_size // 4, img_size // 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.soft_split0(x).transpose(1, 2)  # [B, (S/4)^2, 49 C]
        x = self.attention1(x)  # [B, (S/4)^2, t]
        x = x.transpose(1, 2).unflatten(2, (self.grid1, self.grid1))  # [B, t, S/4, S/4]
        x = self.soft_split1(x).transpose(1, 2)  # [B, (S/8)^2, 9 t]
        x = self.attention2(x)  # [B, (S/8)^2, t]
        x = x.transpose(1, 2).unflatten(2, (self.grid2, self.grid2))  # [B, t, S/8, S/8]
        x = self.soft_split2(x).transpose(1, 2)  # [B, (S/16)^2, 9 t]
        return self.project(x)  # [B, (S/16)^2, D]


class Attention(nn.Module):
    """Multi-head self-attention of the trunk: qkv without bias by default, scale head_dim^-0.5."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        # The released factories set qk_scale = D^-0.5 only on their (unusable) pretrained=True path; the
        # official evaluation and JEI-DNN ran with head_dim^-0.5, so that is the default here.
        self.scale = qk_scale or self.head_dim**-0.5
        # Same switch as timm's Attention. Set it False to measure FLOPs: FlopCounterMode does not count
        # the CPU fused kernel of F.scaled_dot_product_attention (T2T-ViT-7 at 224 px reads 1.008 GMACs fused,
        # 1.147 explicit, the released figure).
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # 3 x [B, H, N, hd]
        if self.fused_attn:
            drop = self.attn_drop.p if self.training else 0.0
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
        else:
            attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))  # [B, H, N, N]
            x = attn @ v
        x = x.transpose(1, 2).reshape(b, n, c)  # [B, N, D]
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)), with stochastic depth."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))
