"""Tests of the Dynamic Perceiver re-implementation (eexit.models.dynamic_perceiver).

Fingerprints of the released architectures (parameter and state-dict key counts, per-exit MACs) come from
``reference/backbones.md`` §1.4 and §4.1; the 100-class MobileNet count matches the JEI-DNN authors' log.
"""

from __future__ import annotations

import argparse

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from eexit.errors import EexitTypeError, EexitValueError
from eexit.models._checkpoint import CheckpointError, save_as_safetensors
from eexit.models.dynamic_perceiver import (
    EXIT_NAMES,
    DynPerceiver,
    DynPerceiverConfig,
    DynPerceiverState,
    load_official_dyn_perceiver_checkpoint,
)

PRESET_FINGERPRINTS = [  # name, classes, parameters, state-dict keys
    ("reg800m_perceiver_t128", 1000, 21_798_360, 795),
    ("resnet50_0375_perceiver_t128", 1000, 20_283_336, 736),
    ("mobilenetV3_0x75_perceiver_t128", 1000, 9_299_040, 808),
    ("mobilenetV3_0x75_perceiver_t128", 100, 7_077_840, 808),
]
# Cumulative GMACs at exits 1-4, 224 px, 1000 classes (reference table; the repo's counter for RegNet and
# MobileNet also counts pooling, which FlopCounterMode does not: hence a 1% tolerance).
REFERENCE_GMACS = {
    "reg800m_perceiver_t128": (0.459, 1.065, 1.228, 1.298),
    "resnet50_0375_perceiver_t128": (0.619, 1.007, 1.122, 1.190),
    "mobilenetV3_0x75_perceiver_t128": (0.0977, 0.1820, 0.2069, 0.2664),
}


class NotAllowed:
    """A type the weights-only unpickler must refuse."""


def _tiny(seed: int = 0, **overrides: object) -> DynPerceiver:
    torch.manual_seed(seed)
    model = timm.create_model("dyn_perceiver_tiny", **overrides)
    _randomise_bn(model)
    return model.eval()


def _randomise_bn(model: torch.nn.Module) -> None:
    """Non-trivial BatchNorm statistics, so eval-mode tests exercise them (and a wrong load shows)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)


def _images(batch: int = 6, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _save_official(path, model: DynPerceiver, ema: DynPerceiver, *, module_prefix: bool = False) -> None:
    """Write a file in the released training script's layout: model, model_ema, epoch, optimizer, args."""
    prefix = "module." if module_prefix else ""
    torch.save(
        {
            "model": {prefix + k: v for k, v in model.state_dict().items()},
            "model_ema": ema.state_dict(),
            "epoch": 299,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
            "args": argparse.Namespace(model="dyn_perceiver_tiny", depth_factor=[1, 1, 1, 1], lr=1e-3),
        },
        path,
    )


# ------------------------------------------------------------------------------------------ fingerprints


@pytest.mark.parametrize(("name", "classes", "params", "keys"), PRESET_FINGERPRINTS)
def test_released_presets_match_parameter_and_key_counts(name: str, classes: int, params: int, keys: int) -> None:
    model = timm.create_model(name, num_classes=classes)
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == keys


def test_cnn_trunks_export_to_torchvision_classes() -> None:
    tv = pytest.importorskip("torchvision.models")
    sd = timm.create_model("reg800m_perceiver_t128").state_dict()
    renames = {"cnn_stem.": "stem.", "cnn_body.": "trunk_output.", "classifier_cnn.": "fc."}
    cnn = {new + k[len(old) :]: v for k, v in sd.items() for old, new in renames.items() if k.startswith(old)}
    tv.regnet_y_800mf().load_state_dict(cnn, strict=True)

    sd = timm.create_model("mobilenetV3_0x75_perceiver_t128").state_dict()
    firsts = {
        "cnn_stem": 0,
        "cnn_body_stage1": 3,
        "cnn_body_stage2": 5,
        "cnn_body_stage3": 8,
        "cnn_body_stage4": 14,
    }
    cnn = {}
    for k, v in sd.items():
        head, _, rest = k.partition(".")
        if head in firsts:
            idx, _, tail = rest.partition(".")
            cnn[f"features.{firsts[head] + int(idx)}.{tail}"] = v
        elif head == "classifier_cnn":
            cnn[f"classifier.{rest}"] = v
    tv.mobilenet_v3_large(width_mult=0.75).load_state_dict(cnn, strict=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REFERENCE_GMACS))
def test_per_exit_gmacs_match_reference(name: str) -> None:
    model = timm.create_model(name).eval()
    cumulative = []
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        state = model.initial_state(torch.randn(1, 3, 224, 224))
        for stage in model.forward_stages():
            state = stage(state)
            cumulative.append(counter.get_total_flops() / 2 / 1e9)  # MACs = FLOPs / 2
    print(name, [round(g, 4) for g in cumulative])
    assert cumulative == sorted(cumulative)
    assert cumulative == pytest.approx(REFERENCE_GMACS[name], rel=0.01)


# ------------------------------------------------------------------------------------ registry and config


def test_timm_registration_and_names() -> None:
    names = set(timm.list_models("*perceiver*"))
    expected = {
        "reg800m_perceiver_t128", "resnet50_0375_perceiver_t128", "mobilenetV3_0x75_perceiver_t128",
        "mobilenetv3_0x75_perceiver_t128", "dyn_perceiver_tiny",
    }  # fmt: skip
    assert expected <= names
    # timm keeps the released mixed-case name as is; the lower-case alias builds the same architecture.
    mixed = timm.create_model("mobilenetV3_0x75_perceiver_t128", num_classes=10)
    lower = timm.create_model("mobilenetv3_0x75_perceiver_t128", num_classes=10)
    assert {k: v.shape for k, v in mixed.state_dict().items()} == {k: v.shape for k, v in lower.state_dict().items()}
    assert isinstance(timm.create_model("dyn_perceiver_tiny"), DynPerceiver)


def test_registered_factories_take_released_option_names_and_refuse_unknown_ones() -> None:
    model = timm.create_model("dyn_perceiver_tiny", SA_widening_factor=3, with_last_CA=False, drop_rate=0.1)
    assert model.config.sa_widening_factor == 3 and model.last_cross_att_z2x is None
    assert model.config.cnn_drop_rate == 0.1
    with pytest.raises(EexitTypeError, match="img_size"):
        timm.create_model("dyn_perceiver_tiny", img_size=64)
    with pytest.raises(EexitValueError, match="spatial_reduction"):
        timm.create_model("dyn_perceiver_tiny", spatial_reduction=False)
    with pytest.raises(EexitValueError, match="load_official_dyn_perceiver_checkpoint"):
        timm.create_model("dyn_perceiver_tiny", pretrained=True)


@pytest.mark.parametrize(
    ("field", "value"), [("depth_factor", (1, 1, 1)), ("num_latents", 4), ("trunk", "vgg"), ("dropout", 1.5)]
)
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(EexitValueError, match=field):
        DynPerceiverConfig(**{"trunk": "tiny", field: value})  # type: ignore[arg-type]


def test_config_lists_become_tuples() -> None:
    assert DynPerceiverConfig(trunk="tiny", depth_factor=[1, 1, 1, 3]).sa_layers == (3, 3, 9, 9)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("train", [False, True])
def test_tiny_returns_four_logits(train: bool) -> None:
    model = _tiny().train(train)
    out = model.forward_exits(_images(batch=3))
    assert isinstance(out, tuple) and len(out) == 4
    assert all(y.shape == (3, 5) for y in out)


@torch.no_grad()
def test_forward_is_the_merged_exit_and_equals_the_staged_path() -> None:
    model, images = _tiny(), _images()
    y = model(images)
    exits = model.forward_exits(images)
    assert isinstance(y, torch.Tensor) and y.shape == (6, 5)
    assert torch.equal(y, exits[-1]) and torch.equal(y, _run_stages(model, images)[-1])
    assert torch.equal(y, model.forward_head(model.forward_features(images)))
    assert all(torch.equal(a, b) for a, b in zip(exits, _run_stages(model, images), strict=True))


def test_training_forward_returns_every_exit_unless_switched_off() -> None:
    model, images = _tiny().train(), _images(batch=4)
    out = model(images)  # training mode: the released training puts a loss on every exit
    assert isinstance(out, tuple) and len(out) == 4
    assert all(torch.equal(a, b) for a, b in zip(out, model.forward_exits(images), strict=True))
    model.set_exits_training(False)
    merged = model(images)
    assert isinstance(merged, torch.Tensor) and torch.equal(merged, out[-1])


@pytest.mark.parametrize(
    "flags",
    [
        {"with_isc": False},
        {"with_last_ca": False},
        {"with_x2z": False},
        {"with_z2x": False},
        {"with_dwc": False},
    ],
)
def test_ablation_flags_build_and_run(flags: dict[str, bool]) -> None:
    model, images = _tiny(**flags), _images(batch=2)
    exits = model.forward_exits(images)
    assert all(y.shape == (2, 5) for y in exits)
    assert all(torch.equal(a, b) for a, b in zip(exits, _run_stages(model, images), strict=True))
    assert torch.equal(model(images), exits[-1])
    assert [t.shape[1] for t in model.forward_intermediates(images, intermediates_only=True)] == [16, 32, 64, 64]


def test_exit_hooks_see_the_returned_logits() -> None:
    model = _tiny()
    seen: dict[str, torch.Tensor] = {}
    handles = [
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
        for name in model.exit_names
    ]
    out = model.forward_exits(_images())
    for h in handles:
        h.remove()
    assert model.exit_names == EXIT_NAMES
    assert all(torch.equal(seen[name], y) for name, y in zip(EXIT_NAMES, out, strict=True))


def test_gradients_reach_both_branches() -> None:
    model = _tiny().train()
    sum(y.sum() for y in model(_images(batch=2))).backward()  # training mode: every exit
    for name in ("latent", "cross_att1_x2z.cross_attn.attention.relative_position_bias", "cnn_stem.0.weight"):
        assert model.get_parameter(name).grad is not None, name


# --------------------------------------------------------------------------------- staged forward


def _run_stages(model: DynPerceiver, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    state = model.initial_state(images)
    for stage in model.forward_stages():
        state = stage(state)
    return state.logits


@torch.no_grad()
def test_staged_forward_equals_full_forward() -> None:
    model, images = _tiny(), _images()
    stages = model.forward_stages()
    assert [s.exit_name for s in stages] == list(EXIT_NAMES)
    assert all(torch.equal(a, b) for a, b in zip(model.forward_exits(images), _run_stages(model, images), strict=True))


@torch.no_grad()
@pytest.mark.parametrize("as_mask", [False, True])
def test_shrinking_between_stages_keeps_each_samples_outputs(as_mask: bool) -> None:
    model, images = _tiny(), _images(batch=6)
    full = model.forward_exits(images)
    rows = torch.arange(6)
    state = model.initial_state(images)
    keeps = [torch.tensor([1, 3, 4, 5]), torch.tensor([0, 2, 3]), torch.tensor([1, 2])]
    for k, stage in enumerate(model.forward_stages()):
        state = stage(state)
        for exit_k, y in enumerate(state.logits):  # every exit so far matches the full run on these rows
            torch.testing.assert_close(y, full[exit_k][rows], rtol=1e-5, atol=1e-6)
        if k < len(keeps):
            keep = keeps[k]
            if as_mask:
                keep = torch.zeros(state.batch_size, dtype=torch.bool).index_fill_(0, keep, True)
            state = model.shrink(state, keep)
            rows = rows[keeps[k]]
    assert rows.tolist() == [4, 5]


@torch.no_grad()
def test_shrink_indexes_every_batch_tensor() -> None:
    model = _tiny()
    stage1, stage2, *_ = model.forward_stages()
    state = stage2(stage1(model.initial_state(_images(batch=4))))
    small = model.shrink(state, torch.tensor([2]))
    assert isinstance(small, DynPerceiverState) and small.batch_size == 1
    assert torch.equal(small.x, state.x[2:3]) and torch.equal(small.z, state.z[2:3])
    assert len(small.logits) == 2 and all(
        torch.equal(a, b[2:3]) for a, b in zip(small.logits, state.logits, strict=True)
    )


# ---------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.randn(2, 3, 8, 8), r"at least 16x16.*got 8x8"),
        (torch.randn(2, 3, 64, 12), r"got 64x12"),
        (torch.randn(3, 32, 32), r"\[B, 3, H, W\].*\(3, 32, 32\)"),
        (torch.randn(2, 1, 32, 32), r"\(2, 1, 32, 32\)"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "float"),
    ],
)
def test_unusable_images_are_refused_clearly(images: torch.Tensor, match: str) -> None:
    with pytest.raises(EexitValueError, match=match):
        _tiny()(images)


def test_single_sample_in_training_mode_is_refused_clearly() -> None:
    with pytest.raises(EexitValueError, match="at least 2 samples"):
        _tiny().train()(_images(batch=1))
    assert _tiny()(_images(batch=1)).shape == (1, 5)  # eval mode is fine


# ---------------------------------------------------------------------------------------- checkpoints


@torch.no_grad()
@pytest.mark.parametrize("module_prefix", [False, True])
def test_official_checkpoint_round_trip(tmp_path, module_prefix: bool) -> None:
    trained, ema, images = _tiny(seed=1), _tiny(seed=2), _images()
    path = tmp_path / "checkpoint-best.pth"
    _save_official(path, trained, ema, module_prefix=module_prefix)

    loaded = load_official_dyn_perceiver_checkpoint(_tiny(seed=3), path)  # EMA by default
    assert all(torch.equal(a, b) for a, b in zip(loaded.forward_exits(images), ema.forward_exits(images), strict=True))
    loaded = load_official_dyn_perceiver_checkpoint(_tiny(seed=3), path, prefer_ema=False)
    got, expected = loaded.forward_exits(images), trained.forward_exits(images)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@torch.no_grad()
def test_safetensors_round_trip(tmp_path) -> None:
    model, images = _tiny(seed=1), _images()
    path = save_as_safetensors(model.state_dict(), tmp_path / "dyn_perceiver_tiny.safetensors")
    loaded = load_official_dyn_perceiver_checkpoint(_tiny(seed=3), path)
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.forward_exits(images), model.forward_exits(images), strict=True)
    )


def test_disallowed_pickled_type_is_refused(tmp_path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": _tiny().state_dict(), "args": NotAllowed()}, path)
    with pytest.raises(CheckpointError, match="NotAllowed"):
        load_official_dyn_perceiver_checkpoint(_tiny(), path)


def test_shape_mismatch_is_named_key_by_key(tmp_path) -> None:
    path = tmp_path / "seven_classes.pth"
    _save_official(path, _tiny(num_classes=7), _tiny(num_classes=7))
    with pytest.raises(CheckpointError) as err:
        load_official_dyn_perceiver_checkpoint(_tiny(), path)
    message = str(err.value)
    for key in (
        "early_classifier3.weight",
        "classifier_att.bias",
        "isc3.0.weight",
        "classifier_merge.1.weight",
    ):
        assert key in message
    assert "(5, 32)" in message and "(7, 32)" in message  # expected vs found shapes of early_classifier3


# ------------------------------------------------------------------------------------------ timm model API
# timm's own tests/test_models.py runs on every registered name (tests/test_timm_suite.py, slow); these are the
# fast checks of what it covers, on the tiny model (and on the meta device for the released trunks).

TAP_CHANNELS = [16, 32, 64, 64]  # dyn_perceiver_tiny: the CNN map after each stage
TAP_REDUCTIONS = [2, 4, 8, 16]
RELEASED_FEATURES = {  # channels, reductions of the four CNN maps
    "reg800m_perceiver_t128": ([64, 144, 320, 784], [4, 8, 16, 32]),
    "resnet50_0375_perceiver_t128": ([96, 192, 384, 768], [4, 8, 16, 32]),
    "mobilenetV3_0x75_perceiver_t128": ([32, 64, 120, 720], [8, 16, 32, 32]),  # stage 4 keeps stride 32
}
TIMM_NAMES = [*RELEASED_FEATURES, "mobilenetv3_0x75_perceiver_t128", "dyn_perceiver_tiny"]


@torch.no_grad()
def test_forward_features_and_head() -> None:
    model, images = _tiny(), _images()
    final_map, latent, y_att = model.forward_features(images)
    assert final_map.shape == (6, 64, 2, 2) and latent.shape == (6, 1, 64) and y_att.shape == (6, 5)
    assert torch.equal(y_att, model.forward_exits(images)[1])
    pre = model.forward_head([final_map, latent, y_att], pre_logits=True)
    assert pre.shape == (6, model.num_features) and model.num_features == model.head_hidden_size == 64 + 2 * 64
    assert torch.equal(model.classifier_merge[-1](pre), model(images))


@torch.no_grad()
def test_num_classes_zero_removes_only_the_final_linear() -> None:
    images = _images()
    full, headless = _tiny(seed=4), _tiny(seed=4, num_classes=0)
    assert headless.num_classes == 0 and isinstance(headless.get_classifier(), torch.nn.Identity)
    expected = full.forward_head(full.forward_features(images), pre_logits=True)
    assert torch.equal(headless(images), expected)  # the same weights but the final Linear
    assert [y.shape[1] for y in headless.forward_exits(images)[:3]] == [5, 5, 5]  # latent exits keep their classes
    full.reset_classifier(0)
    assert full.num_classes == 0 and torch.equal(full(images), expected)


def test_reset_classifier_rebuilds_every_exit_on_the_models_device_dtype_and_mode() -> None:
    model = _tiny().double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.reset_classifier(0)
    model.reset_classifier(3)
    assert model.num_classes == 3 and model.config.num_classes == 3
    assert [y.shape for y in model.forward_exits(_images(batch=2).double())] == [(2, 3)] * 4
    assert model.isc3[0].in_features == model.isc4[0].in_features == 3
    assert model.get_classifier() is model.classifier_merge[-1]
    new = ("early_classifier3", "classifier_att", "classifier_cnn", "isc3.0", "isc4.0", "classifier_merge.1")
    for name in new:
        module = model.get_submodule(name)
        assert not module.training and module.weight.dtype == torch.float64, name
    after = model.state_dict()
    kept = [k for k in before if not k.startswith(new)]
    assert kept and all(torch.equal(before[k], after[k]) for k in kept)  # nothing else is touched
    # MobileNet's CNN exit is an MLP: its last Linear is rebuilt; on the meta device, as timm builds it there
    mobile = timm.create_model("mobilenetV3_0x75_perceiver_t128", device="meta")
    mobile.reset_classifier(7)
    assert isinstance(mobile.classifier_cnn, torch.nn.Sequential) and mobile.classifier_cnn[-1].out_features == 7
    assert all(p.device.type == "meta" for p in mobile.parameters())


def test_headless_and_pruned_models_return_features_in_training_mode() -> None:
    x = torch.randn(2, 3, 32, 32)
    headless = _tiny()
    headless.reset_classifier(0)
    out = headless.train()(x)  # not the four exits: there is no final classifier to train
    assert isinstance(out, torch.Tensor) and out.shape == (2, headless.head_hidden_size)
    pruned = _tiny()
    pruned.prune_intermediate_layers([1])
    out = pruned.train()(x)
    assert isinstance(out, torch.Tensor) and out.ndim == 2
    frozen = _tiny().requires_grad_(False)
    frozen.reset_classifier(0)
    assert not any(p.requires_grad for p in frozen.parameters())


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_factory_arguments_and_default_cfgs(name: str) -> None:
    model = timm.create_model(name, device="meta", dtype=torch.float64).eval()
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.device.type == "meta" for t in tensors)
    assert all(t.dtype == torch.float64 for t in tensors if t.is_floating_point())
    cfg, keys = model.pretrained_cfg, model.state_dict().keys()
    assert f"{cfg['first_conv']}.weight" in keys and all(f"{c}.weight" in keys for c in cfg["classifier"])
    assert cfg["classifier"] == model._classifier_names()  # the registry's names are the model's own
    side, stride = cfg["input_size"][-1], model.feature_info[-1]["reduction"]
    assert cfg["pool_size"] == (side // stride, side // stride)
    assert (
        model.forward_features(torch.zeros(1, *cfg["input_size"], device="meta", dtype=torch.float64))[0].shape[-2:]
        == cfg["pool_size"]
    )
    own = DynPerceiver(model.config, device="meta").pretrained_cfg  # built without timm: the same facts
    assert {k: own[k] for k in ("input_size", "pool_size", "first_conv", "classifier", "num_classes")} == {
        k: cfg[k] for k in ("input_size", "pool_size", "first_conv", "classifier", "num_classes")
    }


@pytest.mark.parametrize("name", sorted(RELEASED_FEATURES))
def test_features_only_channels_and_reductions_of_the_released_trunks(name: str) -> None:
    channels, reductions = RELEASED_FEATURES[name]
    model = timm.create_model(name, features_only=True, device="meta")
    assert model.feature_info.channels() == channels and model.feature_info.reduction() == reductions
    outputs = model(torch.zeros(1, 3, 224, 224, device="meta"))
    assert [tuple(o.shape[1:]) for o in outputs] == [(c, 224 // r, 224 // r) for c, r in zip(channels, reductions)]


@torch.no_grad()
def test_features_only_returns_the_intermediates_and_prunes_the_rest() -> None:
    torch.manual_seed(0)
    features = timm.create_model("dyn_perceiver_tiny", features_only=True).eval()
    assert features.feature_info.channels() == TAP_CHANNELS and features.feature_info.reduction() == TAP_REDUCTIONS
    images = _images(size=48)
    outputs = features(images)
    assert [tuple(o.shape[1:]) for o in outputs] == [
        (c, 48 // r, 48 // r) for c, r in zip(TAP_CHANNELS, TAP_REDUCTIONS)
    ]
    torch.manual_seed(0)
    some = timm.create_model("dyn_perceiver_tiny", features_only=True, out_indices=(0, 2)).eval()
    assert some.feature_info.channels() == [16, 64]
    assert all(torch.equal(a, b) for a, b in zip(some(images), (outputs[0], outputs[2]), strict=True))
    keys = some.state_dict().keys()  # what the features do not need is gone: stage 4, the exits
    assert not any(k.startswith(("model.self_att4.", "model.classifier_", "model.isc", "model.early_")) for k in keys)


@torch.no_grad()
def test_forward_intermediates_indices_stop_early_and_formats() -> None:
    model, images = _tiny(), _images()
    final, maps = model.forward_intermediates(images)
    assert [m.shape[1] for m in maps] == TAP_CHANNELS and [32 // m.shape[-1] for m in maps] == TAP_REDUCTIONS
    assert all(torch.equal(a, b) for a, b in zip(final, model.forward_features(images), strict=True))
    assert torch.equal(maps[-1], final[0])  # the last map is the final one the merged head pools
    last_two = model.forward_intermediates(images, indices=2, intermediates_only=True)
    picked = model.forward_intermediates(images, indices=[0, -1], intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(last_two, maps[2:], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(picked, (maps[0], maps[3]), strict=True))
    partial, early = model.forward_intermediates(images, indices=[1], stop_early=True)
    assert torch.equal(early[0], maps[1]) and len(partial) == 2 and torch.equal(partial[0], maps[1])
    nhwc = model.forward_intermediates(images, indices=[0], output_fmt="NHWC", intermediates_only=True)
    assert torch.equal(nhwc[0], maps[0].permute(0, 2, 3, 1))


def test_pruned_model_keeps_its_taps_and_uses_every_parameter() -> None:
    model, images = _tiny(), _images(batch=2)
    with torch.no_grad():
        taps = model.forward_intermediates(images, intermediates_only=True)
    assert model.prune_intermediate_layers([1]) == [1]
    assert model.self_att3 is None and model.cnn_body_stage3 is None and model.classifier_merge is None
    assert len(model.feature_info) == 2 and model.num_classes == 0
    with torch.no_grad():
        assert torch.equal(model.forward_intermediates(images, indices=[1], intermediates_only=True)[0], taps[1])
        tap, _latent = model.forward_features(images)
        assert torch.equal(tap, taps[1])
        assert model(images).shape == (2, model.num_features) == (2, 32 + 32)  # pooled map and mean latent
    model.train()
    sum(f.sum() for f in model.forward_features(images)).backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(EexitValueError, match="pruned"):
        model.forward_exits(images)
    with pytest.raises(EexitValueError, match=r"timm\.create_model"):
        model.reset_classifier(3)
    full = _tiny()
    full.prune_intermediate_layers([3], prune_head=False)  # at the last map, without the head: nothing changes
    assert full.classifier_merge is not None and len(full.feature_info) == 4


@torch.no_grad()
@pytest.mark.filterwarnings("ignore:The nodes obtained by tracing the model in train mode")  # expected: 4 exits
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # timm's suite scripts too
def test_scripted_and_fx_traced_models_equal_eager() -> None:
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model, images = _tiny(), _images()
    expected = model(images)
    with timm.layers.set_layer_config(scriptable=True):
        scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(images), expected, rtol=1e-5, atol=1e-6)

    tracer = {"leaf_modules": get_notrace_modules(), "autowrap_functions": get_notrace_functions()}
    _, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer)
    traced = create_feature_extractor(model, return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer)
    (got,) = traced(images).values()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"not_a_model_arg": 1}, EexitTypeError, r"unexpected keyword argument\(s\) 'not_a_model_arg'.*Valid options"),
        ({"in_chans": 1}, EexitValueError, "in_chans=3"),
        ({"global_pool": ""}, EexitValueError, "global_pool='avg'"),
        ({"num_classes": -1}, EexitValueError, "non-negative"),
        (
            {"features_only": True, "out_indices": (4,)},
            EexitValueError,
            r"index 4 is out of range \(0 to 3\).*between -4 and 3",
        ),
        ({"features_only": True, "out_indices": 5}, EexitValueError, r"last-n \(5\) is out of range \(1 to 4\)"),
        ({"features_only": True, "feature_cls": "hook"}, EexitValueError, "feature_cls='getter'"),
    ],
)
def test_bad_factory_arguments_are_refused_clearly(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        timm.create_model("dyn_perceiver_tiny", **kwargs)


def test_bad_intermediate_requests_are_refused_clearly() -> None:
    model = _tiny()
    with pytest.raises(EexitValueError, match="out of range"):
        model.forward_intermediates(_images(), indices=[7])
    with pytest.raises(EexitValueError, match="NCHW"):
        model.forward_intermediates(_images(), output_fmt="NLC")
    with pytest.raises(EexitValueError, match="at least 16x16"):
        model.forward_features(torch.randn(1, 3, 8, 8))
