"""Bad adapter files and mismatched backbones: each gives a clear error and loads nothing (issue 4)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import tiny_hf_vit_classifier, tiny_timm_vit
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from test_hub import assert_untouched, fresh_copy, offline_hub, state_of, trained  # noqa: F401 (autouse fixture)

import eexit
from eexit import hub
from eexit.config import FORMAT_VERSION
from eexit.errors import AdapterError


@pytest.fixture
def saved(tmp_path) -> tuple[Path, torch.nn.Module]:
    """A saved adapter and a fresh copy of its backbone."""
    ee = trained()
    return hub.save_pretrained(ee, tmp_path / "adapter"), fresh_copy(ee)


def edit_config(path: Path, change: Callable[[dict], None]) -> None:
    meta = json.loads((path / "eexit_config.json").read_text())
    change(meta)
    (path / "eexit_config.json").write_text(json.dumps(meta))


def rewrite_tensors(path: Path, change: Callable[[dict], None], *, update_config: bool = True) -> None:
    """Replace the tensor file; with update_config the config records the new file (a consistent adapter)."""
    tensors = load_safetensors((path / "eexit_adapter.safetensors").read_bytes())
    change(tensors)
    raw = save_safetensors(tensors)
    (path / "eexit_adapter.safetensors").write_bytes(raw)
    if update_config:

        def record(meta: dict) -> None:
            meta["tensors"]["sha256"] = hashlib.sha256(raw).hexdigest()
            meta["tensors"]["shapes"] = {k: list(v.shape) for k, v in tensors.items()}

        edit_config(path, record)


def refused(model, path, match: str, **kwargs) -> AdapterError:
    before = state_of(model)
    with pytest.raises(AdapterError, match=match) as info:
        eexit.from_pretrained(model, path, **kwargs)
    assert_untouched(model, before)
    return info.value


def test_truncated_json(saved):
    path, model = saved
    raw = (path / "eexit_config.json").read_bytes()
    (path / "eexit_config.json").write_bytes(raw[: len(raw) // 2])
    refused(model, path, "is not valid JSON .*truncated or corrupted")


def test_corrupted_safetensors(saved):
    path, model = saved
    raw = bytearray((path / "eexit_adapter.safetensors").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (path / "eexit_adapter.safetensors").write_bytes(bytes(raw))
    refused(model, path, "sha256 differs .*corrupted, modified, or a save was interrupted")
    # Even a corrupted file that the config vouches for is caught by safetensors' own parser.
    broken = b"\xff" * 8 + b"{not a header"
    (path / "eexit_adapter.safetensors").write_bytes(broken)
    edit_config(path, lambda meta: meta["tensors"].update(sha256=hashlib.sha256(broken).hexdigest()))
    refused(model, path, "not a readable safetensors file")


def test_missing_tensor_file(saved):
    path, model = saved
    (path / "eexit_adapter.safetensors").unlink()
    refused(model, path, "eexit_adapter.safetensors is missing")


def test_wrong_tensor_shapes_are_named_and_the_model_is_detached_again(saved):
    path, model = saved
    rewrite_tensors(path, lambda t: t.update({"heads.0.net.weight": t["heads.0.net.weight"][:, :31].clone()}))
    refused(model, path, r"heads\.0\.net\.weight: expected shape \(5, 32\), got \(5, 31\)")


def test_extra_and_missing_tensors_are_named(saved):
    path, model = saved
    rewrite_tensors(path, lambda t: (t.pop("gates.2.linear.bias"), t.update({"heads.9.net.bias": torch.zeros(5)})))
    refused(model, path, r"missing keys \['gates\.2\.linear\.bias'\]; unexpected keys \['heads\.9\.net\.bias'\]")


def test_tensor_file_that_does_not_match_its_config(saved):
    path, model = saved
    rewrite_tensors(path, lambda t: t.update({"heads.0.net.bias": torch.zeros(6)}), update_config=False)
    edit_config(
        path,
        lambda meta: meta["tensors"].update(
            sha256=hashlib.sha256((path / "eexit_adapter.safetensors").read_bytes()).hexdigest()
        ),
    )
    refused(model, path, "differ from those listed")


def test_fingerprint_mismatch_says_which_backbone_and_how_to_override(saved, images):
    path, _ = saved
    torch.manual_seed(123)
    other = tiny_timm_vit()
    error = refused(other, path, "ignore_fingerprint=True")
    text = str(error)
    assert "'timm_vit' backbone (VisionTransformer" in text and "with weights sha256:" in text
    assert hub.backbone_fingerprint(other) in text and "same architecture with different weights" in text
    with pytest.warns(UserWarning, match="Loading anyway"):
        ee = eexit.from_pretrained(other, path, ignore_fingerprint=True)
    assert ee(images).logits.shape == (len(images), 5)


def test_fingerprint_mismatch_explains_dtype_and_architecture(saved):
    path, model = saved
    refused(model.double(), path, "same architecture in float64, while the adapter's backbone was in float32")
    refused(tiny_timm_vit(depth=6), path, "different architecture")
    refused(tiny_timm_vit(embed_dim=64), path, "reads features of width 32, this model's are 64 wide")
    refused(tiny_timm_vit(num_classes=7), path, "predicts 5 classes, this model's head 7")
    refused(tiny_timm_vit(depth=2), path, r"exits after blocks \[0, 1, 2\], this model has 2 blocks")


def test_config_for_another_backbone_family(saved):
    path, _ = saved
    error = refused(tiny_hf_vit_classifier(), path, "made for a 'timm_vit' backbone")
    assert "ViTForImageClassification, a 'hf_vit' backbone" in str(error)
    edit_config(path, lambda meta: meta["backbone"].update(family="resnet_zoo"))
    refused(tiny_timm_vit(), path, "backbone spec named 'resnet_zoo', which is not registered here")


def test_newer_format_version_fails_clearly(saved):
    path, model = saved
    edit_config(path, lambda meta: meta.update(format_version=99))
    refused(
        model, path, f"format_version=99, but this eexit reads format_version 1..{FORMAT_VERSION}.*pip install -U eexit"
    )


def test_unknown_keys_from_a_newer_eexit_warn_and_are_dropped(saved):
    path, model = saved
    edit_config(path, lambda meta: (meta.update(future_field=[1, 2]), meta["exit_config"].update(future_knob=3)))
    with pytest.warns(UserWarning, match=r"ignoring unknown keys \['future_field'\]"):
        with pytest.warns(UserWarning, match=r"ExitConfig: ignoring unknown keys \['future_knob'\]"):
            ee = eexit.from_pretrained(model, path)
    assert ee.num_exits == 4


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda meta: meta.pop("cost_table"), r"lacks the required field\(s\) \['cost_table'\]"),
        (lambda meta: meta.update(num_classes="5"), "field 'num_classes' must be integer, got '5'"),
        (lambda meta: meta.update(exit_blocks=[0, 1]), "disagrees with exit_blocks"),
        (lambda meta: meta["backbone"].update(fingerprint="md5:0"), "backbone.fingerprint must be 'sha256:<hex>'"),
        (lambda meta: meta["exit_config"].update(head="transformer"), "invalid exit_config.*head='transformer'"),
        (lambda meta: meta["cost_table"].update(exit_flops=[]), "invalid exit_config, fit_config or cost_table"),
        (lambda meta: meta.update(fit_config={"lam": -1}), "lam .* must be >= 0"),
    ],
)
def test_invalid_config_fields(saved, change, match):
    path, model = saved
    edit_config(path, change)
    refused(model, path, match)


def test_not_an_adapter(tmp_path, saved):
    _, model = saved
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text("{}")
    refused(model, tmp_path / "peft", "PEFT adapter .*load it with peft")
    refused(model, tmp_path / "missing-folder" / "x", "is not a folder")
    refused(model, "./missing-folder", "is not a folder")
    with pytest.raises(AdapterError, match="expects the bare backbone"):
        eexit.from_pretrained(trained(), tmp_path / "peft")
