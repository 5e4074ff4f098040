"""The conformance matrix: every backbone spec, on a tiny backbone of each family, passes the same checks.

Per entry of ``tests/backbone_zoo.py``:

* the expected spec matches; attach then detach leaves outputs, ``requires_grad`` flags, modes and hooks as
  they were (and calling the backbone while attached gives its own output);
* exit shapes: every exit's logits, gate logits and pooled features; the last exit is the backbone's own head
  (for the Dynamic Perceiver, run by the staged driver, its final classifier);
  an IM given the head's weights at the last block reproduces the head (the IM reads what the head reads);
* real early exit makes the same decisions and gives the same logits as running every exit and deciding
  afterwards, at batch 1, 7 and 64, with gates calibrated to spread the samples over the exits;
* the cost table rises, and its last exit equals FlopCounterMode on the bare model plus the exits' own FLOPs
  (pooling, IMs and gates, measured separately); FLOPs counted while the batch shrinks equal the reported
  per-sample costs;
* a few optimiser steps on the IMs and gates lower the JEI-DNN loss on a fixed batch, backbone untouched;
* ``save_pretrained`` then ``eexit.from_pretrained`` on a fresh model with the same weights is exact.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from backbone_zoo import CLASSES, IMG, ZOO, Entry, model_output, spec_of, spread_exits
from torch import nn

import eexit
from eexit import objective
from eexit.backbones import StagedSpec
from eexit.cost import CostTable, flop_counter
from eexit.inference import FixedExitPolicy, GatePolicy, decide_exits

NAMES = sorted(ZOO)


def _images(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def attached() -> dict[str, tuple[Entry, eexit.EarlyExitModel]]:
    """One attached model per entry, gates spread, shared by the tests that only read it."""
    cache: dict[str, tuple[Entry, eexit.EarlyExitModel]] = {}
    return cache


def _attached(cache: dict, name: str) -> tuple[Entry, eexit.EarlyExitModel]:
    if name not in cache:
        entry = ZOO[name]
        ee = eexit.attach(entry.build(), **entry.attach)
        spread_exits(ee, _images(64, seed=5))
        cache[name] = (entry, ee)
    return cache[name]


@pytest.mark.parametrize("name", NAMES)
def test_attach_detach_leaves_no_trace(name):
    entry = ZOO[name]
    model = entry.build()
    assert spec_of(entry, model).name == entry.spec
    x = _images(3)
    model.eval()
    with torch.no_grad():
        before = model_output(entry, model, x)  # first call: lets transformers install its lazy hooks
    params = list(model.parameters())
    params[0].requires_grad_(False)  # a mixed set of flags, restored one by one
    model.train()  # a mode attach must change (to eval) and detach must restore
    flags, modes, hooks = [p.requires_grad for p in params], [m.training for m in model.modules()], _hooks(model)

    ee = eexit.attach(model, **entry.attach)
    assert not any(p.requires_grad for p in model.parameters()) and not any(m.training for m in model.modules())
    with torch.no_grad():
        ee(x)
        ee(x, all_exits=True)
        assert torch.equal(model_output(entry, model, x), before)  # hooks are inert outside eexit calls
    eexit.detach(ee)

    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes
    assert _hooks(model) == hooks
    model.eval()
    with torch.no_grad():
        assert torch.equal(model_output(entry, model, x), before)


def _block_count(model: torch.nn.Module) -> int:
    """How many blocks the model has, read from its own config or module lists (not from the spec)."""
    config = getattr(model, "config", None)
    if config is not None:  # transformers
        vision = getattr(config, "vision_config", config)
        depths = getattr(vision, "depths", None)
        return sum(depths) if depths else vision.num_hidden_layers
    layers = getattr(model, "layers", None)
    if layers is not None and all(hasattr(stage, "blocks") for stage in layers):  # timm Swin: stages of blocks
        return sum(len(stage.blocks) for stage in layers)
    return len(model.blocks if hasattr(model, "blocks") else layers)


@pytest.mark.parametrize("name", NAMES)
def test_exit_shapes_and_last_exit(attached, name):
    entry, ee = _attached(attached, name)
    x = _images(3)
    with torch.no_grad():
        out = ee(x, all_exits=True)
        features, final = ee.exit_features(x)
    num_exits = ee.num_exits
    assert num_exits == len(ee.exit_blocks) + int(ee.has_backbone_head) == len(ee.exit_names)
    # the spec finds every block (counted independently of it; a staged model's blocks are its 4 exit classifiers)
    blocks = 4 if isinstance(ee.spec, StagedSpec) else _block_count(ee.backbone)
    assert len(ee.spec.blocks(ee.backbone)) == blocks
    # default placement: after every block but the last when the backbone has a head (it is the last exit)
    assert ee.exit_blocks == list(range(blocks - int(ee.has_backbone_head)))
    assert num_exits == blocks
    assert out.logits.shape == (num_exits, 3, CLASSES) and out.gate_logits.shape == (num_exits - 1, 3)
    widths, with_head_logits = ee.feature_layout()
    assert [tuple(f.shape) for f in features] == [(3, w) for w in widths]
    assert len(ee.cost_table.exit_flops) == num_exits
    if ee.has_backbone_head:
        last = out.logits[-1]
        if isinstance(ee.spec, StagedSpec):  # its last exit reads the (here randomised) IMs: compare untouched ones
            fresh = eexit.attach(entry.build(), **entry.attach)
            with torch.no_grad():
                last = fresh(x, all_exits=True).logits[-1]
            fresh.detach()
        with torch.no_grad():
            assert torch.allclose(last, model_output(entry, ee.backbone, x), atol=1e-5)
    if with_head_logits:
        assert torch.equal(final, out.logits[-1])
    else:  # no head, or a staged backbone, whose last exit reads a feature like the others
        assert final is None and len(widths) == num_exits


def _single_linear_head(model: nn.Module) -> nn.Linear | None:
    """The model's classifier when it is one Linear (distilled / teacher models have two)."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else getattr(model, "classifier", getattr(model, "fc", None))
    return head if isinstance(head, nn.Linear) else None


@pytest.mark.parametrize("name", NAMES)
def test_im_reads_what_the_head_reads(name):
    entry = ZOO[name]
    model = entry.build()
    head = _single_linear_head(model)
    if isinstance(spec_of(entry, model), StagedSpec):
        pytest.skip("a staged backbone's IMs are copies of its own classifiers (test_dyn_perceiver_exits.py)")
    if head is None or not spec_of(entry, model).num_classes(model):
        pytest.skip("no single Linear classifier to compare with")
    last = len(spec_of(entry, model).blocks(model)) - 1
    ee = eexit.attach(model, **entry.attach, exit_blocks=(last,))
    ee.heads[0].net.load_state_dict(head.state_dict())
    with torch.no_grad():
        out = ee(_images(3), all_exits=True)
    assert torch.allclose(out.logits[0], out.logits[1], atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_early_exit_equals_run_all_then_decide(attached, name):
    _, ee = _attached(attached, name)
    calibration = _images(64, seed=5)
    for batch in (1, 7, 64):
        x = calibration[:batch]
        with torch.no_grad():
            full = ee(x, all_exits=True)
            expected = decide_exits(full.logits, full.gate_logits, GatePolicy(0.5))
            out = ee(x)
        assert torch.equal(out.exit_index, expected), batch
        assert torch.allclose(out.logits, full.logits[expected, torch.arange(batch)], atol=1e-5, rtol=1e-4)
        assert torch.equal(out.cost, torch.tensor(ee.cost_table.exit_flops, dtype=torch.float64)[expected])
    assert len(expected.unique()) >= min(4, ee.num_exits), "the gates should spread the samples over the exits"


def _independent_costs(entry: Entry, ee: eexit.EarlyExitModel) -> tuple[float, float, float]:
    """(bare model FLOPs, bare FLOPs up to the last block's output, the exits' own FLOPs), all measured anew."""
    spec, model = ee.spec, ee.backbone
    blocks = [module for _, module in spec.blocks(model)]
    x = torch.zeros(1, *ee.cost_table.input_shape)
    hidden: dict[int, torch.Tensor] = {}
    at_last: list[float] = []
    with flop_counter() as bare:
        handles = [
            blocks[b].register_forward_hook(lambda m, a, o, b=b: hidden.setdefault(b, o)) for b in ee.exit_blocks
        ]
        handles.append(blocks[-1].register_forward_hook(lambda m, a, o: at_last.append(bare.get_total_flops())))
        try:
            with torch.no_grad():
                spec.call(model, x)
        finally:
            for handle in handles:
                handle.remove()
    with flop_counter() as exits, torch.no_grad():
        for k, b in enumerate(ee.exit_blocks):
            logits = ee.heads[k](spec.pool_at(model, spec.hidden(hidden[b]), b))
            if k < ee.num_exits - 1:
                ee.gates[k](logits)
    return float(bare.get_total_flops()), float(at_last[0]), float(exits.get_total_flops())


@pytest.mark.parametrize("name", NAMES)
def test_cost_table_rises_and_adds_up(attached, name):
    entry, ee = _attached(attached, name)
    flops = ee.cost_table.exit_flops
    assert all(b > a for a, b in itertools.pairwise(flops))
    assert CostTable.from_dict(ee.cost_table.to_dict()) == ee.cost_table
    if isinstance(ee.spec, StagedSpec):
        return  # no blocks to hook: test_dyn_perceiver_exits.py checks each stage against the model's own costs
    bare, bare_to_last_block, exits = _independent_costs(entry, ee)
    assert ee.cost_table.backbone_flops == pytest.approx(bare, abs=0.5)
    # with its own head the model runs to the end; without, the last IM stops it after the last block
    backbone = bare if ee.has_backbone_head else bare_to_last_block
    assert flops[-1] == pytest.approx(backbone + exits, abs=0.5)


@pytest.mark.parametrize("name", NAMES)
def test_flops_while_shrinking_equal_reported_costs(attached, name):
    entry, ee = _attached(attached, name)
    batch = 2 * ee.num_exits
    x = _images(batch)
    # The cost table charges every gate on the way; a policy that reads no gate spares them (FLOPs of a Linear(F, 1)).
    for target in (torch.arange(batch) % ee.num_exits, torch.zeros(batch, dtype=torch.long)):
        with torch.no_grad(), flop_counter() as counter:
            out = ee(x, policy=FixedExitPolicy(target, reads_gates=True))
        assert torch.equal(out.exit_index, target)
        if entry.shared_flops:  # per-forward work is paid once per batch, but charged to every sample
            assert counter.get_total_flops() <= float(out.cost.sum())
        else:
            assert counter.get_total_flops() == pytest.approx(float(out.cost.sum()), abs=1.0)
    for k in range(ee.num_exits):  # one sample alone pays exactly its exit's cost, whatever the model
        with torch.no_grad(), flop_counter() as counter:
            out = ee(x[:1], policy=FixedExitPolicy(torch.tensor([k]), reads_gates=True))
        assert counter.get_total_flops() == pytest.approx(float(out.cost.sum()), abs=1.0)


@pytest.mark.parametrize("name", NAMES)
def test_training_steps_lower_the_loss(name):
    entry = ZOO[name]
    ee = eexit.attach(entry.build(), **entry.attach)
    backbone_state = {k: v.clone() for k, v in ee.backbone.state_dict().items()}
    x, y = _images(16), torch.randint(0, CLASSES, (16,), generator=torch.Generator().manual_seed(2))
    trainable = ee.num_exits - int(ee.has_backbone_head)

    def loss() -> torch.Tensor:
        out = ee(x, all_exits=True)
        ce = objective.per_exit_ce(out.logits, y)  # [E, B]
        best = objective.optimal_exit(objective.exit_costs(ce.detach(), ee.cost_table.ic, lam=0.5))
        gates = objective.gate_loss(out.gate_logits, objective.gate_targets(best, ee.num_exits))
        return ce[:trainable].mean() + gates

    optimizer = torch.optim.Adam([*ee.heads.parameters(), *ee.gates.parameters()], lr=0.05)
    ee.train()
    first = loss()
    for _ in range(5):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
    assert loss().item() < first.item()
    assert all(torch.equal(v, backbone_state[k]) for k, v in ee.backbone.state_dict().items())


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(attached, name, tmp_path):
    entry, ee = _attached(attached, name)
    path = ee.save_pretrained(tmp_path / "adapter")
    fresh = entry.build(seed=1)
    fresh.load_state_dict(ee.backbone.state_dict())
    kwargs = {k: v for k, v in entry.attach.items() if k in ("spec", "input_size")}
    loaded = eexit.from_pretrained(fresh, path, **kwargs)
    assert loaded.cost_table == ee.cost_table
    x = _images(7)
    with torch.no_grad():
        expected, got = ee(x), loaded(x)
        assert torch.equal(got.exit_index, expected.exit_index) and torch.equal(got.logits, expected.logits)
        assert torch.equal(loaded(x, all_exits=True).gate_logits, ee(x, all_exits=True).gate_logits)
