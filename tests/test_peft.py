"""PEFT-wrapped backbones: attach through a PeftModel, train its LoRA with the exits, save and load both.

On a tiny timm ViT (LoRA on the fused ``qkv``) and a tiny transformers ViTForImageClassification (LoRA on query and
value, the classifier in ``modules_to_save``), with LoRA weights that are not zero at init, so the LoRA layers
change every output and a test can see whether they ran.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from backbone_zoo import ZOO, model_output, spec_of, spread_exits
from conftest import IMG, _hf_vit_config, tiny_timm_vit
from test_hub import fake_api, hub_cache  # noqa: F401  (fake_api is a fixture)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import eexit
from eexit import _disk, _peft
from eexit._fingerprint import backbone_fingerprint, fingerprint_info
from eexit.backbones import StagedSpec
from eexit.config import FitConfig
from eexit.data import FeatureCache
from eexit.errors import AdapterError, BackboneError, EexitValueError
from eexit.inference import GatePolicy, decide_exits

peft = pytest.importorskip("peft")

PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def _timm_base() -> nn.Module:
    return tiny_timm_vit(depth=3)


def _hf_base() -> nn.Module:
    from transformers import ViTForImageClassification

    return ViTForImageClassification(_hf_vit_config(num_hidden_layers=3))


def _hf_targets(model: nn.Module) -> list[str]:
    # transformers 5 names the attention projections q_proj / v_proj; 4.x query / value
    names = {name.rpartition(".")[2] for name, _ in model.named_modules()}
    return ["q_proj", "v_proj"] if "q_proj" in names else ["query", "value"]


FAMILIES = {
    "timm": (_timm_base, lambda model: {"target_modules": ["qkv"]}),
    "hf": (_hf_base, lambda model: {"target_modules": _hf_targets(model), "modules_to_save": ["classifier"]}),
}


def plain(family: str, seed: int = 0) -> nn.Module:
    """The base model: the same weights for the same seed."""
    torch.manual_seed(seed)
    return FAMILIES[family][0]()


def with_lora(family: str, seed: int = 0, lora_seed: int = 100, model: nn.Module | None = None, **config):
    """The base model of ``seed`` wrapped with a LoRA whose weights (non-zero B included) depend on ``lora_seed``."""
    model = model if model is not None else plain(family, seed)
    torch.manual_seed(lora_seed)
    settings = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **FAMILIES[family][1](model), **config}
    return peft.get_peft_model(model, peft.LoraConfig(**settings))


def images(batch: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def lora_b(model: nn.Module) -> nn.Parameter:
    """The first LoRA B weight (block 0's attention)."""
    return next(p for name, p in model.named_parameters() if "lora_B" in name)


# ------------------------------------------------------------------------------------------ attach and detach
@pytest.mark.slow
def test_import_eexit_does_not_import_peft():
    code = "import sys, eexit\nassert 'peft' not in sys.modules, 'peft imported'\n"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_attach_sees_through_the_peft_model(family):
    pm = with_lora(family).eval()
    x = images()
    before = logits_of(pm, x)
    ee = eexit.attach(pm)
    assert ee.spec.name == {"timm": "timm_vit", "hf": "hf_vit"}[family]
    assert ee.backbone is pm.get_base_model() and ee.peft_model is pm
    assert ee.peft_trainable and all("lora_" in n or "modules_to_save" in n for n in ee.peft_trainable)
    assert not any(p.requires_grad for p in pm.parameters()) and not pm.training
    # the exits' module tree holds the wrapped model once: the PeftModel and its tuner are not submodules of ee
    assert not any(m is pm or m is pm.base_model for m in ee.modules())
    assert len(ee.state_dict()) == sum(len(m.state_dict()) for m in ee.children())
    with torch.no_grad():
        out = ee(x, all_exits=True)
    torch.testing.assert_close(out.logits[-1], before)  # the last exit is the LoRA-adapted head
    with pytest.raises(BackboneError, match="already has exits"):
        eexit.attach(pm)
    with pytest.raises(BackboneError, match="already has exits"):
        eexit.attach(pm.get_base_model())
    ee.detach()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_exits_see_the_lora_weights(family):
    pm = with_lora(family)
    ee = eexit.attach(pm)
    x = images()
    with torch.no_grad():
        first = ee(x, all_exits=True).logits[0]
        lora_b(pm).add_(0.5)  # block 0's LoRA: exit 0 reads block 0's output
        second = ee(x, all_exits=True).logits[0]
    assert not torch.allclose(first, second)
    ee.detach()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_early_exit_equals_all_exits_then_decide(family):
    ee = eexit.attach(with_lora(family))
    calibration = images(64, seed=5)
    spread_exits(ee, calibration)
    for batch in (1, 7, 64):
        x = calibration[:batch]
        with torch.no_grad():
            full = ee(x, all_exits=True)
            expected = decide_exits(full.logits, full.gate_logits, GatePolicy(0.5))
            out = ee(x)
        assert torch.equal(out.exit_index, expected), batch
        torch.testing.assert_close(out.logits, full.logits[expected, torch.arange(batch)], atol=1e-5, rtol=1e-4)
    assert len(expected.unique()) >= 2
    ee.detach()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_detach_gives_back_the_peft_model_as_it_was(family):
    pm = with_lora(family)
    x = images(3)
    pm.eval()
    before = logits_of(pm, x)
    pm.train()  # a mode attach must change and detach restore, wrapper included
    modules = dict(pm.named_modules())
    flags, modes, count = [p.requires_grad for p in pm.parameters()], [m.training for m in pm.modules()], hooks(pm)
    ee = eexit.attach(pm)
    with torch.no_grad():
        ee(x)
        ee(x, all_exits=True)
    back = eexit.detach(ee)
    assert back is pm and type(back) is type(pm)
    assert dict(pm.named_modules()) == modules  # the same module objects under the same names
    assert [p.requires_grad for p in pm.parameters()] == flags and any(flags)
    assert [m.training for m in pm.modules()] == modes and hooks(pm) == count
    pm.eval()
    assert torch.equal(logits_of(pm, x), before)
    eexit.attach(pm).detach()  # attachable again


def _zoo_targets(spec, model: nn.Module) -> list[str]:
    """Full names of the Linear layers LoRA adapts: every block's (a staged model: every one outside its exits)."""
    if isinstance(spec, StagedSpec):
        exits = [name for name, _ in spec.blocks(model)]
        return [
            n
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(n == e or n.startswith(e + ".") for e in exits)
        ]
    return [
        f"{block}.{n}"
        for block, module in spec.blocks(model)
        for n, m in module.named_modules()
        if isinstance(m, nn.Linear)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_backbone_takes_exits_through_a_peft_model(name):
    """The conformance matrix's attach / early-exit / detach checks, on every zoo backbone wrapped with LoRA."""
    entry = ZOO[name]
    model = entry.build()
    spec = spec_of(entry, model)
    torch.manual_seed(1)
    pm = peft.get_peft_model(
        model, peft.LoraConfig(target_modules=_zoo_targets(spec, model), r=2, init_lora_weights=False)
    )
    x = images(7, seed=5)
    pm.eval()
    before = model_output(entry, model, x).detach()
    pm.train()
    flags, modes, count = [p.requires_grad for p in pm.parameters()], [m.training for m in pm.modules()], hooks(pm)
    ee = eexit.attach(pm, **entry.attach)
    assert ee.backbone is model and ee.spec.name == entry.spec
    spread_exits(ee, images(64, seed=6))
    with torch.no_grad():
        full = ee(x, all_exits=True)
        out = ee(x)
        if ee.has_backbone_head and not isinstance(spec, StagedSpec):
            torch.testing.assert_close(full.logits[-1], before, atol=1e-5, rtol=1e-4)  # LoRA ran in the last exit
    expected = decide_exits(full.logits, full.gate_logits, GatePolicy(0.5))
    assert torch.equal(out.exit_index, expected)
    torch.testing.assert_close(out.logits, full.logits[expected, torch.arange(7)], atol=1e-5, rtol=1e-4)
    assert eexit.detach(ee) is pm
    assert [p.requires_grad for p in pm.parameters()] == flags and [m.training for m in pm.modules()] == modes
    assert hooks(pm) == count
    pm.eval()
    with torch.no_grad():
        assert torch.equal(model_output(entry, model, x), before)


def test_prompt_learning_peft_models_are_refused():
    # peft cannot build a prompt-learning PeftModel around a vision model without a text config; a real
    # PeftModel whose adapter config is a prompt-learning one goes through the same public path (attach).
    pm = with_lora("timm")
    pm.peft_config["default"] = peft.PrefixTuningConfig(num_virtual_tokens=2)
    count = hooks(pm)
    with pytest.raises(BackboneError, match=r"prompt learning \(PREFIX_TUNING\)"):
        eexit.attach(pm)
    with pytest.raises(BackboneError, match="prompt learning"):
        _peft.split_peft(pm)
    assert hooks(pm) == count and any(p.requires_grad for p in pm.parameters())


def test_fingerprint_covers_the_lora_weights():
    pm = with_lora("timm")
    info = fingerprint_info(pm)
    assert any(".lora_B." in k for k in pm.get_base_model().state_dict())  # what the fingerprint reads
    assert info["fingerprint"] == fingerprint_info(with_lora("timm"))["fingerprint"]  # deterministic
    assert info["fingerprint"] != backbone_fingerprint(with_lora("timm", lora_seed=7))  # another LoRA
    assert info["peft"]["peft_type"] == "LORA" and info["peft"]["adapter_name"] == "default"
    assert info["peft"]["target_modules"] == ["qkv"]
    assert info["fingerprint"] != backbone_fingerprint(plain("timm"))
    with torch.no_grad():
        lora_b(pm).add_(1e-3)
    changed = fingerprint_info(pm)
    assert (
        changed["fingerprint"] != info["fingerprint"] and changed["peft"]["fingerprint"] != info["peft"]["fingerprint"]
    )


# ------------------------------------------------------------------------------------------ training
def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 5, (n,), generator=g)
    x = torch.randn(n, 3, IMG, IMG, generator=g) * 0.5 + (y.float() - 2).view(-1, 1, 1, 1)
    return TensorDataset(x, y)


def _loaders() -> tuple[DataLoader, DataLoader]:
    return DataLoader(_data(64, 0), batch_size=32), DataLoader(_data(32, 1), batch_size=32)


LORA_FIT = dict(
    lam=0.1, epochs=2, warmup_epochs=1, phase_batches=1, lr=0.05, backbone_lr=0.05, select="last", progress=False
)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fit_lora_trains_only_the_lora_and_the_exits(family):
    pm = with_lora(family)
    ee = eexit.attach(pm)
    state = {k: v.clone() for k, v in ee.backbone.state_dict().items()}
    exits = ee.adapter_state_dict()
    history = eexit.fit(ee, *_loaders(), train_backbone="lora", **LORA_FIT)
    assert ee.fit_config.train_backbone == "lora" and history[0]["warmup_loss"] > 0
    after = ee.backbone.state_dict()
    trained = set(ee.peft_trainable)
    assert [k for k in state if not torch.equal(state[k], after[k])]  # something of the backbone learned
    assert all(torch.equal(state[k], after[k]) for k in state if k not in trained)  # the base, bit for bit
    assert any(not torch.equal(state[k], after[k]) for k in trained if "lora_" in k)
    assert any(not torch.equal(v, ee.adapter_state_dict()[k]) for k, v in exits.items())
    assert not any(p.requires_grad for p in pm.parameters()) and not pm.training  # frozen again while attached
    ee.detach()
    assert [n for n, p in pm.get_base_model().named_parameters() if p.requires_grad] == ee.peft_trainable


@pytest.mark.slow
def test_fit_lora_resumes_its_checkpoint_with_the_lora_weights(tmp_path):
    def run(resume: bool, **lora) -> eexit.EarlyExitModel:
        ee = eexit.attach(with_lora("timm", **lora))
        eexit.fit(ee, *_loaders(), train_backbone="lora", checkpoint_dir=tmp_path, resume=resume, **LORA_FIT)
        return ee

    whole = run(False)
    resumed = run(True)  # the checkpoint of the last epoch: nothing left to train, the state comes from it
    for name in whole.peft_trainable:
        assert torch.equal(whole.backbone.get_parameter(name), resumed.backbone.get_parameter(name)), name
    for key, value in whole.adapter_state_dict().items():
        assert torch.equal(resumed.adapter_state_dict()[key], value), key
    with pytest.raises(EexitValueError, match=r"another backbone.*layout of its PEFT adapter"):
        run(True, target_modules=["qkv", "proj"])


def test_lora_needs_a_peft_model_and_says_how():
    ee = eexit.attach(plain("timm"))
    with pytest.raises(EexitValueError, match=r"ee\.detach\(\).*get_peft_model.*target_modules=\['qkv'\]") as err:
        eexit.fit(ee, *_loaders(), train_backbone="lora", **{**LORA_FIT, "epochs": 1})
    assert "eexit[peft]" not in str(err.value)
    hf = eexit.attach(plain("hf"))
    with pytest.raises(EexitValueError, match=str(_hf_targets(hf.backbone)).replace("[", r"\[")):
        eexit.fit(hf, *_loaders(), train_backbone="lora", **{**LORA_FIT, "epochs": 1})


def test_lora_without_peft_installed_says_how_to_install(monkeypatch):
    monkeypatch.setattr(_peft, "peft_installed", lambda: False)
    ee = eexit.attach(plain("timm"))
    with pytest.raises(EexitValueError, match=r"pip install 'eexit\[peft\]'"):
        eexit.fit(ee, *_loaders(), train_backbone="lora", **{**LORA_FIT, "epochs": 1})


def test_lora_with_nothing_trainable_is_refused():
    pm = with_lora("timm")
    for p in pm.parameters():
        p.requires_grad_(False)  # what PeftModel.from_pretrained gives without is_trainable=True
    ee = eexit.attach(pm)
    fix = r'PeftModel\.from_pretrained\(.*"<dir>/peft_adapter", is_trainable=True\); ee = eexit\.from_pretrained\(pm'
    with pytest.raises(EexitValueError, match=fix):
        eexit.fit(ee, *_loaders(), train_backbone="lora", **{**LORA_FIT, "epochs": 1})


def test_lora_refuses_feature_caches():
    with pytest.raises(EexitValueError, match="cache_features=True cannot be combined with train_backbone='lora'"):
        FitConfig(train_backbone="lora", cache_features=True)
    ee = eexit.attach(with_lora("timm"))
    train, val = _loaders()
    cache = FeatureCache.collect(ee, train, "train", progress=False)
    with pytest.raises(EexitValueError, match=r"FeatureCache.*train_backbone='lora'"):
        eexit.fit(ee, cache, val, train_backbone="lora", **{**LORA_FIT, "epochs": 1})


@pytest.mark.parametrize("bad", ["qlora", "LoRA", None, 1, "true"])
def test_bad_train_backbone_values_list_the_allowed_ones(bad):
    with pytest.raises(EexitValueError, match=r"expected one of \[False, True, 'lora'\]"):
        FitConfig(train_backbone=bad)
    assert FitConfig.from_dict(FitConfig(train_backbone="lora").to_dict()).train_backbone == "lora"


# ------------------------------------------------------------------------------------------ saving and loading
def _trained(family: str) -> eexit.EarlyExitModel:
    ee = eexit.attach(with_lora(family))
    spread_exits(ee, images(64, seed=5))
    return ee


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_side_by_side_and_load_onto_the_plain_backbone(family, tmp_path):
    ee = _trained(family)
    x = images(8)
    with torch.no_grad():
        expected = ee(x, all_exits=True)
    ee.save_pretrained(tmp_path)
    assert PEFT_FILES <= {p.name for p in (tmp_path / "peft_adapter").iterdir()}
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(p.suffix in (".json", ".safetensors", ".md") for p in written), written
    config = json.loads((tmp_path / "eexit_config.json").read_text())
    assert config["backbone"]["peft"]["adapter_name"] == "default"
    assert "PEFT adapter" in (tmp_path / "README.md").read_text()

    base = plain(family)  # the user's own copy of the base model, without any LoRA
    loaded = eexit.from_pretrained(base, tmp_path)
    assert loaded.backbone is base and loaded.peft_model is not None
    with torch.no_grad():
        got = loaded(x, all_exits=True)
    assert torch.equal(got.logits, expected.logits) and torch.equal(got.gate_logits, expected.gate_logits)
    assert eexit.detach(loaded) is loaded.peft_model

    # onto the PeftModel itself: nothing to load, the fingerprint checks its LoRA
    pm = ee.detach()
    again = eexit.from_pretrained(pm, tmp_path)
    assert again.peft_model is pm
    with torch.no_grad():
        assert torch.equal(again(x, all_exits=True).logits, expected.logits)
    again.detach()


def _untouched_state(model: nn.Module) -> tuple:
    return (
        list(model.state_dict()),
        [p.requires_grad for p in model.parameters()],
        [m.training for m in model.modules()],
        hasattr(model, "peft_config"),
        hooks(model),
    )


def test_plain_backbone_without_the_peft_folder_is_refused_clearly(tmp_path):
    _trained("timm").save_pretrained(tmp_path)
    for p in (tmp_path / "peft_adapter").iterdir():
        p.unlink()
    (tmp_path / "peft_adapter").rmdir()
    base = plain("timm")
    before = _untouched_state(base)
    with pytest.raises(AdapterError, match="plain backbone") as err:
        eexit.from_pretrained(base, tmp_path)
    assert "LORA" in str(err.value) and "peft_adapter" in str(err.value)
    assert _untouched_state(base) == before


def test_another_lora_is_refused_clearly(tmp_path):
    _trained("timm").save_pretrained(tmp_path)
    other = with_lora("timm", lora_seed=7)
    before, weights = _untouched_state(other), {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(AdapterError, match="another PEFT adapter"):
        eexit.from_pretrained(other, tmp_path)
    assert _untouched_state(other) == before  # untouched: modules, flags, modes, hooks
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in weights.items())


def test_plain_adapter_onto_a_peft_model_is_refused_clearly(tmp_path):
    ee = eexit.attach(plain("timm"))
    ee.save_pretrained(tmp_path)
    with pytest.raises(AdapterError, match="trained on the plain backbone"):
        eexit.from_pretrained(with_lora("timm"), tmp_path)


def test_a_failed_load_takes_the_injected_lora_out_again(tmp_path):
    _trained("timm").save_pretrained(tmp_path)
    base = plain("timm", seed=3)  # other base weights: the LoRA loads, then the fingerprint refuses
    base.train()
    before = _untouched_state(base)
    x = images(3)
    with pytest.raises(AdapterError, match="different weights"):
        eexit.from_pretrained(base, tmp_path)
    assert _untouched_state(base) == before
    assert all(type(m).__module__.startswith(("timm", "torch")) for m in base.modules())
    base.eval()
    assert torch.equal(logits_of(base, x), logits_of(plain("timm", seed=3).eval(), x))


def test_pickled_peft_weights_are_never_read(tmp_path, monkeypatch):
    ee = _trained("timm")
    ee.save_pretrained(tmp_path)
    x = images(3)
    with torch.no_grad():
        expected = ee(x, all_exits=True).logits
    folder = tmp_path / "peft_adapter"
    reads = []

    def refuse(*args, **kwargs):
        reads.append(args)
        raise AssertionError("a pickle was read")

    monkeypatch.setattr(torch, "load", refuse)
    # a pickle next to the safetensors: the safetensors are read, the pickle never (not even opened by torch)
    (folder / "adapter_model.bin").write_bytes(b"not a pickle")
    loaded = eexit.from_pretrained(plain("timm"), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x, all_exits=True).logits, expected)
    assert not reads
    # the pickle alone: refused before peft is asked to load anything
    (folder / "adapter_model.safetensors").unlink()
    base = plain("timm")
    with pytest.raises(AdapterError, match="never loads"):
        eexit.from_pretrained(base, tmp_path)
    assert not hasattr(base, "peft_config") and not reads


def test_a_failed_save_keeps_the_previous_files(tmp_path, monkeypatch):
    first = _trained("timm")
    first.save_pretrained(tmp_path)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    ee = first
    with torch.no_grad():
        lora_b(ee.peft_model).add_(1.0)  # a new LoRA and so a new fingerprint: every file would change

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(_disk, "_write_files", crash)
    with pytest.raises(OSError, match="disk full"):
        ee.save_pretrained(tmp_path)
    monkeypatch.undo()
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # and no staged folder left behind
    assert sorted(os.listdir(tmp_path)) == sorted(["README.md", "eexit_adapter.safetensors", "eexit_config.json",
                                                   "peft_adapter"])  # fmt: skip
    ee.save_pretrained(tmp_path)  # a save that works replaces both
    assert (tmp_path / "peft_adapter" / "adapter_model.safetensors").read_bytes() != before[
        Path("peft_adapter/adapter_model.safetensors")
    ]


def test_several_peft_adapters_cannot_be_saved_side_by_side(tmp_path):
    pm = with_lora("timm")
    pm.add_adapter("other", peft.LoraConfig(target_modules=["qkv"], r=2))
    ee = eexit.attach(pm)
    with pytest.raises(AdapterError, match="delete_adapter"):
        ee.save_pretrained(tmp_path)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_a_named_peft_adapter_round_trips(tmp_path):
    pm = with_lora("timm")
    pm.add_adapter("mine", peft.LoraConfig(target_modules=["qkv"], r=2, init_lora_weights=False))
    pm.set_adapter("mine")
    pm.delete_adapter("default")
    ee = eexit.attach(pm)
    x = images()
    with torch.no_grad():
        expected = ee(x, all_exits=True).logits
    ee.save_pretrained(tmp_path)
    assert PEFT_FILES <= {p.name for p in (tmp_path / "peft_adapter").iterdir()}
    loaded = eexit.from_pretrained(plain("timm"), tmp_path)
    assert loaded.peft_model.active_adapter == "mine"
    with torch.no_grad():
        assert torch.equal(loaded(x, all_exits=True).logits, expected)


def test_push_to_hub_carries_the_peft_adapter(fake_api, tmp_path, monkeypatch):  # noqa: F811
    import huggingface_hub

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    ee = _trained("timm")
    ee.push_to_hub("org/lora-exits")
    [(_, operations, _)] = fake_api["create_commit"]
    pushed = {op.path_in_repo: op.path_or_fileobj for op in operations}
    assert {f"peft_adapter/{name}" for name in PEFT_FILES} <= set(pushed)
    hub_cache(cache, "org/lora-exits", {"main": pushed})  # what a later pull finds
    x = images()
    loaded = eexit.from_pretrained(plain("timm"), "org/lora-exits", cache_dir=cache)
    with torch.no_grad():
        assert torch.equal(loaded(x, all_exits=True).logits, ee(x, all_exits=True).logits)


# ------------------------------------------------------------------------------------------ review fixes
class _BNBlock(nn.Module):
    """A token block with a BatchNorm and a Dropout in the base model, and a Linear (``proj``) LoRA adapts."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.proj, self.bn, self.drop = nn.Linear(width, width), nn.BatchNorm1d(width), nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.bn(self.proj(x).transpose(1, 2)).transpose(1, 2))


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 8, 8)
        self.layers = nn.ModuleList(_BNBlock() for _ in range(3))
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        for layer in self.layers:
            x = layer(x)
        return self.fc(self.norm(x).mean(1))


_BN_SPEC = dict(spec=eexit.GenericSpec("layers", pool="mean", norm="norm", num_prefix_tokens=0, num_classes=5))


def _modes_during_fit(ee: eexit.EarlyExitModel, modules: dict[str, nn.Module]) -> dict[str, set[bool]]:
    """Record, on every forward during a fit, the training flag of each of ``modules`` (hooks removed after)."""
    seen: dict[str, set[bool]] = {name: set() for name in modules}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: seen[name].add(mod.training))
        for name, m in modules.items()
    ]
    ee._test_handles = handles  # removed by the caller
    return seen


@pytest.mark.parametrize("family", ["bn", "timm"])
def test_fit_lora_keeps_the_base_in_eval_mode_and_bit_identical(family):
    """Review finding 1: only PEFT-only modules train; every state-dict entry of the base (BatchNorm running
    statistics included) is bit-identical after fit("lora"), and the trained buffers are snapshot too."""
    torch.manual_seed(0)
    if family == "bn":
        base = _BNNet()
        torch.manual_seed(100)
        pm = peft.get_peft_model(
            base,
            peft.LoraConfig(
                r=2, target_modules=["proj"], modules_to_save=["layers.2.bn"], lora_dropout=0.1, init_lora_weights=False
            ),
        )
        ee = eexit.attach(pm, input_size=(3, IMG, IMG), **_BN_SPEC)
    else:
        pm = with_lora("timm", lora_dropout=0.1)
        ee = eexit.attach(pm)
    model = ee.backbone
    state = {k: v.clone() for k, v in model.state_dict().items()}
    lora_layer = next(m for n, m in model.named_modules() if n.endswith("lora_A.default"))
    kinds = (nn.BatchNorm1d, nn.LayerNorm, nn.Dropout)
    base_modules = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, kinds) and "lora_" not in n and "modules_to_save" not in n
    }
    seen = _modes_during_fit(ee, {"lora": lora_layer, **base_modules})
    try:
        eexit.fit(ee, *_loaders(), train_backbone="lora", **{**LORA_FIT, "select": "best"})
    finally:
        for handle in ee._test_handles:
            handle.remove()
    assert seen["lora"] == {True, False}  # trained, then validated
    assert all(seen[n] <= {False} for n in base_modules), {n: seen[n] for n in base_modules if True in seen[n]}
    assert any(seen[n] for n in base_modules if isinstance(base_modules[n], (nn.BatchNorm1d, nn.LayerNorm)))
    trained = set(ee.peft_trainable) | {
        f"{prefix}.{b}" for prefix in ee.peft_train_modules for b, _ in model.get_submodule(prefix).named_buffers()
    }
    after = model.state_dict()
    changed = sorted(k for k in state if k not in trained and not torch.equal(state[k], after[k]))
    assert not changed, changed
    if family == "bn":  # the BatchNorm in modules_to_save did train (in train mode) and is part of the snapshot
        copy = "layers.2.bn.modules_to_save.default.running_mean"
        assert copy in trained and not torch.equal(state[copy], after[copy])
        assert "layers.2.bn.original_module.running_mean" not in trained
    assert not pm.training and not any(m.training for m in pm.modules())  # all back in eval while attached
    ee.detach()


def test_from_pretrained_refuses_the_base_of_a_peft_model(tmp_path):
    """Review finding 2: the model inside a PeftModel is refused before anything is injected; its LoRA survives."""
    _trained("timm").save_pretrained(tmp_path)
    pm = with_lora("timm", seed=3)  # other base weights: a load would fail on the fingerprint
    base = pm.get_base_model()
    before, weights = _untouched_state(pm), {k: v.clone() for k, v in pm.state_dict().items()}
    with pytest.raises(AdapterError, match="Pass the PeftModel itself"):
        eexit.from_pretrained(base, tmp_path)
    assert _untouched_state(pm) == before
    assert all(torch.equal(v, pm.state_dict()[k]) for k, v in weights.items())


def test_from_pretrained_refuses_an_attached_backbone_before_wrapping_it(tmp_path):
    _trained("timm").save_pretrained(tmp_path)
    model = plain("timm")
    ee = eexit.attach(model)
    before = _untouched_state(model)
    with pytest.raises(BackboneError, match="already has exits"):
        eexit.from_pretrained(model, tmp_path)
    assert _untouched_state(model) == before
    assert all(type(m).__module__.startswith(("timm", "torch")) for m in model.modules())
    ee.detach()


def test_a_failed_load_never_rewrites_the_base_weights(tmp_path):
    """Review finding 3: an adapter saved with OLoRA init (which rewrites base weights when it initialises) is
    injected with plain init, so a load that then fails gives back the base weights bit for bit."""
    torch.manual_seed(100)
    pm = peft.get_peft_model(
        plain("timm"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"], init_lora_weights="olora")
    )
    ee = eexit.attach(pm)
    spread_exits(ee, images(64, seed=5))
    ee.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "peft_adapter" / "adapter_config.json").read_text())["init_lora_weights"] == "olora"
    base = plain("timm", seed=3)
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    before = _untouched_state(base)
    with pytest.raises(AdapterError, match="different weights"):
        eexit.from_pretrained(base, tmp_path)
    assert _untouched_state(base) == before
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in weights.items())


def test_an_injection_failing_midway_leaves_no_peft_layer(tmp_path, monkeypatch):
    _trained("timm").save_pretrained(tmp_path)
    from peft.tuners.lora import LoraModel

    real, calls = LoraModel._create_and_replace, []

    def second_fails(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LoraModel, "_create_and_replace", second_fails)
    base = plain("timm")
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    before = _untouched_state(base)
    with pytest.raises(AdapterError, match="out of memory"):
        eexit.from_pretrained(base, tmp_path)
    assert len(calls) == 2
    assert _untouched_state(base) == before
    assert all(type(m).__module__.startswith(("timm", "torch")) for m in base.modules())
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in weights.items())


def test_lora_settings_are_part_of_the_fingerprint(tmp_path):
    """Review finding 4: same tensors, other lora_alpha: other outputs, so refused, naming the setting."""
    _trained("timm").save_pretrained(tmp_path)  # lora_alpha=8
    other = with_lora("timm", lora_alpha=64)  # the same seeds: the same tensors
    assert (
        backbone_fingerprint(other)
        == json.loads((tmp_path / "eexit_config.json").read_text())["backbone"]["fingerprint"]
    )
    with pytest.raises(AdapterError, match="lora_alpha: 8 saved, 64 here"):
        eexit.from_pretrained(other, tmp_path)
    # an edited adapter_config.json is refused (its sha256 is recorded), and the plain model is left as it was
    path = tmp_path / "peft_adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "lora_alpha": 64}))
    base = plain("timm")
    before = _untouched_state(base)
    with pytest.raises(AdapterError, match="does not hold the PEFT adapter"):
        eexit.from_pretrained(base, tmp_path)
    assert _untouched_state(base) == before
    # a scaling changed in place (no config change) is refused too
    pm = with_lora("timm")
    for m in pm.modules():
        if hasattr(m, "set_scale") and hasattr(m, "scaling"):
            m.set_scale("default", 3.0)
    with pytest.raises(AdapterError, match="scaled, disabled or merged"):
        eexit.from_pretrained(pm, tmp_path)


def test_the_peft_adapter_is_loaded_strictly(tmp_path):
    """Review finding 9: a saved PEFT adapter missing a tensor (or with one too many) is refused by name."""
    from safetensors.torch import load_file, save_file

    _trained("timm").save_pretrained(tmp_path)
    # the files' sha256 (recorded since finding 5) would refuse the edit first: drop them, as in an older adapter
    config = json.loads((tmp_path / "eexit_config.json").read_text())
    config["backbone"]["peft"].pop("files", None)
    (tmp_path / "eexit_config.json").write_text(json.dumps(config))
    path = tmp_path / "peft_adapter" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    dropped = sorted(k for k in tensors if "lora_B" in k)[0]
    del tensors[dropped]
    tensors["base_model.model.blocks.0.attn.qkv.lora_C.weight"] = torch.zeros(1)
    save_file(tensors, str(path))
    base = plain("timm")
    before = _untouched_state(base)
    with pytest.raises(AdapterError, match="missing keys") as err:
        eexit.from_pretrained(base, tmp_path)
    assert dropped in str(err.value) and "lora_C" in str(err.value)
    assert _untouched_state(base) == before


def test_fit_lora_resume_refuses_other_base_weights(tmp_path):
    """Review finding 6: a "lora" checkpoint records the frozen base's fingerprint; resuming onto a PeftModel with
    other base weights is refused before anything is loaded."""
    fit = {**LORA_FIT, "epochs": 1, "warmup_epochs": 1}
    eexit.fit(eexit.attach(with_lora("timm")), *_loaders(), train_backbone="lora", checkpoint_dir=tmp_path, **fit)
    other = eexit.attach(with_lora("timm", seed=3))
    exits = {k: v.clone() for k, v in other.adapter_state_dict().items()}
    lora = {k: v.clone() for k, v in other.backbone.state_dict().items()}
    with pytest.raises(EexitValueError, match=r"another backbone.*base weights"):
        eexit.fit(other, *_loaders(), train_backbone="lora", checkpoint_dir=tmp_path, resume=True, **fit)
    assert all(torch.equal(v, other.adapter_state_dict()[k]) for k, v in exits.items())
    assert all(torch.equal(v, other.backbone.state_dict()[k]) for k, v in lora.items())


@pytest.mark.parametrize("cached", [[], ["adapter_config.json"]])
def test_hub_peft_files_missing_offline_are_an_error(fake_api, tmp_path, monkeypatch, cached):  # noqa: F811
    """Review finding 7: offline, with the PEFT files (or one of them) not cached, the error says so; it never
    reads as "the plain backbone" nor as "save the adapter again"."""
    import huggingface_hub

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _trained("timm").push_to_hub("org/lora-exits")
    [(_, operations, _)] = fake_api["create_commit"]
    pushed = {op.path_in_repo: op.path_or_fileobj for op in operations}
    keep = {k: v for k, v in pushed.items() if not k.startswith("peft_adapter/") or k.split("/")[-1] in cached}
    hub_cache(cache, "org/lora-exits", {"main": keep})
    base = plain("timm")
    before = _untouched_state(base)
    with pytest.raises(AdapterError, match="not in the local Hugging Face cache") as err:
        eexit.from_pretrained(base, "org/lora-exits", cache_dir=cache, local_files_only=True)
    assert "peft_adapter/" in str(err.value) and "plain backbone" not in str(err.value)
    assert _untouched_state(base) == before


def test_train_backbone_true_on_a_peft_model_warns_and_suggests_lora():
    """Review finding 14."""
    ee = eexit.attach(with_lora("timm"))
    with pytest.warns(UserWarning, match="train_backbone='lora'"):
        eexit.fit(ee, *_loaders(), train_backbone=True, **{**LORA_FIT, "epochs": 1})
    ee.detach()


def test_fit_lora_with_several_peft_adapters_is_refused_early():
    pm = with_lora("timm")
    pm.add_adapter("other", peft.LoraConfig(target_modules=["qkv"], r=2))
    ee = eexit.attach(pm)
    with pytest.raises(EexitValueError, match=r"several PEFT adapters.*delete_adapter"):
        eexit.fit(ee, *_loaders(), train_backbone="lora", **{**LORA_FIT, "epochs": 1})


@pytest.mark.parametrize("killed", ["between_the_swaps", "before_the_config"])
def test_a_save_killed_midway_loads_the_previous_pair(tmp_path, killed):
    """Review finding 5: what a save killed part-way leaves (laid out by hand, as a kill leaves it: no handler
    runs) loads the consistent previous pair, with a warning; a PEFT folder matching nothing is refused."""
    first = _trained("timm")
    first.save_pretrained(tmp_path)
    x = images(3)
    with torch.no_grad():
        expected = first(x, all_exits=True).logits
        lora_b(first.peft_model).add_(1.0)  # the save that gets killed writes this new LoRA
    newer = tmp_path.parent / f"{tmp_path.name}-newer"
    first.save_pretrained(newer)
    aside = tmp_path / ".peft_adapter.0123abcd.previous"
    os.replace(tmp_path / "peft_adapter", aside)  # the old PEFT adapter moved aside ...
    if killed == "before_the_config":
        os.replace(newer / "peft_adapter", tmp_path / "peft_adapter")  # ... and the new one swapped in
    with pytest.warns(UserWarning, match="interrupted"):
        loaded = eexit.from_pretrained(plain("timm"), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x, all_exits=True).logits, expected)
    # nothing left that matches the config: a clear error, never a silent load or "plain backbone"
    shutil.rmtree(aside)
    if killed == "between_the_swaps":
        os.replace(newer / "peft_adapter", tmp_path / "peft_adapter")
    with pytest.raises(AdapterError, match="interrupted"):
        eexit.from_pretrained(plain("timm"), tmp_path)
    # the next successful save cleans up what the killed one left
    (tmp_path / ".peft_adapter.feedbeef.tmp").mkdir()
    loaded.save_pretrained(tmp_path)
    assert not list(tmp_path.glob(".peft_adapter.*"))
    eexit.from_pretrained(plain("timm"), tmp_path).detach()
