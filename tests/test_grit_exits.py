"""Per-graph early exit on GRIT: the conformance checks of every backbone (early exit == all exits then decide,
detach restores, FLOPs spent == costs reported), per-graph costs, and the library's API end to end on graphs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torch_geometric", reason="GRIT needs the eexit[graph] extra (torch_geometric)")
from torch_geometric.data import Batch, Data
from torch_geometric.loader import DataLoader as GraphLoader

import eexit
from eexit.backbones.grit import GRITSpec
from eexit.baselines import train_boosted, train_l2w
from eexit.cost import flop_counter
from eexit.data import FeatureCache
from eexit.errors import EexitTypeError, EexitValueError, SegmentsUnavailable
from eexit.inference import FixedExitPolicy, decide_exits
from eexit.models.grit import GraphHeadMLP, add_rrwp, grit_tiny
from eexit.sweep import budget_threshold


def graph(n: int, seed: int, label: int | None = None) -> Data:
    g = torch.Generator().manual_seed(seed)
    ei = torch.randint(0, n, (2, 3 * n), generator=g)
    ei = ei[:, ei[0] != ei[1]]
    x = torch.rand(n, 3, generator=g)
    y = label if label is not None else int(x[:, 0].mean() > 0.5) + 2 * int(n > 8)
    data = Data(x=x, edge_index=ei, edge_attr=torch.rand(ei.shape[1], 1, generator=g), y=torch.tensor([y]))
    return add_rrwp(data, 4)


def batch_of(sizes, seed: int = 0) -> Batch:
    return Batch.from_data_list([graph(n, seed + i) for i, n in enumerate(sizes)])


SIZES = (5, 9, 1, 12, 7, 3, 10, 4)


@pytest.fixture
def ee():
    torch.manual_seed(0)
    model = grit_tiny(num_classes=4, layers=4)
    model.train()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        model(batch_of(SIZES, seed=50))
    ee = eexit.attach(model.eval())
    with torch.no_grad():  # gates that spread the graphs over the exits
        for gate in ee.gates:
            for p in gate.parameters():
                p.normal_(0, 2)
    yield ee
    if ee._restore is not None:
        ee.detach()


@pytest.mark.parametrize("gates", ["hazard", "paper"])
def test_early_exit_equals_all_exits_then_decide(gates):
    torch.manual_seed(1)
    model = grit_tiny(num_classes=4, layers=4).eval()
    ee = eexit.attach(model, gates=gates)
    with torch.no_grad():  # confident, varied IMs and gates, so the graphs spread over the exits
        for p in [*ee.heads.parameters(), *ee.gates.parameters()]:
            p.normal_(0, 3)
    batch = batch_of(SIZES)
    seen = set()
    with torch.no_grad():
        full = ee(batch, all_exits=True)
        for tau in torch.linspace(0.02, 1.0, 50).tolist():
            policy = ee.default_policy(tau)
            out = ee(batch, policy=policy)
            taken = decide_exits(full.logits, full.gate_logits, policy)
            assert torch.equal(out.exit_index, taken)
            assert torch.allclose(out.logits, full.logits[taken, torch.arange(len(SIZES))], atol=1e-5)
            seen.update(taken.tolist())
    assert len(seen) >= 3  # the thresholds really spread the graphs over the exits
    ee.detach()


def test_flops_while_shrinking_equal_the_costs_reported(ee):
    batch = batch_of(SIZES)
    n = len(SIZES)
    for target in (torch.arange(n) % ee.num_exits, torch.zeros(n, dtype=torch.long), torch.full((n,), 3)):
        with torch.no_grad(), flop_counter() as counter:
            out = ee(batch, policy=FixedExitPolicy(target, reads_gates=True))
        assert torch.equal(out.exit_index, target)
        assert counter.get_total_flops() == pytest.approx(float(out.cost.sum()), abs=1.0)
    # larger graphs pay more at the same exit: the cost is each graph's own
    out = ee(batch, policy=FixedExitPolicy(torch.zeros(n, dtype=torch.long)))
    order = torch.tensor(SIZES).argsort()
    assert bool((out.cost[order].diff() >= 0).all())


def test_cost_terms_predict_a_graph_of_a_size_never_measured(ee):
    data = Batch.from_data_list([graph(23, seed=7)])
    readings = []
    with torch.no_grad(), flop_counter() as counter:
        ee.run_all_exits(data, on_exit=lambda: readings.append(float(counter.get_total_flops())))
        total = float(counter.get_total_flops())
    flops, bare = ee.sample_costs(data)
    assert flops[0].tolist() == pytest.approx([*readings[: ee.num_exits - 1], total], abs=1.0)
    with torch.no_grad(), flop_counter() as counter:
        ee.backbone(data)
    assert float(bare[0]) == pytest.approx(counter.get_total_flops(), abs=1.0)
    table = ee.cost_table
    assert table.input_shape == [71, 565] and table.per_sample
    assert eexit.cost.CostTable.from_dict(table.to_dict()) == table


def test_uniform_costs_charge_l_over_L_of_each_graph():
    model = grit_tiny(num_classes=4, layers=4).eval()
    ee = eexit.attach(model, spec=GRITSpec(costs="uniform"))
    flops, bare = ee.sample_costs(batch_of((3, 8, 15)))
    final = flops[:, -1:]
    assert torch.allclose(flops / final, torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64).expand(3, -1))
    assert not torch.allclose(final.squeeze(1), bare)  # the last exit also pays the IMs and gates on the way
    ee.detach()
    with pytest.raises(EexitValueError, match="uniform"):
        GRITSpec(costs="macs")


def test_detach_restores_the_model_exactly():
    model = grit_tiny(num_classes=4).train()
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batch = batch_of(SIZES)
    ee = eexit.attach(model)
    ee(batch)
    loader = GraphLoader([graph(n, i) for i, n in enumerate(SIZES * 4)], batch_size=8)
    eexit.fit(ee, loader, loader, epochs=2, warmup_epochs=1, progress=False)
    back = ee.detach()
    assert back is model and model.training
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(EexitValueError, match="detached"):
        ee(batch)


def test_graph_head_ims_copy_the_models_head_and_placement_is_checked():
    model = grit_tiny(num_classes=4, layers=4).eval()
    ee = eexit.attach(model, head="graph_head", exit_blocks=(0, 2))
    assert all(isinstance(h, GraphHeadMLP) for h in ee.heads)
    assert set(ee.heads[0].state_dict()) == set(model.post_mp.layer_post_mp.state_dict())
    assert not torch.equal(ee.heads[0].model[-1].model.weight, model.post_mp.layer_post_mp.model[-1].model.weight)
    assert ee.exit_names == ["layers.0", "layers.2", "<backbone head>"]
    ee.detach()
    with pytest.raises(EexitValueError, match="graph head"):
        eexit.attach(model, exit_blocks=(0, 3))
    with pytest.raises(EexitValueError, match="head_hidden"):
        eexit.attach(model, head="graph_head", head_hidden=8)
    with pytest.raises(SegmentsUnavailable, match="graphs"):
        eexit.attach(model).segments  # noqa: B018


def test_graph_head_is_refused_on_an_image_backbone():
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3)
    with pytest.raises(EexitValueError, match="graph backbones"):
        eexit.attach(vit, head="graph_head")


def test_bad_inputs_name_the_problem(ee):
    with pytest.raises(EexitTypeError, match="torch_geometric"):
        ee(torch.rand(2, 3, 8, 8))
    bad = batch_of((4, 5))
    bad.x[1, 0] = float("nan")
    with pytest.raises(EexitValueError, match="NaN"):
        ee(bad)
    unlabelled = Batch.from_data_list([Data(x=torch.rand(3, 3), edge_index=torch.tensor([[0], [1]]))])
    with pytest.raises(EexitValueError, match="`y`"):
        eexit.evaluate(ee, [unlabelled])
    with pytest.raises(EexitValueError, match="reference graph size"):
        eexit.attach(grit_tiny(), input_size=(3, 32, 32))


@pytest.mark.slow
def test_fit_evaluate_save_load_and_baselines_on_graphs(tmp_path):
    torch.manual_seed(0)
    data = [graph(4 + i % 9, i) for i in range(240)]
    train, val = GraphLoader(data[:160], batch_size=32, shuffle=True), GraphLoader(data[160:], batch_size=32)
    model = grit_tiny(num_classes=4)
    ee = eexit.attach(model, head="graph_head")
    eexit.fit(ee, train, val, lam=0.1, epochs=3, warmup_epochs=1, progress=False)
    report = eexit.evaluate(ee, val, calibration_loader=val)
    # evaluate charges every graph its own cost: the same mean as the early-exit forward's
    costs = torch.cat([ee(b).cost for b in val])
    assert report.mean_gflops == pytest.approx(float(costs.mean()) / 1e9, rel=1e-9)
    assert report.num_samples == 80 and report.conformal is not None
    ee.evaluation = report.to_dict()
    ee.save_pretrained(tmp_path / "adapter")
    ee.detach()
    again = eexit.from_pretrained(model, tmp_path / "adapter")
    assert eexit.evaluate(again, val).accuracy == pytest.approx(report.accuracy)
    assert again.cost_table == ee.cost_table
    # baselines on the same frozen features
    caches = {k: FeatureCache.collect(again, loader, k, progress=False) for k, loader in (("t", train), ("v", val))}
    net = train_boosted(again, caches["t"], caches["v"], gamma=0.5, epochs=1, batch_size=32)
    assert net is not None
    train_l2w(again, caches["t"], caches["v"], epochs=1, batch_size=32, meta_interval=2)
    again.detach()
    other = grit_tiny(num_classes=4)
    with pytest.raises(eexit.AdapterError):
        eexit.from_pretrained(other, tmp_path / "adapter")  # other weights: the fingerprint refuses


def test_saved_cost_convention_comes_back(tmp_path):
    model = grit_tiny(num_classes=4, layers=4).eval()
    ee = eexit.attach(model, spec=GRITSpec(costs="uniform"))
    ee.save_pretrained(tmp_path / "a")
    fractions = ee.cost_table.fraction_of_backbone()
    ee.detach()
    again = eexit.from_pretrained(model, tmp_path / "a")
    assert again.spec.costs == "uniform" and again.cost_table.fraction_of_backbone() == fractions
    again.detach()
    with pytest.raises(eexit.AdapterError, match="uniform"):
        eexit.from_pretrained(model, tmp_path / "a", spec=GRITSpec(costs="flops"))


def test_bad_graph_data_is_refused(ee):
    bad = batch_of((4, 5))
    bad.edge_attr[0, 0] = float("inf")
    with pytest.raises(EexitValueError, match="edge_attr"):
        ee(bad)
    onehot = batch_of((4, 5))
    onehot.y = torch.nn.functional.one_hot(onehot.y, 4)
    with pytest.raises(EexitValueError, match="one class index per graph"):
        eexit.evaluate(ee, [onehot])
    with pytest.raises(EexitValueError, match="at most 6 edges"):
        eexit.attach(grit_tiny(), input_size=(3, 100))


def test_budgets_and_caches_charge_each_graph_its_own_cost(ee):
    data = [graph(2 + i % 20, i) for i in range(120)]  # sizes 2..21: costs differ by two orders of magnitude
    loader = GraphLoader(data, batch_size=32)
    cache = FeatureCache.collect(ee, loader, "val", progress=False)
    assert cache.sample_flops is not None and cache.sample_flops.shape == (120, ee.num_exits)
    from_loader, from_cache = eexit.evaluate(ee, loader), eexit.evaluate(ee, cache)
    assert from_cache.cost_fraction == pytest.approx(from_loader.cost_fraction, rel=1e-9)
    assert from_cache.mean_gflops == pytest.approx(from_loader.mean_gflops, rel=1e-9)
    met = 0
    for target in (0.5, 0.7, 0.9):
        try:
            tau = budget_threshold(ee, cache, target)
        except EexitValueError:
            continue
        spent = eexit.evaluate(ee, cache, policy=ee.default_policy(tau)).cost_fraction
        assert spent <= target + 1e-9
        met += 1
    assert met >= 1
