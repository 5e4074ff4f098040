"""Backbone specs beyond the conformance matrix: refusals, per-family details, the registry's catch-alls."""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from backbone_zoo import CLASSES, IMG, ZOO
from torch import nn

import eexit
from eexit.backbones import base
from eexit.backbones.base import BackboneSpec, find_spec
from eexit.cost import flop_counter
from eexit.errors import BackboneError


def _state(model: nn.Module) -> tuple:
    return [p.requires_grad for p in model.parameters()], [m.training for m in model.modules()]


def _hf(model_class: str, config_class: str, **kwargs) -> nn.Module:
    import transformers

    return getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs))


# ------------------------------------------------------------------------------------------------- refusals
REFUSED = {
    "timm_convnext": (
        lambda: timm.create_model("convnext_atto", pretrained=False, dims=(8, 16, 32, 64), num_classes=CLASSES),
        "convolutional network",
    ),
    "hf_convnext": (
        lambda: _hf(
            "ConvNextForImageClassification",
            "ConvNextConfig",
            hidden_sizes=[8, 16],
            depths=[1, 1],
            num_stages=2,
            num_labels=CLASSES,
        ),
        "convolutional network",
    ),
    "timm_tnt": (
        lambda: timm.create_model("tnt_s_patch16_224", pretrained=False, img_size=IMG, depth=2, num_classes=CLASSES),
        "batch is not on dim 0",
    ),
    "timm_cait": (
        lambda: timm.create_model(
            "cait_xxs24_224", pretrained=False, img_size=IMG, embed_dim=32, depth=2, num_heads=2, num_classes=CLASSES
        ),
        "class-attention blocks",
    ),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_families_are_refused_with_the_reason(name):
    make, reason = REFUSED[name]
    model = make().train()
    before = _state(model)
    assert find_spec(model).name == "unsupported"
    with pytest.raises(BackboneError, match=reason) as err:
        eexit.attach(model)
    assert "eexit does not support" in str(err.value) and "timm_vit" in str(err.value)
    assert _state(model) == before


def test_hierarchical_transformers_model_is_refused_by_discovery():
    model = _hf(
        "PvtForImageClassification",
        "PvtConfig",
        image_size=IMG,
        num_encoder_blocks=2,
        depths=[1, 1],
        sequence_reduction_ratios=[2, 1],
        hidden_sizes=[16, 32],
        patch_sizes=[4, 2],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        num_labels=CLASSES,
    ).train()
    before = _state(model)
    assert find_spec(model).name == "hf_auto"
    with pytest.raises(BackboneError, match=r"hierarchical|no ModuleList"):
        eexit.attach(model)
    assert _state(model) == before


def test_block_without_batch_on_dim_0_fails_at_attach_and_restores():
    class SeqFirst(nn.Module):  # nn.TransformerEncoderLayer without batch_first: tokens are [N, B, D]
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 16, 8, 8)
            self.layers = nn.ModuleList(nn.TransformerEncoderLayer(16, 2, 32) for _ in range(2))
            self.norm = nn.LayerNorm(16)
            self.fc = nn.Linear(16, CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.embed(x).flatten(2).permute(2, 0, 1)  # [N, B, D]
            for layer in self.layers:
                x = layer(x)
            return self.fc(self.norm(x).mean(0))

    model = SeqFirst().train()
    before = _state(model)
    spec = eexit.GenericSpec("layers", pool="mean", norm="norm", num_prefix_tokens=0, num_classes=CLASSES)
    with pytest.raises(BackboneError, match="keep the batch on dim 0"):
        eexit.attach(model, spec=spec, input_size=(3, IMG, IMG))
    assert _state(model) == before


# --------------------------------------------------------------------------------------- registry catch-alls
def test_catch_alls_defer_to_specs_registered_later(monkeypatch):
    model = REFUSED["timm_convnext"][0]()

    class ConvNeXtSpec(BackboneSpec):
        name = "my_convnext"

        def matches(self, model: nn.Module) -> bool:
            return type(model).__name__ == "ConvNeXt"

    monkeypatch.setitem(base._REGISTRY, "my_convnext", ConvNeXtSpec())
    assert find_spec(model).name == "my_convnext"


def test_a_users_spec_is_asked_before_the_built_in_ones(monkeypatch):
    # The built-in specs register when eexit.backbones is imported; a user's spec registered afterwards for a
    # model a built-in spec also describes must still win (it did when built-ins loaded lazily).
    model = ZOO["timm_vit_cls"].build()
    assert find_spec(model).name == "timm_vit"

    class MyViTSpec(type(base.get_spec("timm_vit"))):
        name = "my_vit"

    monkeypatch.setitem(base._REGISTRY, "my_vit", MyViTSpec())
    assert find_spec(model).name == "my_vit"
    assert base.get_spec("timm_vit").matches(model)  # the built-in one still describes it


def test_family_specs_win_over_discovery():
    for name in ("hf_vit_cls", "hf_beit_cls", "hf_dinov2_cls", "hf_swin_cls"):
        entry = ZOO[name]
        assert find_spec(entry.build()).name == entry.spec


def test_matching_imports_neither_timm_nor_transformers():
    code = (
        "import sys, torch, eexit\n"
        "from eexit.backbones.base import find_spec\n"
        "try:\n    find_spec(torch.nn.Sequential(torch.nn.Linear(2, 2)))\nexcept Exception:\n    pass\n"
        "print(sorted({'timm', 'transformers'} & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------------ Swin
def _module_flops(counter, suffix: str) -> int:
    return sum(sum(v.values()) for k, v in counter.get_flop_counts().items() if k.endswith(suffix))


@pytest.mark.parametrize(
    ("name", "downsample", "first_block"),
    [
        ("timm_swin", "layers.1.downsample", "layers.1.blocks.0"),
        ("hf_swin_cls", "encoder.layers.0.downsample", "encoder.layers.1.blocks.0"),
    ],
)
def test_swin_downsampling_is_in_the_next_exits_cost(name, downsample, first_block):
    entry = ZOO[name]
    ee = eexit.attach(entry.build(), **entry.attach)
    with flop_counter() as counter, torch.no_grad():
        ee.spec.call(ee.backbone, torch.zeros(1, 3, IMG, IMG))
    merge, block = _module_flops(counter, downsample), _module_flops(counter, first_block)
    assert merge > 0
    head, gate = 2 * 32 * CLASSES, 2 * len(ee.gates[0].features)  # the stage-1 IM (width 32) and its gate
    flops = ee.cost_table.exit_flops  # exits after blocks 0, 1 (stage 0), 2 (stage 1), then the head
    assert flops[2] - flops[1] == pytest.approx(merge + block + head + gate, abs=0.5)
    assert [h.width for h in ee.heads] == [16, 16, 32]


def test_swin_pools_earlier_stages_without_the_final_norm():
    model = ZOO["timm_swin"].build().eval()
    spec = find_spec(model)
    hidden = torch.randn(2, 8, 8, 16)  # a stage-0 block output, NHWC
    expected = F.layer_norm(hidden, (16,), eps=model.norm.eps).mean(dim=(1, 2))
    assert torch.allclose(spec.pool_at(model, hidden, 1), expected, atol=1e-6)
    last = torch.randn(2, 4, 4, 32)
    assert torch.allclose(spec.pool_at(model, last, 3), model.forward_head(model.norm(last), pre_logits=True))


# ----------------------------------------------------------------------------------------- transformers heads
def test_hf_dinov2_headless_reads_the_pooler_output():
    model = ZOO["hf_dinov2_model"].build().eval()
    ee = eexit.attach(model, num_classes=CLASSES, exit_blocks=(3,))
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        features, _ = ee.exit_features(x)
        assert torch.allclose(features[0], model(pixel_values=x).pooler_output, atol=1e-6)


def test_hf_auto_probe_leaves_the_model_as_it_was():
    model = ZOO["hf_auto_ijepa"].build()
    with torch.no_grad():
        model(pixel_values=torch.zeros(1, 3, IMG, IMG))  # transformers installs its own lazy hooks on a first call
    model.train()
    before, hooks = _state(model), sum(len(m._forward_hooks) for m in model.modules())
    find_spec(model).blocks(model)  # discovers the layout: one probe forward
    assert _state(model) == before
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks


# ------------------------------------------------------------------------------------------- known problems
def test_cost_of_torch_fast_path_layers_is_counted():
    # torch's fused eval fast path has no FLOP formula; eexit's counter switches it off while counting
    before = torch.backends.mha.get_fastpath_enabled()
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    x = torch.zeros(1, 5, 16)
    with flop_counter() as counted:
        layer(x)  # grad enabled: the plain path, every matmul counted
    with flop_counter() as fast, torch.no_grad():
        layer(x)
    assert fast.get_total_flops() == counted.get_total_flops() > 0
    assert torch.backends.mha.get_fastpath_enabled() == before
