"""eexit on the Dynamic Perceiver: its four exits as eexit's exits, with real stage skipping (eexit.staged).

The IMs are trainable copies of ``early_classifier3``, ``classifier_att`` and ``classifier_cnn`` (as the JEI-DNN
authors fine-tuned them, ``reference/backbones.md`` §1.9); ``classifier_merge`` is the final exit.
"""

from __future__ import annotations

import pytest
import timm
import torch
from backbone_zoo import spread_exits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import eexit
import eexit.models.dynamic_perceiver  # registers the timm models
from eexit.backbones.dynamic_perceiver import DynPerceiverSpec
from eexit.cost import flop_counter
from eexit.errors import AdapterError, EexitValueError
from eexit.inference import FixedExitPolicy
from eexit.model import EarlyExitModel
from eexit.staged import StagedDriver

IMG = 32
SIZE = (3, IMG, IMG)
GATE = 2 * len(eexit.ExitConfig().gate_features) * 1  # FLOPs of one default Linear(F, 1) gate


def _tiny(seed: int = 0, **overrides: object) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("dyn_perceiver_tiny", **overrides)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval-mode BN matters
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return model.eval()


def _images(batch: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, *SIZE, generator=torch.Generator().manual_seed(seed))


def _attached(seed: int = 0, **kwargs: object) -> EarlyExitModel:
    return eexit.attach(_tiny(seed), input_size=SIZE, **kwargs)


# ---------------------------------------------------------------------------------------------- attach
@pytest.mark.parametrize(
    "overrides", [{}, {"with_isc": False}, {"with_last_ca": False}, {"with_z2x": False, "with_x2z": False}]
)
def test_attach_detach_leaves_the_model_as_it_was(overrides):
    model = _tiny(**overrides)
    x = _images()
    with torch.no_grad():
        before = model.forward_exits(x)
    model.train()
    model.latent.requires_grad_(False)  # a mixed set of flags, restored one by one
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}

    ee = eexit.attach(model, input_size=SIZE)
    assert isinstance(ee.driver, StagedDriver) and ee.spec.name == "dyn_perceiver"
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(m.training for m in model.modules())  # the CNN's BatchNorm included
    with torch.no_grad():
        out = ee(x, all_exits=True)
        ee(x)
    # untrained IMs are exact copies: every exit equals the model's own, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(out.logits, before))
    ee.detach()

    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    model.eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model.forward_exits(x), before))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["reg800m_perceiver_t128", "resnet50_0375_perceiver_t128", "mobilenetV3_0x75_perceiver_t128"]
)
def test_released_architectures(name):
    # Each trunk registers its classifiers in another order, and MobileNet's CNN head is an MLP with dropout.
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        own = model.forward_exits(x)
    ee = eexit.attach(model, input_size=(3, 64, 64))
    assert type(ee.heads[2]) is type(model.classifier_cnn)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(ee(x, all_exits=True).logits, own))
        assert torch.equal(ee(x).logits, ee(x).logits)  # the copied heads' dropout is off at inference
    assert ee.cost_table.exit_flops[-1] == ee.cost_table.backbone_flops + 3 * GATE


def test_exits_are_the_models_classifiers():
    ee = _attached()
    x = _images()
    assert ee.num_exits == 4 and ee.exit_blocks == [0, 1, 2] and ee.has_backbone_head
    assert ee.exit_names == ["early_classifier3", "classifier_att", "classifier_cnn", "classifier_merge"]
    out = ee(x, all_exits=True)
    assert out.logits.shape == (4, 7, 5) and out.gate_logits.shape == (3, 7) and out.exit_probs.shape == (4, 7)
    features, final = ee.exit_features(x)  # what fit() caches: the frozen trunk's part of every exit
    assert [f.shape[1] for f in features] == ee.feature_layout()[0] == [32, 64, 64, 128] and final is None
    assert ee.feature_layout()[1] is False  # the final exit's logits depend on the IMs (isc4): never cached
    assert torch.equal(ee.outputs_from_features(features, None).logits, out.logits)
    # the IMs own their tensors: trainable, and not the backbone's
    backbone_params = {id(p) for p in ee.backbone.parameters()}
    assert all(p.requires_grad and id(p) not in backbone_params for p in ee.heads.parameters())
    assert sorted(ee.adapter_state_dict()) == sorted(
        [f"heads.{k}.{t}" for k in range(3) for t in ("weight", "bias")]
        + [f"gates.{k}.linear.{t}" for k in range(3) for t in ("weight", "bias")]
    )
    assert not ee.training


# ---------------------------------------------------------------------------------------------- early exit
def test_later_stages_really_skipped():
    model = _tiny()
    seen: dict[str, list[int]] = {}
    watched = {  # the first module of each stage's own work, and every classifier
        "stage1": model.cnn_stem, "stage2": model.self_att4, "stage3": model.cnn_body_stage4,
        "stage4": model.last_cross_att_z2x, **{name: model.get_submodule(name) for name in model.exit_names},
    }  # fmt: skip
    for name, module in watched.items():
        seen[name] = []
        module.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0].shape[0]))
    ee = eexit.attach(model, input_size=SIZE)
    for calls in seen.values():
        calls.clear()  # forget the cost-table measurement

    out = ee(_images(), policy=FixedExitPolicy(torch.tensor([0, 2, 0, 1, 3, 1, 0])))
    assert out.exit_index.tolist() == [0, 2, 0, 1, 3, 1, 0]
    assert [seen[f"stage{i}"] for i in range(1, 5)] == [[7], [4], [2], [1]]
    assert seen["classifier_merge"] == [1]
    # the model's own intermediate classifiers never run (the IMs are copies, without the hooks put here)
    assert seen["early_classifier3"] == seen["classifier_att"] == seen["classifier_cnn"] == []

    for calls in seen.values():
        calls.clear()
    ee(_images(), policy=FixedExitPolicy(torch.zeros(7, dtype=torch.long)))
    assert seen["stage1"] == [7] and not any(seen[f"stage{i}"] for i in (2, 3, 4)) and not seen["classifier_merge"]


# ---------------------------------------------------------------------------------------------- cost table
def test_cost_table_matches_the_models_own_per_exit_costs():
    ee = _attached()
    model, table = ee.backbone, ee.cost_table
    example = torch.zeros(1, *SIZE)
    own = []  # the model's cumulative FLOPs after each of its own stages
    with torch.no_grad(), flop_counter() as counter:
        state = model.initial_state(example)
        for stage in model.forward_stages():
            state = stage(state)
            own.append(float(counter.get_total_flops()))
        full = float(counter.get_total_flops())
    with torch.no_grad(), flop_counter() as bare:
        model.forward_exits(example)  # the bare backbone's forward: every exit, as released
    assert table.exit_flops == [own[0] + GATE, own[1] + 2 * GATE, own[2] + 3 * GATE, own[3] + 3 * GATE]
    assert table.backbone_flops == float(bare.get_total_flops()) == full
    assert table.exit_flops[-1] == full + 3 * GATE
    assert all(b > a for a, b in zip(table.exit_flops, table.exit_flops[1:]))
    assert table.input_shape == list(SIZE)


def test_cost_table_defaults_to_the_models_input_size():
    ee = eexit.attach(_tiny())
    assert ee.cost_table.input_shape == [3, 32, 32]  # timm's pretrained_cfg of the tiny Dyn-Perceiver
    ee.detach()


# ---------------------------------------------------------------------------------------------- training
def _loaders() -> tuple[DataLoader, DataLoader]:
    def data(n: int, seed: int) -> TensorDataset:
        g = torch.Generator().manual_seed(seed)  # the class is the mean colour: learnable at every exit
        y = torch.randint(0, 5, (n,), generator=g)
        return TensorDataset(torch.randn(n, *SIZE, generator=g) * 0.5 + (y.float() - 2).view(-1, 1, 1, 1), y)

    return DataLoader(data(96, 0), batch_size=32, shuffle=True), DataLoader(data(64, 1), batch_size=32)


@pytest.mark.parametrize("cache", [True, False])
def test_fit_lowers_the_loss_and_leaves_the_backbone_untouched(cache):
    ee = _attached()
    state = {k: v.clone() for k, v in ee.backbone.state_dict().items()}
    bn_modes: list[bool] = []
    for bn in (ee.backbone.cnn_stem[1], ee.backbone.isc3[1]):  # a CNN BatchNorm, and one inside an isc link
        bn.register_forward_pre_hook(lambda m, args: bn_modes.append(m.training))
    train, val = _loaders()
    x, y = next(iter(val))

    def loss() -> float:
        with torch.no_grad():
            logits = ee(x, all_exits=True).logits[:3]
            return float(sum(torch.nn.functional.cross_entropy(lg, y) for lg in logits))

    before = loss()
    history = eexit.fit(
        ee, train, val, lam=0.1, epochs=6, warmup_epochs=2, phase_batches=2, lr=0.05,
        cache_features=cache, select="last", progress=False,
    )  # fmt: skip
    assert loss() < before
    assert history[-1]["val_objective"] < history[0]["val_objective"]
    assert bn_modes and not any(bn_modes), "frozen BatchNorm must stay in eval mode while the exits train"
    assert all(torch.equal(v, state[k]) for k, v in ee.backbone.state_dict().items())
    assert not any(p.requires_grad for p in ee.backbone.parameters()) and not ee.training


def test_exit_losses_reach_earlier_ims_through_the_isc_links_unless_detached():
    x, y = _images(8), torch.arange(8) % 5
    for detach_isc, reaches in ((False, True), (True, False)):
        ee = eexit.attach(_tiny(), spec=DynPerceiverSpec(detach_isc=detach_isc), input_size=SIZE)
        ee.train()
        torch.nn.functional.cross_entropy(ee(x, all_exits=True).logits[1], y).backward()  # exit 2's loss
        assert bool(ee.heads[0].weight.grad.abs().sum() > 0) == reaches
        assert bool(ee.heads[1].weight.grad.abs().sum() > 0)
        ee.detach()


def test_fit_with_the_backbone_trains_and_exports_the_fine_tuned_exits():
    ee = _attached()
    train, val = _loaders()
    eexit.fit(ee, train, val, epochs=1, warmup_epochs=1, train_backbone=True, progress=False)
    x = _images()
    with torch.no_grad():
        expected = ee(x, all_exits=True).logits
    model = ee.detach()
    model.load_state_dict(ee.exit_classifier_state_dict(), strict=False)
    with torch.no_grad():
        got = model.forward_exits(x)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, expected))


# ---------------------------------------------------------------------------------------------- files
def test_save_and_load_round_trip(tmp_path):
    ee = _attached()
    x = _images(64, seed=5)
    spread_exits(ee, x)
    with torch.no_grad():
        for p in ee.heads.parameters():  # as if fine-tuned
            p.add_(0.1 * torch.randn_like(p))
        expected_all, expected = ee(x, all_exits=True), ee(x)
    ee.save_pretrained(tmp_path)
    loaded = eexit.from_pretrained(_tiny(), tmp_path)
    assert isinstance(loaded.driver, StagedDriver) and loaded.cost_table == ee.cost_table
    with torch.no_grad():
        got_all, got = loaded(x, all_exits=True), loaded(x)
    assert torch.equal(got_all.logits, expected_all.logits) and torch.equal(got.exit_index, expected.exit_index)
    assert torch.equal(got.logits, expected.logits)
    with pytest.raises(AdapterError, match="weights"):  # other backbone weights are refused
        eexit.from_pretrained(_tiny(seed=1), tmp_path)


# ---------------------------------------------------------------------------------------------- bad input
def test_wrong_image_size_is_a_clear_error():
    ee = _attached()
    with pytest.raises(EexitValueError, match=r"input_size=\(3, 48, 48\)"):
        ee(torch.randn(2, 3, 48, 48))
    with pytest.raises(EexitValueError, match="at least 16x16"):
        eexit.attach(_tiny(), input_size=(3, 8, 8))


@pytest.mark.parametrize(("kwargs", "match"), [({"exit_blocks": (1, 2)}, "exit_blocks"), ({"head": "mlp"}, "head")])
def test_unsupported_exit_settings_are_refused_before_touching_the_model(kwargs, match):
    model = _tiny()
    model.train()
    with pytest.raises(EexitValueError, match=match):
        eexit.attach(model, input_size=SIZE, **kwargs)
    assert all(p.requires_grad for p in model.parameters()) and all(m.training for m in model.modules())
    eexit.attach(model, input_size=SIZE)  # not marked as attached


def test_detached_exits_refuse_to_run():
    ee = _attached()
    ee.detach()
    with pytest.raises(EexitValueError, match="detached"):
        ee(_images())


def test_sweep_and_boosted_baseline_work_and_l2w_is_refused():
    from eexit.baselines import train_boosted, train_l2w
    from eexit.sweep import sweep_lambda

    ee = _attached()
    train, val = _loaders()
    result = sweep_lambda(ee, train, val, [0.1, 1.0], epochs=2, warmup_epochs=1, progress=False)
    assert [p.lam for p in result.points] == [0.1, 1.0]
    assert {"lam_0.1", "lam_1"} <= set(ee.adapter_names)
    boosted = train_boosted(ee, train, val, epochs=1, progress=False)
    x = _images(8)
    with torch.no_grad():
        logits = boosted.logits(ee(x, all_exits=True).logits)
    assert logits.shape == (4, 8, 5)
    with pytest.raises(EexitValueError, match="independent exit heads"):
        train_l2w(ee, train, val, epochs=1, progress=False)


def test_model_card_says_what_staged_exits_are(tmp_path):
    ee = _attached()
    card = (ee.save_pretrained(tmp_path) / "README.md").read_text()
    widths = ", ".join(str(w) for w in ee.feature_layout()[0])
    assert f"copies of the backbone's own exit classifiers, on its stage features of width {widths}" in card
    assert "linear heads" not in card
