"""T2T-ViT (Yuan et al., ICCV 2021) as a timm architecture, and the safe checkpoint loader it shares.

No released weights can be downloaded here, so the tests check the fingerprints of the released
architecture (parameter and state-dict key counts, MACs), shapes, the timm conventions, and loading through
files the tests write in the official layouts (timm training checkpoint, JEI-DNN's ``net`` checkpoint).
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from eexit.errors import EexitValueError
from eexit.models._checkpoint import CheckpointError, load_checkpoint_file, load_into, save_as_safetensors
from eexit.models.t2t_vit import T2TViT, load_official_t2t_checkpoint

VARIANTS = ["t2t_vit_7", "t2t_vit_10", "t2t_vit_12", "t2t_vit_14", "t2t_vit_19", "t2t_vit_24"]


class NotAllowed:
    """A picklable type that is not on the loader's allow-list (it stands for any foreign object)."""

    def __init__(self) -> None:
        self.payload = "anything"


def tiny(seed: int = 0, **kwargs) -> T2TViT:
    torch.manual_seed(seed)
    return timm.create_model("t2t_vit_tiny", **kwargs).eval()


def n_params(model: nn.Module, trainable_only: bool = False) -> int:
    """The release's count: every state-dict tensor (the fixed pos_embed and performer matrices are buffers
    here, Parameters there), or only what trains."""
    if trainable_only:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    return sum(t.numel() for t in model.state_dict().values())


def macs(model: nn.Module, img: int) -> float:
    """MACs of one image; attention in explicit form, since FlopCounterMode skips the fused CPU kernel."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, img, img))
    return counter.get_total_flops() / 2


def write_official(path: Path, ema: dict, plain: dict) -> None:
    """The layout of the released ``*.pth.tar`` files (timm train.py, DataParallel keys)."""
    torch.save(
        {
            "epoch": 309,
            "arch": "t2t_vit_tiny",
            "state_dict": {f"module.{k}": v for k, v in plain.items()},
            "state_dict_ema": {f"module.{k}": v for k, v in ema.items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]},
            "args": argparse.Namespace(model="t2t_vit_tiny", lr=1e-3, img_size=32, amp=True, mean=None),
            "metric": 71.7,
        },
        path,
    )


def perturbed(state_dict: dict, scale: float = 0.5) -> dict:
    g = torch.Generator().manual_seed(123)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state_dict.items()}


# -- architecture fingerprints ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "total", "trainable", "keys"),
    [("t2t_vit_7", 4_310_222, 4_255_694, 111), ("t2t_vit_14", 21_545_550, 21_465_806, 188)],
)
def test_parameter_and_key_counts_match_the_release(name, total, trainable, keys):
    model = timm.create_model(name)
    assert n_params(model) == total
    assert n_params(model, trainable_only=True) == trainable
    assert len(model.state_dict()) == keys


@pytest.mark.parametrize(("name", "millions"), [("t2t_vit_10", 5.9), ("t2t_vit_12", 6.9)])
def test_lite_variants_match_readme_sizes(name, millions):
    assert round(n_params(timm.create_model(name)) / 1e6, 1) == millions


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "millions", "gmacs"),
    [("t2t_vit_19", 39.2, 8.48), ("t2t_vit_24", 64.1, 13.66)],
)
def test_large_variants_sizes_and_macs(name, millions, gmacs):
    model = timm.create_model(name).eval()
    assert round(n_params(model) / 1e6, 1) == millions  # README: 39.2M, 64.1M
    assert macs(model, 224) / 1e9 == pytest.approx(gmacs, abs=0.01)


def test_macs_match_the_measured_fingerprints():
    at_32 = timm.create_model("t2t_vit_7", num_classes=10, img_size=32).eval()  # JEI-DNN's SVHN setting
    assert macs(at_32, 32) / 1e6 == pytest.approx(24.2, abs=0.05)
    assert macs(timm.create_model("t2t_vit_7").eval(), 224) / 1e9 == pytest.approx(1.147, abs=0.001)


@pytest.mark.slow
def test_t2t_vit_14_macs():
    assert macs(timm.create_model("t2t_vit_14").eval(), 224) / 1e9 == pytest.approx(4.783, abs=0.001)


def test_released_structure_details():
    model = tiny()
    perf = model.tokens_to_token.attention1
    assert isinstance(model.blocks, nn.Sequential) and len(model.blocks) == 3
    # Fixed tensors are persistent buffers under the released names: in the state dict, not in parameters()
    assert not model.pos_embed.requires_grad and not perf.w.requires_grad
    buffers = dict(model.named_buffers())
    assert "pos_embed" in buffers and "tokens_to_token.attention1.w" in buffers
    assert "pos_embed" in model.state_dict() and "tokens_to_token.attention2.w" in model.state_dict()
    assert all(p.requires_grad for p in model.parameters())
    assert perf.w.shape == (8, 16)  # m = token_dim / 2 random features (32 x 64 in the released sizes)
    # orthogonal rows scaled by sqrt(m)
    assert torch.allclose(perf.w @ perf.w.T, 8 * torch.eye(8), atol=1e-4)
    assert perf.dp.p == 0.1 and perf.mlp[3].p == 0.1  # dropouts hard-coded as released
    attn = model.blocks[0].attn
    assert attn.qkv.bias is None and attn.scale == pytest.approx(16**-0.5)
    assert timm.create_model("t2t_vit_7").blocks[0].attn.scale == pytest.approx(64**-0.5)  # not D^-0.5


def test_pos_embed_is_the_sinusoid_table():
    pe = tiny().pos_embed[0]  # [5, 32]
    pos, j = 3, 10
    angle = pos / 10000 ** (2 * (j // 2) / 32)
    assert pe[pos, j].item() == pytest.approx(math.sin(angle), abs=1e-6)
    assert pe[pos, j + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


# -- forward and timm conventions -----------------------------------------------------------------------


def test_forward_shapes_on_tiny():
    model = tiny(num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 1 + (32 // 16) ** 2, 32)
    assert model(x).shape == (2, 7)
    pooled = model.forward_head(tokens, pre_logits=True)
    assert torch.equal(pooled, tokens[:, 0])
    assert torch.allclose(model.forward_head(tokens), model.head(pooled))


def test_token_count_follows_image_size():
    model = tiny(img_size=64)
    assert model.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 1 + 4**2, 32)


def test_avg_pool_and_headless():
    model = tiny(num_classes=0, global_pool="avg")
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model(x), model.forward_features(x)[:, 1:].mean(1))
    model.reset_classifier(4, global_pool="token")
    assert model.num_classes == 4 and model(x).shape == (2, 4)


def test_fused_and_explicit_attention_agree():
    model = tiny()
    x = torch.randn(2, 3, 32, 32)
    fused = model(x)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    assert torch.allclose(fused, model(x), atol=1e-5)


def test_timm_registration():
    assert set(VARIANTS) | {"t2t_vit_tiny"} <= set(timm.list_models("t2t_vit*"))
    model = timm.create_model("t2t_vit_7", num_classes=10, img_size=32)
    assert isinstance(model, T2TViT)
    assert (model.num_classes, model.img_size, model.num_prefix_tokens) == (10, 32, 1)
    assert model.global_pool == "token"
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == "t2t_vit_7" and not cfg.get("url") and not cfg.get("hf_hub_id")
    assert tiny().img_size == 32  # the tiny config's default input size
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        timm.create_model("t2t_vit_7", pretrained=True)


# -- bad image sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("img_size", "words"),
    [(40, ["multiple of 16", "40", "32 or 48"]), ((32, 48), ["square"])],
)
def test_impossible_image_size_is_refused(img_size, words):
    with pytest.raises(EexitValueError) as err:
        timm.create_model("t2t_vit_tiny", img_size=img_size)
    assert all(w in str(err.value) for w in words)
    assert isinstance(err.value, ValueError)


def test_wrong_input_size_is_refused():
    with pytest.raises(EexitValueError, match=r"\[B, 3, 32, 32\].*\(2, 3, 48, 48\).*img_size"):
        tiny()(torch.randn(2, 3, 48, 48))


# -- checkpoints ------------------------------------------------------------------------------------------


def test_official_checkpoint_round_trip(tmp_path):
    source, target = tiny(seed=0), tiny(seed=1)
    x = torch.randn(2, 3, 32, 32)
    ema = source.state_dict()
    plain = perturbed(ema)
    path = tmp_path / "71.7_T2T_ViT_tiny.pth.tar"
    write_official(path, ema, plain)
    assert not torch.equal(source.tokens_to_token.attention1.w, target.tokens_to_token.attention1.w)

    result = load_official_t2t_checkpoint(target, path)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(target(x), source(x))  # EMA weights, performer w included
    load_official_t2t_checkpoint(target, path, prefer_ema=False)
    assert torch.equal(target.blocks[0].attn.qkv.weight, plain["blocks.0.attn.qkv.weight"])


def test_head_is_dropped_when_class_count_differs(tmp_path):
    source = tiny(seed=0)
    path = tmp_path / "ckpt.pth.tar"
    write_official(path, source.state_dict(), source.state_dict())
    target = tiny(seed=1, num_classes=7)
    fresh_head = target.head.weight.clone()
    load_official_t2t_checkpoint(target, path)
    assert torch.equal(target.head.weight, fresh_head)
    assert torch.equal(target.norm.weight, source.norm.weight)
    assert torch.equal(target.tokens_to_token.project.weight, source.tokens_to_token.project.weight)


def test_pos_embed_is_resized_keeping_the_cls_row(tmp_path):
    source = tiny(seed=0, img_size=64)
    path = tmp_path / "ckpt.pth.tar"
    write_official(path, source.state_dict(), source.state_dict())
    target = tiny(seed=1, img_size=32)
    load_official_t2t_checkpoint(target, path)
    old = source.pos_embed  # [1, 17, 32]
    grid = old[0, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(2, 2), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 4, 32)
    assert target.pos_embed.shape == (1, 5, 32)
    assert torch.equal(target.pos_embed[:, :1], old[:, :1])
    assert torch.allclose(target.pos_embed[:, 1:], expected)


def test_jei_dnn_net_checkpoint_loads(tmp_path):
    source, target = tiny(seed=0), tiny(seed=1)
    net = {f"module.{k}": v for k, v in source.state_dict().items()}
    net["module.intermediate_heads.0.weight"] = torch.zeros(1000, 32)
    net["module.gates.0.linear.weight"] = torch.zeros(1, 4)
    path = tmp_path / "dynn.pth"
    torch.save({"net": net, "acc": 91.5, "epoch": 3}, path)
    with pytest.warns(UserWarning, match="intermediate_heads"):
        load_official_t2t_checkpoint(target, path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(target(x), source(x))


def test_disallowed_pickled_type_is_refused(tmp_path):
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": tiny().state_dict(), "args": NotAllowed()}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_file(path)
    message = str(err.value)
    assert "NotAllowed" in message and "arbitrary code" in message and "allow-list" in message


def test_safetensors_round_trip_and_timm_file_loading(tmp_path):
    source = tiny(seed=0)
    path = save_as_safetensors(source.state_dict(), tmp_path / "t2t_tiny.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["t2t_tiny.safetensors"]  # no temp file left behind
    loaded = load_checkpoint_file(path)
    assert loaded.keys() == source.state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    via_timm = timm.create_model("t2t_vit_tiny", pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    assert torch.equal(via_timm.eval()(x), source(x))


def test_official_file_through_timm_create_model(tmp_path):
    source = tiny(seed=0)
    path = tmp_path / "71.7_T2T_ViT_tiny.pth.tar"
    write_official(path, source.state_dict(), perturbed(source.state_dict()))
    model = timm.create_model(
        "t2t_vit_tiny", pretrained=True, pretrained_cfg_overlay={"file": str(path)}, num_classes=7
    ).eval()
    assert model.head.out_features == 7
    assert torch.equal(
        model.forward_features(torch.ones(1, 3, 32, 32)), source.forward_features(torch.ones(1, 3, 32, 32))
    )


def test_unwrapping_and_prefix_stripping(tmp_path):
    weights = {"a": torch.ones(2), "b": torch.zeros(3)}
    for i, wrapped in enumerate(
        [weights, {"model": weights, "epoch": 1}, {"module.a": weights["a"], "module.b": weights["b"]}]
    ):
        torch.save(wrapped, tmp_path / f"{i}.pt")
        assert load_checkpoint_file(tmp_path / f"{i}.pt").keys() == {"a", "b"}
    torch.save({"epoch": 1, "acc": 0.5}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="no state dict"):
        load_checkpoint_file(tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="No checkpoint file"):
        load_checkpoint_file(tmp_path / "missing.pth")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(CheckpointError, match="suffix"):
        load_checkpoint_file(tmp_path / "w.npz")


def test_shape_mismatch_names_the_key_and_both_shapes():
    model = tiny()
    state = model.state_dict()
    state["blocks.1.attn.qkv.weight"] = torch.zeros(5, 5)
    state["head.bias"] = torch.zeros(3)
    del state["norm.weight"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_into(model, state)
    message = str(err.value)
    assert "blocks.1.attn.qkv.weight: model expects (96, 32), checkpoint has (5, 5)" in message
    assert "head.bias: model expects (1000,), checkpoint has (3,)" in message
    assert "missing key(s): norm.weight" in message and "unexpected key(s): extra.weight" in message


def test_load_into_non_strict_returns_the_key_lists():
    model = tiny()
    state = model.state_dict()
    del state["norm.weight"]
    state["extra.weight"] = torch.zeros(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = load_into(model, state, strict=False)
    assert result.missing_keys == ["norm.weight"] and result.unexpected_keys == ["extra.weight"]


def test_wrong_variant_checkpoint_fails_loudly(tmp_path):
    path = tmp_path / "ckpt.pth.tar"
    small = tiny()
    write_official(path, small.state_dict(), small.state_dict())
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_official_t2t_checkpoint(tiny(embed_dim=64, num_heads=2), path)


# -- timm's model contract (timm's own test file runs in tests/test_timm_suite.py; these pin the details) --


def test_forward_intermediates_follow_timm_vit_signature():
    model = tiny()
    x = torch.randn(2, 3, 32, 32)
    final, maps = model.forward_intermediates(x)
    assert torch.allclose(final, model.forward_features(x), atol=1e-6)
    assert len(maps) == 3 and all(m.shape == (2, 32, 2, 2) for m in maps)
    # NCHW maps are the patch tokens in row-major order; NLC keeps them as tokens
    tokens = model.forward_intermediates(x, indices=[1], output_fmt="NLC", intermediates_only=True)
    assert tokens[0].shape == (2, 4, 32)
    assert torch.equal(maps[1].flatten(2).transpose(1, 2), tokens[0])
    # the last block's output through the final norm is forward_features without the CLS token
    (normed,) = model.forward_intermediates(x, indices=1, norm=True, output_fmt="NLC", intermediates_only=True)
    assert torch.allclose(normed, final[:, 1:], atol=1e-6)
    # stop_early gives the same taps; prefix tokens come back paired with the maps
    early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
    assert torch.allclose(early[0], maps[0], atol=1e-6)
    (pair,) = model.forward_intermediates(x, indices=[-1], return_prefix_tokens=True, intermediates_only=True)
    assert pair[0].shape == (2, 32, 2, 2) and pair[1].shape == (2, 1, 32)


def test_features_only_gives_the_block_maps():
    features = timm.create_model("t2t_vit_tiny", features_only=True, out_indices=(0, 2)).eval()
    assert features.feature_info.channels() == [32, 32] and features.feature_info.reduction() == [16, 16]
    torch.manual_seed(0)
    full = timm.create_model("t2t_vit_tiny").eval()
    # the getter wraps the pruned model: its blocks 0-2 and tokens-to-token take the full model's weights
    missing, _ = features.model.load_state_dict(full.state_dict(), strict=False)
    assert not missing
    x = torch.randn(1, 3, 32, 32)
    outs = features(x)
    expected = full.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
    assert [o.shape for o in outs] == [(1, 32, 2, 2)] * 2
    assert all(torch.allclose(o, e, atol=1e-6) for o, e in zip(outs, expected))


@pytest.mark.parametrize("out_indices", [(0, 3), (-4,), 4])
def test_out_of_range_out_indices_name_the_blocks(out_indices):
    with pytest.raises(EexitValueError, match=r"out of range.*has 3 blocks"):
        timm.create_model("t2t_vit_tiny", features_only=True, out_indices=out_indices)


def test_unknown_option_and_output_format_are_refused():
    with pytest.raises(TypeError, match="not_an_option"):
        timm.create_model("t2t_vit_tiny", not_an_option=1)
    with pytest.raises(EexitValueError, match="NCHW or NLC"):
        tiny().forward_intermediates(torch.randn(1, 3, 32, 32), output_fmt="NHWC")


def test_prune_intermediate_layers_keeps_the_taps():
    model = tiny()
    x = torch.randn(1, 3, 32, 32)
    taps = model.forward_intermediates(x, intermediates_only=True)
    assert model.prune_intermediate_layers([1]) == [1]
    assert len(model.blocks) == 2 and isinstance(model.head, nn.Identity) and model.num_classes == 0
    (tap,) = model.forward_intermediates(x, indices=[1], intermediates_only=True)
    assert torch.allclose(tap, taps[1], atol=1e-6)


def test_reset_classifier_keeps_device_dtype_and_mode():
    model = tiny().double()
    model.reset_classifier(7)
    assert model.head.weight.dtype == torch.float64 and not model.head.training
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).shape == (1, 7)
    model.reset_classifier(0, "avg")
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).shape == (1, 32)


def test_meta_device_and_dtype_factory_arguments():
    model = timm.create_model("t2t_vit_tiny", device="meta", dtype=torch.bfloat16)
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.device.type == "meta" and t.dtype == torch.bfloat16 for t in tensors)


def test_every_parameter_gets_a_gradient():
    model = timm.create_model("t2t_vit_tiny").train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_torchscript_and_fx_match_eager():
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model = tiny()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
        with timm.layers.set_layer_config(scriptable=True):
            scripted = torch.jit.script(model)
        assert torch.allclose(scripted(x), eager, atol=1e-5)
        kwargs = {"leaf_modules": get_notrace_modules(), "autowrap_functions": get_notrace_functions()}
        _, nodes = get_graph_node_names(model, tracer_kwargs=kwargs)
        fx = create_feature_extractor(model, return_nodes=[nodes[-1]], tracer_kwargs=kwargs)
        assert torch.allclose(next(iter(fx(x).values())), eager, atol=1e-5)


def test_performer_kernel_stays_float32_under_autocast():
    from eexit.models._t2t_layers import performer_kernel

    torch.manual_seed(0)
    k, q, v = (torch.randn(2, 5, 16) for _ in range(3))
    w = torch.randn(8, 16)
    exact = performer_kernel(k, q, v, w, 1e-8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = performer_kernel(k, q, v, w, 1e-8)
    assert under_autocast.dtype == torch.float32
    assert torch.allclose(under_autocast, exact, rtol=1e-6, atol=1e-6)  # bf16 einsums would be ~1e-2 off
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(tiny()(torch.randn(2, 3, 32, 32))).all()
