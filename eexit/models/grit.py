"""GRIT, the graph transformer without message passing (Ma et al., "Graph Inductive Biases in Transformers
without Message Passing", ICML 2023, https://arxiv.org/abs/2305.17589), re-implemented from its description in
pure torch (torch_geometric only for ``Data`` / ``Batch``).

The JEI-DNN authors' third backbone (``reference/backbones.md`` §3): GRIT on MNIST superpixel graphs. What it
computes, per graph of n nodes:

* **RRWP** (relative random-walk probabilities): with P = D⁻¹A (A[i, j] = 1 for an edge i → j, D the out-degree,
  rows of isolated nodes left at zero), the stack [I, P, P², ..., P^(K-1)] of K matrices. Its diagonal ``[n, K]``
  is a node encoding, every entry ``[n, n, K]`` a pair encoding (:func:`add_rrwp`);
* **attention over every ordered pair** of nodes of a graph (the complete graph, self-pairs included): a pair
  starts from its encoded edge feature where the edge exists, zero elsewhere, plus the RRWP projection;
* **the GRIT layer**, for each pair j → i: ``s = (K x_j + Q x_i) ⊙ E_w(e_ij)``, signed square root, ``+ E_b(e_ij)``,
  ReLU: the new pair state; its attention logit ``Aw · s`` clamped to ±5, soft-maxed over the pairs with
  destination i; the node output is the attention-weighted sum of ``V x_j`` plus ``VeRow`` applied to the
  attention-weighted sum of the pair states; a degree scaler ``h θ₁ + h log(deg + 1) θ₂``; output projections,
  residuals and post-norm BatchNorms on nodes and pairs; an FFN with its own residual and BatchNorm;
* **the GraphGym graph head**: mean pooling of the node states, then (Linear, ReLU, L2-normalise rows) twice and a
  last Linear.

Module and parameter names are those of the original ``GritTransformer``, so a GraphGym checkpoint's
``model_state`` (keys prefixed ``model.``) and the JEI-DNN authors' files (``net``, keys prefixed
``grit_transformer.``) load strictly (:func:`load_graphgym_checkpoint`). The original needs torch_scatter,
torch_sparse, opt_einsum and GraphGym's global config; none of them is used here: the pairs of a whole batch are
built at once (no Python loop over graphs) and the attention's segment softmax is written with ``index_add``.

For early exit the forward is exposed as steps over a :class:`GraphState` (:meth:`GRIT.start`,
:meth:`GRIT.run_layer`, :meth:`GRIT.pool`, :meth:`GRIT.shrink`); :meth:`GRIT.forward` is those steps in a row, so
the early-exit path and the model's own forward cannot drift apart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eexit.errors import EexitTypeError, EexitValueError
from eexit.models._checkpoint import CheckpointError, load_checkpoint_file, load_into

__all__ = [
    "GRIT",
    "GRITConfig",
    "GraphState",
    "add_rrwp",
    "complete_pairs",
    "grit_mnist_large",
    "grit_tiny",
    "load_graphgym_checkpoint",
    "rrwp_dense",
]


@dataclass(frozen=True)
class GRITConfig:
    """The architecture of a :class:`GRIT` model.

    Attributes:
        hidden: node and pair width (the original's ``gt.dim_hidden``); must be divisible by ``heads``.
        heads: attention heads.
        layers: GRIT layers (each one is a possible exit).
        rrwp_steps: K, the number of random-walk matrices [I, P, ..., P^(K-1)].
        node_in: width of the input node features (MNIST superpixels: intensity + 2-d position = 3).
        edge_in: width of the input edge features (MNIST superpixels: 1).
        num_classes: classes of the graph head.
        head_layers: Linear layers of the graph head (GraphGym ``layers_post_mp``); 1 is a single Linear.
        dropout: dropout on node and pair states (training only).
        attn_dropout: dropout on the attention weights (training only).
        clamp: attention logits are clamped to ±clamp before the softmax.
        bn_momentum: momentum of the BatchNorms.
        deg_scaler: apply the degree scaler (``deg_coef``).
        edge_enhance: add ``VeRow`` of the attention-weighted pair states to the node output.
    """

    hidden: int = 52
    heads: int = 4
    layers: int = 5
    rrwp_steps: int = 18
    node_in: int = 3
    edge_in: int = 1
    num_classes: int = 10
    head_layers: int = 3
    dropout: float = 0.1
    attn_dropout: float = 0.5
    clamp: float = 5.0
    bn_momentum: float = 0.1
    deg_scaler: bool = True
    edge_enhance: bool = True

    def __post_init__(self) -> None:
        for name in ("hidden", "heads", "layers", "rrwp_steps", "node_in", "edge_in", "head_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise EexitValueError(f"GRITConfig.{name} must be a positive int, got {value!r}.")
        if self.rrwp_steps < 2:
            raise EexitValueError(f"GRITConfig.rrwp_steps must be >= 2 (I and P at least), got {self.rrwp_steps}.")
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise EexitValueError(f"GRITConfig.num_classes must be an int >= 2, got {self.num_classes!r}.")
        if self.hidden % self.heads:
            raise EexitValueError(
                f"GRITConfig.hidden={self.hidden} is not divisible by heads={self.heads}; pick a width that is."
            )
        if not 0.0 < self.clamp <= 30.0:
            # The softmax relies on the clamp to skip its max-subtraction; it computes exp() in float32, where
            # exp(30) is far from the limit.
            raise EexitValueError(f"GRITConfig.clamp must be in (0, 30], got {self.clamp!r}.")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise EexitValueError(f"GRITConfig.{name} must be in [0, 1), got {getattr(self, name)!r}.")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ---------------------------------------------------------------------------------------------------- RRWP
def rrwp_dense(adjacency: Tensor, steps: int) -> Tensor:
    """The RRWP stack of dense adjacency matrices ``[..., n, n]`` -> ``[..., n, n, steps]``.

    Entry ``[i, j, k]`` is the probability that a random walk from i is at j after k steps, with P = D⁻¹A (D the
    row sums, i.e. out-degrees; a row without edges stays zero, so an isolated node only keeps its k = 0 entry).
    """
    adjacency = adjacency.to(torch.float32)
    out_deg = adjacency.sum(-1, keepdim=True)
    walk = adjacency / out_deg.clamp(min=1.0)  # rows with no edge stay 0 (the original sets 1/0 to 0)
    eye = torch.eye(adjacency.shape[-1], dtype=walk.dtype, device=walk.device).expand_as(walk)
    powers = [eye, walk]
    for _ in range(steps - 2):
        powers.append(powers[-1] @ walk)
    return torch.stack(powers[:steps], dim=-1)


def _check_graph(data: Any, where: str) -> None:
    for name in ("x", "edge_index"):
        if getattr(data, name, None) is None:
            raise EexitValueError(f"{where}: the graph has no {name!r}; expected x [N, F] and edge_index [2, E].")
    ei = data.edge_index
    if ei.dim() != 2 or ei.shape[0] != 2 or ei.dtype != torch.long:
        raise EexitValueError(f"{where}: edge_index must be a [2, E] int64 tensor, got {tuple(ei.shape)} {ei.dtype}.")
    n = int(data.x.shape[0])
    if ei.numel() and (int(ei.min()) < 0 or int(ei.max()) >= n):
        raise EexitValueError(
            f"{where}: edge_index refers to nodes outside 0..{n - 1} (min {int(ei.min())}, max {int(ei.max())})."
        )


def add_rrwp(data: Any, steps: int) -> Any:
    """Add GRIT's random-walk encodings to one graph (a torch_geometric ``Data``), in place; returns it.

    Stores what the original transform stores, under the same names: ``rrwp`` ``[n, steps]`` (the diagonal),
    ``rrwp_index`` ``[2, M]`` and ``rrwp_val`` ``[M, steps]`` (the pairs where any power is non-zero, sorted by
    (source, destination); the name ends in ``index`` so torch_geometric shifts it when batching), ``deg``
    (out-degree, int64) and ``log_deg`` = ln(deg + 1). Parallel edges count once per copy, as in the original.
    """
    if not isinstance(steps, int) or steps < 2:
        raise EexitValueError(f"add_rrwp: steps must be an int >= 2, got {steps!r}.")
    _check_graph(data, "add_rrwp")
    n = int(data.x.shape[0])
    ei = data.edge_index
    adjacency = torch.zeros(n, n, dtype=torch.float32, device=ei.device)
    adjacency.index_put_((ei[0], ei[1]), torch.ones(ei.shape[1], device=ei.device), accumulate=True)
    pe = rrwp_dense(adjacency, steps)  # [n, n, K]
    nonzero = pe.abs().sum(-1) != 0  # [n, n]; row-major nonzero() keeps (source, destination) order
    index = nonzero.nonzero().t().contiguous()
    data.rrwp = pe.diagonal(dim1=0, dim2=1).t().contiguous()  # [n, K]
    data.rrwp_index = index
    data.rrwp_val = pe[index[0], index[1]]
    deg = adjacency.sum(1)
    data.deg = deg.long()
    data.log_deg = torch.log(deg + 1.0)
    return data


# ---------------------------------------------------------------------------------------------------- pairs
def complete_pairs(counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Every ordered pair of nodes of every graph of a batch, vectorised.

    Args:
        counts: nodes per graph ``[G]`` (the graphs' nodes are contiguous and in graph order, as in a ``Batch``).

    Returns:
        ``(source [P], destination [P], pair_ptr [G + 1])`` with P = Σ n_g²: graph g's n_g² pairs are the block
        ``pair_ptr[g]:pair_ptr[g + 1]``, sorted by (source, destination), with global node indices.
    """
    counts = counts.long()
    node_ptr = F.pad(counts.cumsum(0), (1, 0))
    sizes = counts * counts
    pair_ptr = F.pad(sizes.cumsum(0), (1, 0))
    total = int(pair_ptr[-1])
    graph = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), sizes, output_size=total)
    local = torch.arange(total, device=counts.device) - pair_ptr[graph]
    n = counts[graph]
    offset = node_ptr[graph]
    return offset + local // n, offset + local % n, pair_ptr


def _pair_position(src: Tensor, dst: Tensor, node_graph: Tensor, node_ptr: Tensor, pair_ptr: Tensor) -> Tensor:
    """Where the pair (src, dst) (global node indices of one graph) sits in :func:`complete_pairs`' layout."""
    g = node_graph[src]
    n = node_ptr[g + 1] - node_ptr[g]
    return pair_ptr[g] + (src - node_ptr[g]) * n + (dst - node_ptr[g])


# ---------------------------------------------------------------------------------------------------- state
@dataclass
class GraphState:
    """A batch of graphs between two GRIT layers: what the next layer (or an exit) reads.

    Attributes:
        h: node states ``[N, D]``.
        e: pair states ``[P, D]``, graph by graph, each graph's n² pairs sorted by (source, destination).
        src, dst: global node index of each pair's source and destination ``[P]``.
        node_graph: graph of each node ``[N]`` (0..G-1, in order).
        counts: nodes per graph ``[G]``.
        log_deg: ln(out-degree + 1) of each node ``[N]``.
    """

    h: Tensor
    e: Tensor
    src: Tensor
    dst: Tensor
    node_graph: Tensor
    counts: Tensor
    log_deg: Tensor

    @property
    def num_graphs(self) -> int:
        return int(self.counts.shape[0])


# ---------------------------------------------------------------------------------------------------- modules
class _Linear(nn.Module):
    """A Linear under the attribute name the original encoder uses (``encoder`` or ``fc``)."""

    def __init__(self, name: str, d_in: int, d_out: int, bias: bool = True) -> None:
        super().__init__()
        self.attr = name
        setattr(self, name, nn.Linear(d_in, d_out, bias=bias))

    def forward(self, x: Tensor) -> Tensor:
        return getattr(self, self.attr)(x)


class _FeatureEncoder(nn.Module):
    """The node and edge input encoders (GraphGym ``LinearNode`` / ``LinearEdge``)."""

    def __init__(self, config: GRITConfig) -> None:
        super().__init__()
        self.node_encoder = _Linear("encoder", config.node_in, config.hidden)
        self.edge_encoder = _Linear("encoder", config.edge_in, config.hidden)


class _RelEncoder(nn.Module):
    """RRWP pair encoder; ``padding`` is the original's (zero) start of every pair, kept for its state-dict key."""

    def __init__(self, steps: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(steps, hidden, bias=False)
        nn.init.xavier_uniform_(self.fc.weight)
        self.register_buffer("padding", torch.zeros(1, hidden))


class _Attention(nn.Module):
    """GRIT's multi-head attention over the pairs (the original's ``MultiHeadAttentionLayerGritSparse``)."""

    def __init__(self, config: GRITConfig) -> None:
        super().__init__()
        d, h = config.hidden, config.heads
        self.heads, self.head_dim = h, d // h
        self.clamp = config.clamp
        self.edge_enhance = config.edge_enhance
        self.Q = nn.Linear(d, d, bias=True)
        self.K = nn.Linear(d, d, bias=False)
        self.E = nn.Linear(d, 2 * d, bias=True)
        self.V = nn.Linear(d, d, bias=False)
        self.Aw = nn.Parameter(torch.empty(self.head_dim, h, 1))
        self.VeRow = nn.Parameter(torch.empty(self.head_dim, h, self.head_dim))
        self.attn_dropout = nn.Dropout(config.attn_dropout)
        for w in (self.Q.weight, self.K.weight, self.E.weight, self.V.weight):
            nn.init.xavier_normal_(w)
        nn.init.xavier_normal_(self.Aw)
        nn.init.xavier_normal_(self.VeRow)

    def forward(self, x: Tensor, e: Tensor, src: Tensor, dst: Tensor) -> tuple[Tensor, Tensor]:
        """Node outputs ``[N, D]`` and new pair states ``[P, D]``."""
        n, hd, dh = x.shape[0], self.heads, self.head_dim
        q = self.Q(x).view(n, hd, dh)
        k = self.K(x).view(n, hd, dh)
        v = self.V(x).view(n, hd, dh)
        # E is split per head into (weight, bias): head h reads columns [2·dh·h, 2·dh·h + dh) and the next dh.
        ew = self.E(e).view(-1, hd, 2 * dh)
        s = (k[src] + q[dst]) * ew[..., :dh]
        s = torch.sqrt(torch.relu(s)) - torch.sqrt(torch.relu(-s))  # signed square root
        s = torch.relu(s + ew[..., dh:])  # [P, H, dh]: the new pair states
        logit = torch.einsum("phd,dhc->phc", s, self.Aw)  # [P, H, 1]
        logit = logit.clamp(-self.clamp, self.clamp)
        attn = self.attn_dropout(_segment_softmax(logit, dst, n))
        # Sums in the messages' own dtype (under autocast the matmuls' outputs are half precision, the rest not).
        msg = v[src] * attn
        out = msg.new_zeros(v.shape).index_add_(0, dst, msg)
        if self.edge_enhance:
            msg = s * attn
            row = msg.new_zeros(v.shape).index_add_(0, dst, msg)
            out = out + torch.einsum("nhd,dhc->nhc", row, self.VeRow)
        return out.reshape(n, hd * dh), s.reshape(-1, hd * dh)


def _segment_softmax(logit: Tensor, index: Tensor, groups: int) -> Tensor:
    """Softmax of ``logit`` [P, ...] over the rows that share ``index`` (torch_geometric's ``softmax``).

    The logits are clamped to ±clamp before this, so exp() cannot overflow and the usual subtraction of each
    group's maximum (a scatter-max, a gather and a subtraction over all n² pairs) is left out: the softmax is the
    same up to rounding.
    """
    exp = logit.float().exp()  # float32 even under half precision, where exp(clamp) could overflow
    total = exp.new_zeros((groups, *logit.shape[1:])).index_add_(0, index, exp)
    return (exp / (total[index] + 1e-16)).to(logit.dtype)


class GRITLayer(nn.Module):
    """One GRIT layer (the original's ``GritTransformerLayer``): attention, degree scaler, BatchNorm, FFN."""

    def __init__(self, config: GRITConfig) -> None:
        super().__init__()
        d = config.hidden
        self.dropout = config.dropout
        self.deg_scaler = config.deg_scaler
        self.attention = _Attention(config)
        if config.deg_scaler:
            self.deg_coef = nn.Parameter(torch.empty(1, d, 2))
            nn.init.xavier_normal_(self.deg_coef)
        self.O_h = nn.Linear(d, d)
        self.O_e = nn.Linear(d, d)
        self.batch_norm1_h = nn.BatchNorm1d(d, momentum=config.bn_momentum)
        self.batch_norm1_e = nn.BatchNorm1d(d, momentum=config.bn_momentum)
        self.FFN_h_layer1 = nn.Linear(d, 2 * d)
        self.FFN_h_layer2 = nn.Linear(2 * d, d)
        self.batch_norm2_h = nn.BatchNorm1d(d, momentum=config.bn_momentum)

    def forward(self, h: Tensor, e: Tensor, src: Tensor, dst: Tensor, log_deg: Tensor) -> tuple[Tensor, Tensor]:
        h_attn, e_attn = self.attention(h, e, src, dst)
        x = F.dropout(h_attn, self.dropout, self.training)
        if self.deg_scaler:
            coef = self.deg_coef  # [1, D, 2]: h·θ₁ + h·log(deg + 1)·θ₂, per channel
            x = x * coef[..., 0] + x * log_deg.unsqueeze(-1) * coef[..., 1]
        x = self.batch_norm1_h(h + self.O_h(x))
        e_new = self.batch_norm1_e(e + self.O_e(F.dropout(e_attn, self.dropout, self.training)))
        y = self.FFN_h_layer2(F.dropout(torch.relu(self.FFN_h_layer1(x)), self.dropout, self.training))
        return self.batch_norm2_h(x + y), e_new


class _GraphGymLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.model = nn.Linear(d_in, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class _GraphGymLayer(nn.Module):
    """GraphGym ``GeneralLayer`` as the graph head builds it: Linear (``layer.model``), ReLU, then each row scaled to
    unit L2 norm (GraphGym's default ``has_l2norm``; the head ignores ``gnn.dropout``, so no dropout)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.layer = _GraphGymLinear(d_in, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(torch.relu(self.layer(x)), p=2.0, dim=1)


class _GraphGymStack(nn.Module):
    """GraphGym ``GeneralMultiLayer``: ``Layer_0``, ``Layer_1``, ... each Linear, ReLU, L2-normalise."""

    def __init__(self, count: int, width: int) -> None:
        super().__init__()
        self.count = count
        for i in range(count):
            self.add_module(f"Layer_{i}", _GraphGymLayer(width, width))

    def forward(self, x: Tensor) -> Tensor:
        for i in range(self.count):
            x = getattr(self, f"Layer_{i}")(x)
        return x


class GraphHeadMLP(nn.Module):
    """GraphGym's MLP (``model.0`` the hidden Linear-ReLU layers, ``model.1`` the last Linear); keys as GraphGym's."""

    def __init__(self, width: int, num_classes: int, layers: int) -> None:
        super().__init__()
        parts: list[nn.Module] = [_GraphGymStack(layers - 1, width)] if layers > 1 else []
        self.model = nn.Sequential(*parts, _GraphGymLinear(width, num_classes))

    def forward(self, pooled: Tensor) -> Tensor:
        return self.model(pooled)


class GraphHead(nn.Module):
    """GraphGym's graph head: mean pooling (done by the caller, see :meth:`GRIT.pool`) then the MLP."""

    def __init__(self, width: int, num_classes: int, layers: int) -> None:
        super().__init__()
        self.layer_post_mp = GraphHeadMLP(width, num_classes, layers)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.layer_post_mp(pooled)


# ---------------------------------------------------------------------------------------------------- model
class GRIT(nn.Module):
    """The GRIT graph transformer with a graph-classification head (state-dict keys as the original's).

    Call it on a torch_geometric ``Batch`` (or one ``Data``) with ``x`` ``[N, node_in]``, ``edge_index``
    ``[2, E]`` and ``edge_attr`` ``[E, edge_in]`` (optional: missing edge features start at zero); it returns the
    logits ``[G, num_classes]``. RRWP is read from the batch when :func:`add_rrwp` stored it (``rrwp``,
    ``rrwp_index``, ``rrwp_val``, ``log_deg``) and computed on the fly otherwise.
    """

    def __init__(self, config: GRITConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        config = config or GRITConfig()
        if overrides:
            config = GRITConfig(**{**config.to_dict(), **overrides})
        self.config = config
        self.num_classes = config.num_classes
        self.encoder = _FeatureEncoder(config)
        self.rrwp_abs_encoder = _Linear("fc", config.rrwp_steps, config.hidden, bias=False)
        nn.init.xavier_uniform_(self.rrwp_abs_encoder.fc.weight)
        self.rrwp_rel_encoder = _RelEncoder(config.rrwp_steps, config.hidden)
        self.layers = nn.Sequential(*(GRITLayer(config) for _ in range(config.layers)))
        self.post_mp = GraphHead(config.hidden, config.num_classes, config.head_layers)

    # ------------------------------------------------------------------ steps
    def start(self, batch: Any) -> GraphState:
        """Check a batch of graphs, encode nodes and pairs: the state layer 0 reads."""
        x, edge_index, edge_attr, node_graph, counts = self._read_batch(batch)
        cfg = self.config
        rrwp, rel_index, rel_val, log_deg = _rrwp_of(batch, node_graph, counts, cfg.rrwp_steps, x.device)
        dtype = self.encoder.node_encoder.encoder.weight.dtype
        h = self.encoder.node_encoder(x.to(dtype)) + self.rrwp_abs_encoder(rrwp.to(dtype))
        src, dst, pair_ptr = complete_pairs(counts)
        node_ptr = F.pad(counts.cumsum(0), (1, 0))
        # The RRWP of every pair (zero where no walk reaches) through the bias-free projection: the same sum as
        # projecting the stored non-zero pairs only, at a cost that depends on n alone (n² pairs), not on the graph.
        rel = rel_val.new_zeros(src.shape[0], cfg.rrwp_steps)
        if rel_index.shape[1]:
            rel[_pair_position(rel_index[0], rel_index[1], node_graph, node_ptr, pair_ptr)] = rel_val
        e = self.rrwp_rel_encoder.fc(rel.to(dtype))
        e = e + self.rrwp_rel_encoder.padding.to(e.dtype)  # the original's zero start of every pair
        if edge_attr is not None and edge_index.shape[1]:
            pos = _pair_position(edge_index[0], edge_index[1], node_graph, node_ptr, pair_ptr)
            e = e.index_add(0, pos, self.encoder.edge_encoder(edge_attr.to(dtype)).to(e.dtype))
        return GraphState(h, e, src, dst, node_graph, counts, log_deg.to(dtype))

    def run_layer(self, index: int, state: GraphState) -> GraphState:
        """Layer ``index`` on ``state``; returns the next state."""
        h, e = self.layers[index](state.h, state.e, state.src, state.dst, state.log_deg)
        return GraphState(h, e, state.src, state.dst, state.node_graph, state.counts, state.log_deg)

    def pool(self, state: GraphState) -> Tensor:
        """Mean of each graph's node states ``[G, D]`` (what the graph head, and eexit's exits, read)."""
        total = state.h.new_zeros(state.num_graphs, state.h.shape[1]).index_add_(0, state.node_graph, state.h)
        return total / state.counts.clamp(min=1).unsqueeze(1).to(total.dtype)

    def shrink(self, state: GraphState, keep: Tensor) -> GraphState:
        """Keep only the graphs at positions ``keep`` (sorted, 1-D): their nodes and pairs, indices compacted."""
        g = state.num_graphs
        new_id = torch.full((g,), -1, dtype=torch.long, device=keep.device)
        new_id[keep] = torch.arange(keep.numel(), device=keep.device)
        node_keep = new_id[state.node_graph] >= 0
        new_node = node_keep.long().cumsum(0) - 1  # old global node -> new global node
        pair_keep = node_keep[state.src]
        return GraphState(
            state.h[node_keep],
            state.e[pair_keep],
            new_node[state.src[pair_keep]],
            new_node[state.dst[pair_keep]],
            new_id[state.node_graph[node_keep]],
            state.counts[keep],
            state.log_deg[node_keep],
        )

    def forward_features(self, batch: Any) -> GraphState:
        """Encoders and every layer: the final state."""
        state = self.start(batch)
        for i in range(len(self.layers)):
            state = self.run_layer(i, state)
        return state

    def forward_head(self, state: GraphState) -> Tensor:
        return self.post_mp(self.pool(state))

    def forward(self, batch: Any) -> Tensor:
        """Logits ``[G, num_classes]`` of a batch of graphs."""
        return self.forward_head(self.forward_features(batch))

    # ------------------------------------------------------------------ input
    def _read_batch(self, batch: Any) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
        cfg = self.config
        if not hasattr(batch, "x") or not hasattr(batch, "edge_index"):
            raise EexitTypeError(
                f"GRIT expects a torch_geometric Data or Batch with x, edge_index and edge_attr, got "
                f"{type(batch).__name__}; build graphs with eexit.superpixels or torch_geometric."
            )
        _check_graph(batch, "GRIT")
        x = batch.x
        if x.dim() != 2 or x.shape[1] != cfg.node_in:
            raise EexitValueError(
                f"GRIT expects node features x of shape [N, {cfg.node_in}] (GNN-benchmark superpixels: intensity "
                f"and the 2-d position, x = cat(x, pos)), got {tuple(x.shape)}. Build the model with "
                f"node_in={x.shape[-1]} or concatenate the features the model was trained on."
            )
        if not x.is_floating_point():
            raise EexitTypeError(f"GRIT expects floating-point node features, got {x.dtype}; use x.float().")
        edge_attr = getattr(batch, "edge_attr", None)
        if edge_attr is not None:
            if edge_attr.dim() == 1:
                edge_attr = edge_attr.unsqueeze(1)
            if edge_attr.shape != (batch.edge_index.shape[1], cfg.edge_in):
                raise EexitValueError(
                    f"GRIT expects edge_attr of shape [E, {cfg.edge_in}] with E = {batch.edge_index.shape[1]} "
                    f"edges, got {tuple(edge_attr.shape)}."
                )
        node_graph = getattr(batch, "batch", None)
        if node_graph is None:
            node_graph = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            counts = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
        else:
            graphs = int(batch.num_graphs)
            counts = torch.bincount(node_graph, minlength=graphs)
            if node_graph.numel() and bool((node_graph[1:] < node_graph[:-1]).any()):
                raise EexitValueError("GRIT expects each graph's nodes to be contiguous, as torch_geometric batches.")
        if x.shape[0] == 0:
            raise EexitValueError("GRIT got a batch without nodes; every graph needs at least one node.")
        if counts.numel() and int(counts.min()) == 0:
            raise EexitValueError(
                f"GRIT got graphs without nodes (graphs {(counts == 0).nonzero().flatten().tolist()[:8]}); a graph "
                "needs at least one node (a blank image still makes a one-node superpixel graph)."
            )
        return x, batch.edge_index, edge_attr, node_graph, counts


def _rrwp_of(
    batch: Any, node_graph: Tensor, counts: Tensor, steps: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(diagonal [N, K], pair index [2, M], pair values [M, K], log_deg [N]) from the batch or computed."""
    n = int(node_graph.shape[0])
    stored = getattr(batch, "rrwp", None)
    if stored is not None:
        index, val = getattr(batch, "rrwp_index", None), getattr(batch, "rrwp_val", None)
        if index is None or val is None:
            raise EexitValueError("the batch has rrwp but not rrwp_index / rrwp_val; recompute with add_rrwp.")
        if stored.shape != (n, steps) or val.shape[-1] != steps or val.shape[0] != index.shape[-1]:
            raise EexitValueError(
                f"the graphs carry RRWP of shape {tuple(stored.shape)} but the model needs [{n}, {steps}] (one row "
                f"per node, {steps} steps): the encodings were built for other graphs or another rrwp_steps. "
                f"Recompute them with eexit.models.grit.add_rrwp(data, {steps})."
            )
        if index.numel() and (int(index.max()) >= n or bool((node_graph[index[0]] != node_graph[index[1]]).any())):
            raise EexitValueError(
                "rrwp_index pairs nodes outside their graph: the encodings were built for other graphs; recompute "
                f"them with add_rrwp(data, {steps})."
            )
        log_deg = getattr(batch, "log_deg", None)
        if log_deg is None:
            deg = torch.zeros(n, device=device).index_add_(
                0, batch.edge_index[0], torch.ones(batch.edge_index.shape[1], device=device)
            )
            log_deg = torch.log(deg + 1.0)
        return stored, index, val, log_deg
    return _batched_rrwp(batch.edge_index, node_graph, counts, steps)


def _batched_rrwp(edge_index: Tensor, node_graph: Tensor, counts: Tensor, steps: int) -> tuple[Tensor, ...]:
    """RRWP of a whole batch at once: graphs padded to the largest, powers as one batched matmul."""
    g, n_max = counts.numel(), int(counts.max())
    node_ptr = F.pad(counts.cumsum(0), (1, 0))
    local = torch.arange(node_graph.numel(), device=node_graph.device) - node_ptr[node_graph]
    adjacency = torch.zeros(g, n_max, n_max, device=node_graph.device)
    if edge_index.shape[1]:
        eg = node_graph[edge_index[0]]
        adjacency.index_put_(
            (eg, local[edge_index[0]], local[edge_index[1]]),
            torch.ones(edge_index.shape[1], device=node_graph.device),
            accumulate=True,
        )
    pe = rrwp_dense(adjacency, steps)  # [G, n_max, n_max, K]; padded rows and columns stay 0 beyond I
    diag = pe.diagonal(dim1=1, dim2=2).transpose(1, 2)[node_graph, local]  # [N, K]
    src, dst, _ = complete_pairs(counts)
    values = pe[node_graph[src], local[src], local[dst]]  # [P, K], zeros where unreachable
    log_deg = torch.log(adjacency.sum(-1)[node_graph, local] + 1.0)
    return diag, torch.stack((src, dst)), values, log_deg


# ---------------------------------------------------------------------------------------------------- presets
def grit_mnist_large(num_classes: int = 10, **overrides: Any) -> GRIT:
    """The LARGE MNIST-superpixel configuration the JEI-DNN authors used: hidden 52, 4 heads, 5 layers, 18 RRWP
    steps, 3-layer graph head (164,746 parameters with 10 classes)."""
    return GRIT(GRITConfig(num_classes=num_classes, **overrides))


def grit_tiny(num_classes: int = 10, **overrides: Any) -> GRIT:
    """A small GRIT for tests and CPU training (hidden 16, 2 heads, 3 layers, 4 RRWP steps)."""
    base = {"hidden": 16, "heads": 2, "layers": 3, "rrwp_steps": 4, "num_classes": num_classes}
    return GRIT(GRITConfig(**{**base, **overrides}))


# ---------------------------------------------------------------------------------------------------- checkpoints
_PREFIXES = ("model.", "grit_transformer.")


def load_graphgym_checkpoint(model: GRIT, path: str | os.PathLike[str], *, strict: bool = True) -> GRIT:
    """Load GRIT weights from a GraphGym ``.ckpt`` or the JEI-DNN authors' file into ``model``, strictly.

    GraphGym files hold ``model_state`` with keys prefixed ``model.`` (beside ``optimizer_state`` and
    ``scheduler_state``); the JEI-DNN authors' files hold ``net`` with keys prefixed ``grit_transformer.`` (their
    exits and gates, under other prefixes, are skipped). A ``.safetensors`` file with either prefix, or none, loads
    too. Pickles are read with ``torch.load(weights_only=True)``: a file holding any other type is refused.

    Returns:
        ``model``, with the weights loaded.

    Raises:
        CheckpointError: the file is missing, unsafe, holds no GRIT weights, or they do not fit ``model``.
    """
    if not isinstance(model, GRIT):
        raise EexitTypeError(f"load_graphgym_checkpoint loads into a GRIT model, got {type(model).__name__}.")
    raw = _read_raw(path)
    state = raw.get("model_state") if isinstance(raw.get("model_state"), dict) else None
    if state is None:
        state = load_checkpoint_file(path, prefer_ema=False)
    prefix = next((p for p in _PREFIXES if any(k.startswith(p) for k in state)), "")
    own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not own:
        raise CheckpointError(f"{os.fspath(path)!r} holds no GRIT weights (no key starts with {_PREFIXES}).")
    load_into(model, own, strict=strict)
    return model


def _read_raw(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The top-level dict of a GraphGym checkpoint (weights-only unpickling), or {} for other layouts."""
    name = os.fspath(path).lower()
    if name.endswith(".safetensors") or not os.path.isfile(path):
        return {}
    from eexit.models._checkpoint import _safe_torch_load

    raw = _safe_torch_load(path)
    return raw if isinstance(raw, dict) else {}
