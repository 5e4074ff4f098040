"""Tiny backbones of every backbone spec, built from configs (no downloads), for the conformance matrix.

Each entry builds a fresh, randomly initialised model at 32 px with a tiny width and depth, and says which spec
must match it. ``build`` seeds torch first, so two builds of one entry have the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from torch import nn

import eexit
from eexit.gates import ExitHistory, gate_statistics

IMG, CLASSES = 32, 5
_VIT = dict(img_size=IMG, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=CLASSES)
_SWIN = dict(img_size=IMG, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4)
_HF = dict(image_size=IMG, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2)
_HF_SWIN = dict(
    image_size=IMG, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4, num_labels=CLASSES
)


@dataclass(frozen=True)
class Entry:
    """One tiny backbone: how to build it, the spec that must describe it, and extra ``attach`` arguments."""

    make: Callable[[], nn.Module]
    spec: str
    attach: dict[str, Any] = field(default_factory=dict)
    #: the model computes something once per forward, whatever the batch (Swin V2's position-bias MLP): the
    #: cost table charges it to every sample, as a sample alone pays it, so a batch pays less than the sum
    shared_flops: bool = False

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.make()


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, **kwargs)


def _hf(model_class: str, config_class: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import transformers

        config = getattr(transformers, config_class)(**kwargs)
        return getattr(transformers, model_class)(config)

    return make


def _t2t() -> nn.Module:
    import eexit.models.t2t_vit  # noqa: F401  (registers t2t_vit_* with timm)

    model = timm.create_model("t2t_vit_tiny", pretrained=False, num_classes=CLASSES)
    # As released, every Linear starts at std 0.02, so at this size the fixed sinusoidal position table swamps the
    # image and the CLS token hardly depends on it; PyTorch's default init gives exits something to tell apart.
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()
    return model


def _dyn_perceiver() -> nn.Module:
    import eexit.models.dynamic_perceiver  # noqa: F401  (registers dyn_perceiver_* with timm)

    model = timm.create_model("dyn_perceiver_tiny", num_classes=CLASSES)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that eval-mode BatchNorm matters
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return model


def _clip() -> nn.Module:
    from transformers import CLIPConfig, CLIPForImageClassification

    vision = dict(_HF, intermediate_size=64, projection_dim=16)
    text = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=64)
    text.update(bos_token_id=0, eos_token_id=1, pad_token_id=1)  # inside the tiny vocabulary
    return CLIPForImageClassification(CLIPConfig(vision_config=vision, text_config=text, num_labels=CLASSES))


class TinyBlock(nn.Module):
    """A pre-norm transformer block written out (``nn.TransformerEncoderLayer`` takes a fused fast path in eval
    mode whose FLOPs torch's counter cannot see; see tests/test_backbones.py)."""

    def __init__(self, width: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(self.norm1(x)).view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, h, N, d]
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, tokens, width))
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """A hand-written token transformer only :class:`eexit.GenericSpec` can describe."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 8, 8)
        self.layers = nn.ModuleList(TinyBlock() for _ in range(3))
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        for layer in self.layers:
            x = layer(x)
        return self.fc(self.norm(x).mean(1))


_GENERIC = eexit.GenericSpec("layers", pool="mean", norm="norm", num_prefix_tokens=0, num_classes=CLASSES)
_HEADLESS = {"num_classes": CLASSES}
_HF_MLP = dict(intermediate_size=64, num_labels=CLASSES)

ZOO: dict[str, Entry] = {
    # timm VisionTransformer family: ViT, DeiT, distilled DeiT, DeiT-III, register tokens, pooling kinds
    "timm_vit_cls": Entry(_timm("vit_tiny_patch16_224", **_VIT), "timm_vit"),
    "timm_vit_avg": Entry(
        _timm("vit_tiny_patch16_224", **_VIT, global_pool="avg", class_token=False, fc_norm=True), "timm_vit"
    ),
    "timm_vit_reg": Entry(_timm("vit_tiny_patch16_224", **_VIT, reg_tokens=2), "timm_vit"),
    "timm_vit_map": Entry(_timm("vit_tiny_patch16_224", **_VIT, global_pool="map"), "timm_vit"),
    "timm_vit_headless": Entry(_timm("vit_tiny_patch16_224", **dict(_VIT, num_classes=0)), "timm_vit", _HEADLESS),
    "timm_deit": Entry(_timm("deit_tiny_patch16_224", **_VIT), "timm_vit"),
    "timm_deit_distilled": Entry(_timm("deit_tiny_distilled_patch16_224", **_VIT), "timm_vit"),
    "timm_deit3": Entry(_timm("deit3_small_patch16_224", **_VIT), "timm_vit"),
    # timm EVA (RoPE kwargs to every block), BEiT (relative position bias kwargs), Swin, T2T-ViT
    "timm_eva02": Entry(_timm("eva02_tiny_patch14_224", **_VIT), "timm_eva"),
    "timm_eva_token_reg": Entry(
        _timm("eva02_tiny_patch14_224", **_VIT, global_pool="token", num_reg_tokens=2), "timm_eva"
    ),
    "timm_beit": Entry(_timm("beit_base_patch16_224", **_VIT), "timm_beit"),
    "timm_beit_shared_bias": Entry(
        _timm("beit_base_patch16_224", **_VIT, use_rel_pos_bias=False, use_shared_rel_pos_bias=True), "timm_beit"
    ),
    "timm_swin": Entry(_timm("swin_tiny_patch4_window7_224", **_SWIN, num_classes=CLASSES), "timm_swin"),
    "timm_swinv2": Entry(
        _timm("swinv2_tiny_window8_256", **_SWIN, num_classes=CLASSES), "timm_swin", shared_flops=True
    ),
    "t2t_vit": Entry(_t2t, "t2t_vit"),
    # transformers families with their own spec
    "hf_vit_cls": Entry(_hf("ViTForImageClassification", "ViTConfig", **_HF, **_HF_MLP), "hf_vit"),
    "hf_vit_model": Entry(_hf("ViTModel", "ViTConfig", **_HF, intermediate_size=64), "hf_vit", _HEADLESS),
    "hf_deit_cls": Entry(_hf("DeiTForImageClassification", "DeiTConfig", **_HF, **_HF_MLP), "hf_vit"),
    "hf_deit_teacher": Entry(_hf("DeiTForImageClassificationWithTeacher", "DeiTConfig", **_HF, **_HF_MLP), "hf_vit"),
    "hf_beit_cls": Entry(
        _hf("BeitForImageClassification", "BeitConfig", **_HF, **_HF_MLP, use_relative_position_bias=True),
        "hf_beit",
    ),
    "hf_beit_shared_cls_token": Entry(
        _hf(
            "BeitForImageClassification",
            "BeitConfig",
            **_HF,
            **_HF_MLP,
            use_mean_pooling=False,
            use_shared_relative_position_bias=True,
        ),
        "hf_beit",
    ),
    "hf_dinov2_cls": Entry(_hf("Dinov2ForImageClassification", "Dinov2Config", **_HF, **_HF_MLP), "hf_dinov2"),
    "hf_dinov2_reg_cls": Entry(
        _hf(
            "Dinov2WithRegistersForImageClassification",
            "Dinov2WithRegistersConfig",
            **_HF,
            **_HF_MLP,
            num_register_tokens=2,
        ),
        "hf_dinov2",
    ),
    "hf_dinov2_model": Entry(_hf("Dinov2Model", "Dinov2Config", **_HF), "hf_dinov2", _HEADLESS),
    "hf_swin_cls": Entry(_hf("SwinForImageClassification", "SwinConfig", **_HF_SWIN), "hf_swin"),
    "hf_swinv2_cls": Entry(
        _hf("Swinv2ForImageClassification", "Swinv2Config", **_HF_SWIN),
        "hf_swin",
        shared_flops=True,
    ),
    # transformers models found by the discovery spec
    "hf_auto_vit_msn": Entry(_hf("ViTMSNForImageClassification", "ViTMSNConfig", **_HF, **_HF_MLP), "hf_auto"),
    "hf_auto_ijepa": Entry(_hf("IJepaForImageClassification", "IJepaConfig", **_HF, **_HF_MLP), "hf_auto"),
    "hf_auto_data2vec": Entry(
        _hf("Data2VecVisionForImageClassification", "Data2VecVisionConfig", **_HF, **_HF_MLP), "hf_auto"
    ),
    "hf_auto_clip": Entry(_clip, "hf_auto"),
    "hf_auto_ijepa_model": Entry(_hf("IJepaModel", "IJepaConfig", **_HF, intermediate_size=64), "hf_auto", _HEADLESS),
    # a model with exits of its own, run stage by stage (the staged driver); costs measured at the zoo's size
    "dyn_perceiver": Entry(_dyn_perceiver, "dyn_perceiver", {"input_size": (3, IMG, IMG)}),
    # anything else, described by module names
    "generic": Entry(TinyTransformer, "generic", {"spec": _GENERIC, "input_size": (3, IMG, IMG)}),
}


def spec_of(entry: Entry, model: nn.Module) -> eexit.backbones.BackboneSpec:
    """The spec ``attach`` uses for this entry's model."""
    return entry.attach.get("spec") or eexit.backbones.find_spec(model)


def model_output(entry: Entry, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's own prediction: logits, or the last hidden state of a headless model."""
    spec = spec_of(entry, model)
    out = spec.call(model, x)
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):  # the Dynamic Perceiver returns every exit's logits; its spec picks the final one
        return spec.logits(out)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def spread_exits(ee: eexit.EarlyExitModel, x: torch.Tensor | None = None, seed: int = 0) -> None:
    """Random IMs with centred, unsaturated logits, and gates calibrated so that about half of the samples that
    reach each gate exit there, none near the boundary (for decision tests). The one helper of the test suite.

    Logits are centred because some random backbones give features with a large common part, which would saturate
    every softmax and tie every gate at 0.5. The IMs are set in exit order, each on the logits the earlier ones
    now give, since a staged backbone's exits read earlier exits' logits (the Dynamic Perceiver's isc links).

    Args:
        ee: the attached model.
        x: calibration images (default: 64 random images of the cost table's input size).
        seed: seed of the random weights.
    """
    g = torch.Generator().manual_seed(seed)
    if x is None:
        x = torch.randn(64, *ee.cost_table.input_shape, generator=g)
    with torch.no_grad():
        features, final = ee.exit_features(x)
        earlier: list[torch.Tensor] = []
        for k, head in enumerate(ee.heads):
            for p in head.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            last = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]  # the layer that makes the logits
            logits = ee.exit_output(k, features[k], earlier)[0]  # [B, C]
            scale = 1.5 / (logits - logits.mean(0)).std().clamp(min=1e-12)
            last.weight.mul_(scale)
            last.bias.mul_(scale).sub_(ee.exit_output(k, features[k], earlier)[0].mean(0))
            earlier.append(ee.exit_output(k, features[k], earlier)[0])
        logits = ee.outputs_from_features(features, final).logits  # [E, B, C]; gates do not change logits
        history = ExitHistory()
        reaching = torch.ones(x.shape[0], dtype=torch.bool)
        for k, gate in enumerate(ee.gates):
            stats = gate_statistics(logits[k], gate.features, history)  # [B, F]
            history = history.after(logits[k])
            direction = torch.randn(stats.shape[1], generator=g)
            proj = stats @ direction  # [B]
            # centred on the samples that reach this gate, so that (hazard rule) half of them exit here
            order = proj[reaching].sort().values if reaching.sum() >= 2 else proj.sort().values
            centre = (order[len(order) // 2 - 1] + order[len(order) // 2]) / 2
            scale = 4.0 / order.std().clamp(min=1e-12)
            gate.linear.weight.copy_((direction * scale).unsqueeze(0))
            gate.linear.bias.fill_(float(-centre * scale))
            reaching &= proj < centre
