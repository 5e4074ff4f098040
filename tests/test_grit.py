"""GRIT (eexit.models.grit): sizes and key names of the original, RRWP, graph symmetries, batching, checkpoints and
bad input. Early exit on GRIT is in test_grit_exits.py."""

from __future__ import annotations

import argparse
import fractions

import pytest
import torch

pytest.importorskip("torch_geometric", reason="GRIT needs the eexit[graph] extra (torch_geometric)")
from torch_geometric.data import Batch, Data

from eexit.errors import EexitTypeError, EexitValueError
from eexit.models._checkpoint import CheckpointError
from eexit.models.grit import (
    GRIT,
    GRITConfig,
    add_rrwp,
    complete_pairs,
    grit_mnist_large,
    grit_tiny,
    load_graphgym_checkpoint,
    rrwp_dense,
)


def random_graph(n: int, seed: int, edges_per_node: int = 3, rrwp: int | None = 4, label: int = 0) -> Data:
    g = torch.Generator().manual_seed(seed)
    ei = torch.randint(0, n, (2, edges_per_node * n), generator=g)
    ei = ei[:, ei[0] != ei[1]]
    data = Data(
        x=torch.rand(n, 3, generator=g),
        edge_index=ei,
        edge_attr=torch.rand(ei.shape[1], 1, generator=g),
        y=torch.tensor([label]),
    )
    return add_rrwp(data, rrwp) if rrwp else data


def trained_like(model: GRIT) -> GRIT:
    """Non-trivial BatchNorm statistics (fresh ones are identities), then eval mode."""
    model.train()
    with torch.no_grad():
        for i in range(3):
            model(Batch.from_data_list([random_graph(n, 100 + 7 * i + n) for n in (4, 9, 13)]))
    return model.eval()


def test_large_configuration_matches_the_original_sizes_and_keys():
    model = grit_mnist_large()
    assert sum(p.numel() for p in model.parameters()) == 164_746
    assert sum(p.numel() for p in model.layers[0].parameters()) == 31_304
    keys = list(model.state_dict())
    assert len(keys) == 173  # as in the JEI-DNN authors' checkpoint (grit_transformer.* keys)
    assert keys[:7] == [
        "encoder.node_encoder.encoder.weight",
        "encoder.node_encoder.encoder.bias",
        "encoder.edge_encoder.encoder.weight",
        "encoder.edge_encoder.encoder.bias",
        "rrwp_abs_encoder.fc.weight",
        "rrwp_rel_encoder.padding",
        "rrwp_rel_encoder.fc.weight",
    ]
    assert keys[7:10] == ["layers.0.deg_coef", "layers.0.attention.Aw", "layers.0.attention.VeRow"]
    assert keys[-2:] == ["post_mp.layer_post_mp.model.1.model.weight", "post_mp.layer_post_mp.model.1.model.bias"]
    assert "post_mp.layer_post_mp.model.0.Layer_1.layer.model.weight" in keys
    sd = model.state_dict()
    assert sd["layers.2.attention.E.weight"].shape == (104, 52)
    assert sd["layers.2.attention.VeRow"].shape == (13, 4, 13)
    assert "layers.0.attention.K.bias" not in sd and "layers.0.attention.Q.bias" in sd


def test_config_refuses_bad_values():
    with pytest.raises(EexitValueError, match="divisible"):
        GRITConfig(hidden=10, heads=4)
    with pytest.raises(EexitValueError, match="rrwp_steps"):
        GRITConfig(rrwp_steps=1)
    with pytest.raises(EexitValueError, match="clamp"):
        GRITConfig(clamp=0.0)


def naive_rrwp(data: Data, steps: int) -> torch.Tensor:
    n = data.num_nodes
    a = torch.zeros(n, n, dtype=torch.float64)
    for i, j in data.edge_index.t().tolist():
        a[i, j] += 1.0
    p = torch.zeros_like(a)
    for i in range(n):
        if a[i].sum() > 0:
            p[i] = a[i] / a[i].sum()
    return torch.stack([torch.linalg.matrix_power(p, k) for k in range(steps)], dim=-1)


@pytest.mark.parametrize("n", [1, 2, 7, 12])
def test_rrwp_equals_a_naive_dense_computation(n):
    data = random_graph(n, seed=n, rrwp=None)
    data.edge_index = torch.cat([data.edge_index, torch.tensor([[0], [n - 1]])], 1)  # a parallel edge, maybe
    data.edge_attr = torch.rand(data.edge_index.shape[1], 1)
    expected = naive_rrwp(data, 6).float()
    add_rrwp(data, 6)
    assert torch.allclose(data.rrwp, expected.diagonal(dim1=0, dim2=1).t(), atol=1e-6)
    dense = torch.zeros(n, n, 6)
    dense[data.rrwp_index[0], data.rrwp_index[1]] = data.rrwp_val
    assert torch.allclose(dense, expected, atol=1e-6)
    # the stored pairs are exactly the non-zero ones, in (source, destination) order
    nonzero = expected.abs().sum(-1) != 0
    assert data.rrwp_index.shape[1] == int(nonzero.sum())
    flat = data.rrwp_index[0] * n + data.rrwp_index[1]
    assert torch.equal(flat, flat.sort().values)
    out_deg = torch.bincount(data.edge_index[0], minlength=n).float()
    assert torch.allclose(data.log_deg, torch.log(out_deg + 1))


def test_rrwp_of_an_isolated_node_keeps_only_the_identity():
    data = Data(x=torch.rand(3, 3), edge_index=torch.tensor([[0], [1]]), edge_attr=torch.rand(1, 1))
    add_rrwp(data, 4)
    assert data.rrwp[2].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert data.rrwp[1].tolist() == [1.0, 0.0, 0.0, 0.0]  # a sink: no walk leaves it


def test_rrwp_dense_matches_naive_on_a_batch_of_padded_matrices():
    a = (torch.rand(3, 5, 5) > 0.6).float()
    pe = rrwp_dense(a, 5)
    for g in range(3):
        deg = a[g].sum(1, keepdim=True)
        p = torch.where(deg > 0, a[g] / deg.clamp(min=1), torch.zeros_like(a[g]))
        assert torch.allclose(pe[g, ..., 3], torch.linalg.matrix_power(p, 3), atol=1e-6)


def test_complete_pairs_lists_every_ordered_pair_per_graph():
    src, dst, ptr = complete_pairs(torch.tensor([2, 1, 3]))
    assert ptr.tolist() == [0, 4, 5, 14]
    pairs = list(zip(src.tolist(), dst.tolist()))
    assert pairs[:5] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 2)]
    assert pairs[5:] == [(i, j) for i in range(3, 6) for j in range(3, 6)]


def permute(data: Data, perm: torch.Tensor) -> Data:
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel())
    return Data(x=data.x[perm], edge_index=inverse[data.edge_index], edge_attr=data.edge_attr, y=data.y)


def test_graph_logits_are_permutation_invariant_and_node_states_equivariant():
    model = trained_like(grit_tiny())
    data = random_graph(9, seed=3, rrwp=None)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(data)
        state = model.forward_features(data)
        permuted = permute(data, perm)
        logits_p = model(permuted)
        state_p = model.forward_features(permuted)
    assert torch.allclose(logits, logits_p, atol=1e-5)
    assert torch.allclose(state.h[perm], state_p.h, atol=1e-5)
    assert not torch.allclose(state.h, state.h[perm], atol=1e-3)  # the check could fail


def test_a_batch_equals_the_graphs_one_at_a_time_and_stored_rrwp_equals_computed():
    model = trained_like(grit_tiny())
    graphs = [random_graph(n, seed=n) for n in (5, 1, 11, 3, 8)]
    with torch.no_grad():
        batched = model(Batch.from_data_list(graphs))
        alone = torch.cat([model(Batch.from_data_list([g])) for g in graphs])
        bare = [Data(x=g.x, edge_index=g.edge_index, edge_attr=g.edge_attr) for g in graphs]
        computed = model(Batch.from_data_list(bare))
    assert batched.shape == (5, 10)
    assert torch.allclose(batched, alone, atol=1e-5)
    assert torch.allclose(batched, computed, atol=1e-5)


def test_shrink_equals_running_only_the_kept_graphs():
    model = trained_like(grit_tiny())
    graphs = [random_graph(n, seed=n) for n in (4, 7, 2, 9)]
    keep = torch.tensor([1, 3])
    with torch.no_grad():
        state = model.run_layer(0, model.start(Batch.from_data_list(graphs)))
        shrunk = model.run_layer(1, model.shrink(state, keep))
        kept = model.run_layer(1, model.run_layer(0, model.start(Batch.from_data_list([graphs[1], graphs[3]]))))
    assert torch.allclose(shrunk.h, kept.h, atol=1e-5)
    assert torch.allclose(shrunk.e, kept.e, atol=1e-5)
    assert torch.equal(shrunk.src, kept.src) and torch.equal(shrunk.node_graph, kept.node_graph)


def test_edge_cases_one_node_no_edges_isolated_nodes_and_1d_edge_attr():
    model = trained_like(grit_tiny())
    single = Data(x=torch.rand(1, 3), edge_index=torch.zeros(2, 0, dtype=torch.long), edge_attr=torch.zeros(0, 1))
    no_edges = Data(x=torch.rand(4, 3), edge_index=torch.zeros(2, 0, dtype=torch.long), edge_attr=torch.zeros(0, 1))
    isolated = Data(x=torch.rand(5, 3), edge_index=torch.tensor([[0, 1], [1, 0]]), edge_attr=torch.rand(2, 1))
    with torch.no_grad():
        out = model(Batch.from_data_list([single, no_edges, isolated]))
        without_attr = model(Data(x=torch.rand(3, 3), edge_index=torch.tensor([[0], [1]])))
        flat = model(Data(x=isolated.x, edge_index=isolated.edge_index, edge_attr=isolated.edge_attr.view(-1)))
    assert out.shape == (3, 10) and bool(torch.isfinite(out).all())
    assert without_attr.shape == (1, 10)
    assert torch.allclose(flat, out[2:], atol=1e-6)  # edge_attr [E] reads as [E, 1], as in the original


def test_bad_input_is_refused_with_the_fix():
    model = grit_tiny().eval()
    with pytest.raises(EexitValueError, match=r"\[N, 3\]"):
        model(Data(x=torch.rand(4, 2), edge_index=torch.tensor([[0], [1]]), edge_attr=torch.rand(1, 1)))
    with pytest.raises(EexitValueError, match="edge_attr"):
        model(Data(x=torch.rand(4, 3), edge_index=torch.tensor([[0], [1]]), edge_attr=torch.rand(1, 2)))
    with pytest.raises(EexitValueError, match="outside"):
        model(Data(x=torch.rand(4, 3), edge_index=torch.tensor([[0], [7]]), edge_attr=torch.rand(1, 1)))
    with pytest.raises(EexitTypeError, match="torch_geometric"):
        model(torch.rand(2, 3))
    # a graph larger than the RRWP was built for (nodes added after add_rrwp)
    grown = random_graph(5, seed=1)
    grown.x = torch.rand(7, 3)
    with pytest.raises(EexitValueError, match="add_rrwp"):
        model(grown)
    with pytest.raises(EexitValueError, match="add_rrwp"):
        model(random_graph(5, seed=1, rrwp=6))  # another number of steps


def test_graphgym_checkpoint_round_trip(tmp_path):
    model = trained_like(grit_tiny())
    path = tmp_path / "30.ckpt"
    torch.save(
        {
            "model_state": {f"model.{k}": v for k, v in model.state_dict().items()},
            "optimizer_state": torch.optim.AdamW(model.parameters()).state_dict(),
            "scheduler_state": {"last_epoch": 30, "base_lrs": [0.001]},
        },
        path,
    )
    fresh = grit_tiny()
    batch = Batch.from_data_list([random_graph(6, seed=2), random_graph(3, seed=4)])
    with torch.no_grad():
        assert not torch.allclose(fresh.eval()(batch), model(batch))
        load_graphgym_checkpoint(fresh, path)
        assert torch.equal(fresh.eval()(batch), model(batch))


def test_jei_dnn_authors_checkpoint_loads_the_backbone_part(tmp_path):
    model = trained_like(grit_tiny())
    net = {f"grit_transformer.{k}": v for k, v in model.state_dict().items()}
    net["intermediate_heads.0.layer_post_mp.model.1.model.weight"] = torch.rand(10, 16)
    net["gates.0.linear.weight"] = torch.rand(1, 4)
    path = tmp_path / "ckpt_0.1_97.2.pth"
    torch.save({"net": net, "acc": 97.2, "epoch": 8}, path)
    fresh = load_graphgym_checkpoint(grit_tiny(), path)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_checkpoints_that_do_not_fit_or_are_unsafe_are_refused(tmp_path):
    small = tmp_path / "small.ckpt"
    torch.save({"model_state": {f"model.{k}": v for k, v in grit_tiny(hidden=8).state_dict().items()}}, small)
    with pytest.raises(CheckpointError):
        load_graphgym_checkpoint(grit_tiny(), small)
    unsafe = tmp_path / "unsafe.ckpt"
    with open(unsafe, "wb") as f:
        # a torch.save pickle with a type outside the allow-list (fractions.Fraction stands for any class)
        torch.save({"model_state": grit_tiny().state_dict(), "cfg": fractions.Fraction(1, 3)}, f)
    with pytest.raises(CheckpointError, match="Fraction"):
        load_graphgym_checkpoint(grit_tiny(), unsafe)
    namespaced = tmp_path / "ns.ckpt"
    state = {f"model.{k}": v for k, v in grit_tiny().state_dict().items()}
    torch.save({"model_state": state, "args": argparse.Namespace(lr=0.001)}, namespaced)
    load_graphgym_checkpoint(grit_tiny(), namespaced)  # argparse.Namespace is the one allowed extra type
    with pytest.raises(EexitTypeError):
        load_graphgym_checkpoint(torch.nn.Linear(2, 2), namespaced)  # type: ignore[arg-type]


def test_pair_states_and_attention_match_a_hand_computation():
    torch.manual_seed(0)
    model = grit_tiny(rrwp_steps=3).eval()
    # a directed path 0 -> 1 -> 2: pair (0, 1) carries the edge, (1, 0) nothing (no walk goes back)
    data = add_rrwp(Data(x=torch.rand(3, 3), edge_index=torch.tensor([[0, 1], [1, 2]]), edge_attr=torch.rand(2, 1)), 3)
    state = model.start(data)
    pair = {(int(a), int(b)): k for k, (a, b) in enumerate(zip(state.src, state.dst))}
    fc, edge = model.rrwp_rel_encoder.fc, model.encoder.edge_encoder
    with torch.no_grad():
        walk = torch.tensor([0.0, 1.0, 0.0])  # RRWP of (0, 1): [I, P, P²][0, 1] = [0, 1, 0]
        assert torch.allclose(state.e[pair[(0, 1)]], edge(data.edge_attr[0]) + fc(walk), atol=1e-6)
        assert torch.count_nonzero(state.e[pair[(1, 0)]]) == 0
        assert torch.allclose(state.e[pair[(0, 2)]], fc(torch.tensor([0.0, 0.0, 1.0])), atol=1e-6)
        assert torch.allclose(state.log_deg, torch.log(torch.tensor([2.0, 2.0, 1.0])))
        # one attention layer against an explicit loop over destinations and heads
        att = model.layers[0].attention
        x, e = torch.randn(3, 16), torch.randn(9, 16)
        out, s_all = att(x, e, state.src, state.dst)
        heads, dh = att.heads, att.head_dim
        q, k, v = att.Q(x).view(3, heads, dh), att.K(x).view(3, heads, dh), att.V(x).view(3, heads, dh)
        for i in range(3):
            for h in range(heads):
                scores, states = [], []
                for j in range(3):
                    eo = att.E(e[pair[(j, i)]])[2 * dh * h : 2 * dh * (h + 1)]  # head h: its weight, then its bias
                    t = (k[j, h] + q[i, h]) * eo[:dh]
                    t = torch.relu(torch.sign(t) * t.abs().sqrt() + eo[dh:])
                    assert torch.allclose(s_all[pair[(j, i)], h * dh : (h + 1) * dh], t, atol=1e-5)
                    states.append(t)
                    scores.append((t * att.Aw[:, h, 0]).sum().clamp(-att.clamp, att.clamp))
                alpha = torch.softmax(torch.stack(scores), 0)
                expected = sum(a * v[j, h] for j, a in enumerate(alpha))
                expected = expected + sum(a * states[j] for j, a in enumerate(alpha)) @ att.VeRow[:, h, :]
                assert torch.allclose(out[i, h * dh : (h + 1) * dh], expected, atol=1e-5)


def test_graph_head_normalises_its_hidden_layers():
    model = grit_tiny().eval()
    pooled = torch.randn(4, 16)
    mlp = model.post_mp.layer_post_mp.model
    hidden = pooled
    for i in range(2):
        layer = getattr(mlp[0], f"Layer_{i}").layer.model
        hidden = torch.nn.functional.normalize(torch.relu(layer(hidden)), dim=1)  # GraphGym's default l2norm
    with torch.no_grad():
        assert torch.allclose(model.post_mp(pooled), mlp[1].model(hidden), atol=1e-6)


def test_mixed_precision_forward_runs_and_stays_close():
    model = trained_like(grit_tiny())
    batch = Batch.from_data_list([random_graph(n, seed=n) for n in (5, 9, 2)])
    with torch.no_grad():
        full = model(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(batch)
    assert bool(torch.isfinite(half).all())
    assert torch.allclose(half.float(), full, atol=0.15)
