"""attach()/detach() on one timm ViT: hooks come and go, bad models and settings fail clearly. That every backbone
comes back exactly as it was is checked over the whole zoo in test_conformance.py."""

from __future__ import annotations

import pytest
import torch
from conftest import IMG, tiny_timm_vit
from torch import nn

import eexit
from eexit.errors import BackboneError, EexitValueError


def test_hooks_removed_after_detach(images):
    model = tiny_timm_vit()
    counts = [len(b._forward_hooks) for b in model.blocks]
    ee = eexit.attach(model)
    assert sum(len(b._forward_hooks) for b in model.blocks) == sum(counts) + len(ee.exit_blocks)
    ee.detach()
    assert [len(b._forward_hooks) for b in model.blocks] == counts


def test_backbone_called_directly_while_attached_is_unchanged(images):
    model = tiny_timm_vit().eval()
    with torch.no_grad():
        before = model(images)
        eexit.attach(model)
        during = model(images)
    assert torch.equal(before, during)


def test_second_attach_is_an_error():
    model = tiny_timm_vit()
    ee = eexit.attach(model)
    with pytest.raises(BackboneError, match="already has exits"):
        eexit.attach(model)
    ee.detach()
    eexit.attach(model).detach()  # fine again after detach
    with pytest.raises(EexitValueError, match="already detached"):
        ee.detach()


def test_unknown_model_names_specs_and_generic_fix():
    model = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(BackboneError, match="GenericSpec") as err:
        eexit.attach(model)
    assert "timm_vit" in str(err.value) and "Sequential" in str(err.value)


def test_generic_spec_without_blocks():
    class Empty(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList()
            self.norm = nn.LayerNorm(8)

    with pytest.raises(BackboneError, match="no blocks"):
        eexit.attach(Empty(), spec=eexit.GenericSpec("layers", norm="norm"), num_classes=3, input_size=(3, 8, 8))


def test_generic_spec_on_a_custom_transformer(images):
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 16, 8, 8)
            self.layers = nn.ModuleList(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True) for _ in range(3))
            self.norm = nn.LayerNorm(16)
            self.fc = nn.Linear(16, 5)

        def forward(self, x):
            x = self.embed(x).flatten(2).transpose(1, 2)
            for layer in self.layers:
                x = layer(x)
            return self.fc(self.norm(x).mean(1))

    model = Tiny().eval()
    spec = eexit.GenericSpec("layers", pool="mean", norm="norm", num_prefix_tokens=0, num_classes=5)
    ee = eexit.attach(model, spec=spec, input_size=(3, IMG, IMG))
    out = ee(images, all_exits=True)
    assert out.logits.shape == (3, 7, 5)
    assert torch.allclose(out.logits[-1], model(images), atol=1e-5)


def test_num_classes_mismatch():
    with pytest.raises(EexitValueError, match="predicts 5 classes"):
        eexit.attach(tiny_timm_vit(), num_classes=10)


def test_headless_model_needs_num_classes():
    with pytest.raises(EexitValueError, match="pass num_classes"):
        eexit.attach(tiny_timm_vit(num_classes=0))


@pytest.mark.parametrize("blocks", [(4,), (-1,), (2, 1), ()])
def test_bad_exit_blocks(blocks):
    with pytest.raises(EexitValueError):
        eexit.attach(tiny_timm_vit(), exit_blocks=blocks)


def test_unknown_spec_name():
    with pytest.raises(EexitValueError, match="no backbone spec named"):
        eexit.attach(tiny_timm_vit(), backbone="nope")


def test_duplicate_spec_registration():
    from eexit.backbones.timm_vit import TimmViTSpec

    with pytest.raises(EexitValueError, match="already registered"):
        eexit.register_spec(TimmViTSpec())
