"""Perceiver building blocks of the Dynamic Perceiver (Han et al., "Dynamic Perceiver for Efficient Visual
Recognition", ICCV 2023, https://arxiv.org/abs/2306.11248, Sec. 3.2 and Fig. 3-5).

The two branches of a Dynamic Perceiver talk through cross-attention: *x2z* (the latent queries 49 pooled CNN
pixels, Fig. 3) and *z2x* (every CNN pixel queries the latent, Fig. 5); the latent itself is refined by plain
pre-norm self-attention layers, and between stages a *token mixer* (Fig. 4) halves the number of latent tokens
while an *expander* widens their channels.

Attribute names follow the released code (``q_proj``, ``cross_attn``, ``self_attn``, ``mlp.layernorm`` ...)
so that its checkpoints load by name. Attention is written with explicit matrix products, not
``scaled_dot_product_attention``: the result is the same, and ``FlopCounterMode`` counts it on every device.
Every layer is plain tensor code, so it compiles with TorchScript and traces with torch.fx.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from eexit.errors import EexitValueError

__all__ = [
    "MLP",
    "CrossAttention",
    "CrossAttentionLayer",
    "MultiHeadAttention",
    "SelfAttention",
    "SelfAttentionBlock",
    "SelfAttentionLayer",
    "TokenExpander",
    "TokenMixer",
    "map_to_tokens",
    "tokens_to_map",
]


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections (no bias) and a biased output projection.

    With ``num_kv_tokens`` set, a learned relative position bias of shape ``[1, num_kv_tokens, qk_channels]``
    is added to the *projected keys* before the heads are split (the paper's x2z cross-attention, whose keys
    are a fixed 7x7 grid of pooled pixels).

    Args:
        num_heads: Attention heads; must divide ``qk_channels`` and ``v_channels``.
        q_in: Channels of the query input.
        kv_in: Channels of the key/value input.
        qk_channels: Channels queries and keys are projected to (default ``q_in``).
        v_channels: Channels values are projected to (default ``qk_channels``).
        out_channels: Channels of the output (default ``q_in``).
        dropout: Dropout on the attention weights (0 in every released config).
        num_kv_tokens: Length of the key sequence the position bias is tied to; ``None`` for no bias.
    """

    def __init__(
        self,
        num_heads: int,
        q_in: int,
        kv_in: int,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        out_channels: int | None = None,
        dropout: float = 0.0,
        num_kv_tokens: int | None = None,
    ) -> None:
        super().__init__()
        qk_channels = q_in if qk_channels is None else qk_channels
        v_channels = qk_channels if v_channels is None else v_channels
        out_channels = q_in if out_channels is None else out_channels
        for name, channels in (("qk_channels", qk_channels), ("v_channels", v_channels)):
            if channels < 1 or channels % num_heads:
                raise EexitValueError(
                    f"Attention {name}={channels} must be a positive multiple of num_heads={num_heads}. "
                    "Choose latent widths divisible by the heads of their stage (num_sa_heads), and CNN "
                    "widths of at least 8 (the z2x attention is C // 8 wide)."
                )
        self.num_heads = num_heads
        self.dp_scale = (qk_channels // num_heads) ** -0.5
        if num_kv_tokens is not None:
            # Zero init as released: the bias starts neutral and is learned per pooled-grid position.
            self.relative_position_bias = nn.Parameter(torch.zeros(1, num_kv_tokens, qk_channels))
        else:
            self.relative_position_bias = None
        self.q_proj = nn.Linear(q_in, qk_channels, bias=False)
        self.k_proj = nn.Linear(kv_in, qk_channels, bias=False)
        self.v_proj = nn.Linear(kv_in, v_channels, bias=False)
        self.o_proj = nn.Linear(v_channels, out_channels)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, t: Tensor) -> Tensor:
        b, n, c = t.shape
        return t.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # [B, h, N, c/h]

    def forward(self, x_q: Tensor, x_kv: Tensor) -> Tensor:
        """Attend from ``x_q`` [B, N, q_in] to ``x_kv`` [B, M, kv_in]; returns [B, N, out_channels]."""
        q = self.q_proj(x_q)
        k = self.k_proj(x_kv)
        v = self.v_proj(x_kv)
        if self.relative_position_bias is not None:
            k = k + self.relative_position_bias  # [B, M, qk] + [1, M, qk]
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        attn = torch.matmul(q, k.transpose(-2, -1)) * self.dp_scale  # [B, h, N, M]
        attn = self.dropout(attn.softmax(dim=-1))
        out = torch.matmul(attn, v)  # [B, h, N, c/h]
        b, h, n, c = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, n, h * c))


class MLP(nn.Module):
    """Pre-norm feed-forward block: LayerNorm -> Linear(C, w*C) -> GELU -> Linear(w*C, C)."""

    def __init__(self, num_channels: int, widening_factor: int) -> None:
        super().__init__()
        self.layernorm = nn.LayerNorm(num_channels)
        self.fc1 = nn.Linear(num_channels, widening_factor * num_channels)
        self.gelu = nn.GELU()
        self.fc2 = nn.Linear(widening_factor * num_channels, num_channels)

    def forward(self, x: Tensor) -> Tensor:
        """Map [B, N, C] to [B, N, C] (no residual here; the layer adds it)."""
        return self.fc2(self.gelu(self.fc1(self.layernorm(x))))


class CrossAttention(nn.Module):
    """LayerNorm on queries and (separately) on keys/values, then :class:`MultiHeadAttention`."""

    def __init__(self, num_heads: int, q_in: int, kv_in: int, **attention_kwargs: int | float | None) -> None:
        super().__init__()
        self.q_norm = nn.LayerNorm(q_in)
        self.kv_norm = nn.LayerNorm(kv_in)
        self.attention = MultiHeadAttention(num_heads, q_in, kv_in, **attention_kwargs)  # type: ignore[arg-type]

    def forward(self, x_q: Tensor, x_kv: Tensor) -> Tensor:
        """Attend from normalised ``x_q`` [B, N, q_in] to normalised ``x_kv`` [B, M, kv_in]."""
        return self.attention(self.q_norm(x_q), self.kv_norm(x_kv))


class CrossAttentionLayer(nn.Module):
    """Residual cross-attention then residual MLP (widening 1 in every released config).

    Args:
        num_heads: Attention heads (1 in every released cross-attention).
        q_in: Query (and output) channels.
        kv_in: Key/value channels.
        qk_channels: Attention width; ``q_in // 8`` for the z2x layers, ``q_in`` for x2z.
        widening_factor: MLP widening.
        dropout: Dropout on attention weights and on both residual branches.
        num_kv_tokens: Key length for the relative position bias (x2z layers: 49), ``None`` for none.
    """

    def __init__(
        self,
        num_heads: int,
        q_in: int,
        kv_in: int,
        qk_channels: int | None = None,
        widening_factor: int = 1,
        dropout: float = 0.0,
        num_kv_tokens: int | None = None,
    ) -> None:
        super().__init__()
        self.cross_attn = CrossAttention(
            num_heads, q_in, kv_in, qk_channels=qk_channels, v_channels=qk_channels,
            dropout=dropout, num_kv_tokens=num_kv_tokens,
        )  # fmt: skip
        self.mlp = MLP(q_in, widening_factor)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_q: Tensor, x_kv: Tensor) -> Tensor:
        """Update the queries ``x_q`` [B, N, q_in] with what they read from ``x_kv`` [B, M, kv_in]."""
        out = x_q + self.dropout(self.cross_attn(x_q, x_kv))
        return out + self.dropout(self.mlp(out))


class SelfAttention(nn.Module):
    """LayerNorm, then :class:`MultiHeadAttention` of the tokens to themselves."""

    def __init__(self, num_heads: int, num_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(num_channels)
        self.attention = MultiHeadAttention(num_heads, num_channels, num_channels, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Self-attention over [B, N, C]."""
        x = self.norm(x)
        return self.attention(x, x)


class SelfAttentionLayer(nn.Module):
    """Pre-norm transformer layer on the latent: residual self-attention, then residual MLP."""

    def __init__(self, num_heads: int, num_channels: int, widening_factor: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = SelfAttention(num_heads, num_channels, dropout=dropout)
        self.mlp = MLP(num_channels, widening_factor)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """One transformer layer on the latent [B, N, C]."""
        out = x + self.dropout(self.self_attn(x))
        return out + self.dropout(self.mlp(out))


class SelfAttentionBlock(nn.ModuleList):
    """A plain list of :class:`SelfAttentionLayer` run in order (keys ``self_attN.<i>.*`` as released)."""

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        num_channels: int,
        widening_factor: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(
            SelfAttentionLayer(num_heads, num_channels, widening_factor, dropout) for _ in range(num_layers)
        )

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """Run every layer on the latent [B, N, C]."""
        for layer in self:
            x = layer(x)
        return x


class TokenMixer(nn.Sequential):
    """LayerNorm over the *token* axis, then a Linear over that axis: [B, N_in, C] -> [B, N_out, C].

    The paper's token mixer (Fig. 4) halves the latent token count between stages. Normalising across tokens
    rather than channels is how the released model works, and its weights depend on it.
    """

    def __init__(self, tokens_in: int, tokens_out: int) -> None:
        super().__init__(nn.LayerNorm(tokens_in), nn.Linear(tokens_in, tokens_out))

    def forward(self, z: Tensor) -> Tensor:  # type: ignore[override]
        """Mix the tokens of the latent [B, N_in, C] into [B, N_out, C]."""
        # Indexed, not super().forward(): TorchScript compiles neither super() nor Sequential.forward here.
        return self[1](self[0](z.transpose(1, 2))).transpose(1, 2)


class TokenExpander(nn.Sequential):
    """LayerNorm over channels, then Linear(C_in -> C_out): widens the latent for the next stage."""

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__(nn.LayerNorm(channels_in), nn.Linear(channels_in, channels_out))


def map_to_tokens(x: Tensor) -> Tensor:
    """A CNN map [B, C, H, W] as a token sequence [B, H*W, C] (row-major over pixels)."""
    return x.flatten(2).transpose(1, 2)


def tokens_to_map(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`map_to_tokens`: [B, H*W, C] -> [B, C, H, W]."""
    b, _, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, height, width)
