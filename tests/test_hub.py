"""Saving, loading, pulling and pushing adapters (issue 4). The Hub is never reached: an offline Hub-layout
cache in a temp dir stands in for downloads, and only HfApi's network calls are replaced for pushes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import huggingface_hub
import pytest
import torch
from backbone_zoo import ZOO, spread_exits
from conftest import tiny_timm_vit
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi
from safetensors.torch import load as load_safetensors

import eexit
from eexit import hub
from eexit.adapters import AdapterRecord
from eexit.config import FORMAT_VERSION, FitConfig
from eexit.errors import AdapterError, EexitValueError

FILES = {"eexit_config.json", "eexit_adapter.safetensors", "README.md"}


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch) -> Path:
    """Every test runs offline against an empty cache of its own (the constants are read at import)."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def trained(factory=tiny_timm_vit, seed: int = 0, **attach_kwargs) -> eexit.EarlyExitModel:
    """An attached model with non-trivial heads and gates and a training record."""
    torch.manual_seed(seed)
    ee = eexit.attach(factory(), **attach_kwargs)
    spread_exits(ee, seed=seed)
    ee.fit_config = FitConfig(lam=0.25, epochs=2, warmup_epochs=1, progress=False)
    ee.history = [{"epoch": 0.0, "val_accuracy": 0.5, "val_cost_fraction": 0.75}, {"epoch": 1.0, "val_accuracy": 0.625}]
    ee.evaluation = {"accuracy": 0.75, "cost_fraction": 0.5, "split": "test", "exit_rate": [0.5, 0.25, 0.125, 0.125]}
    return ee


def fresh_copy(ee: eexit.EarlyExitModel, factory=tiny_timm_vit):
    """A new backbone with the same weights as ee's (a user's own copy of the base model)."""
    model = factory()
    model.load_state_dict(ee.backbone.state_dict())
    return model


def state_of(model) -> tuple:
    """What a failed load must leave unchanged: outputs, flags, modes, hooks."""
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5)).to(next(model.parameters()).dtype)
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(x) if type(model).__module__.startswith("timm") else model(pixel_values=x).logits
    model.train(was)
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    return out, [p.requires_grad for p in model.parameters()], [m.training for m in model.modules()], hooks


def assert_untouched(model, before: tuple) -> None:
    after = state_of(model)
    assert torch.equal(before[0], after[0]) and before[1:] == after[1:]
    eexit.detach(eexit.attach(model))  # not left attached


# ------------------------------------------------------------------------------------------ local round trip
@pytest.mark.parametrize("name", ["timm_vit_cls", "timm_vit_headless", "hf_vit_cls", "hf_vit_model"])
def test_local_round_trip_is_exact(tmp_path, name, images):
    factory, kwargs = ZOO[name].build, ZOO[name].attach
    ee = trained(factory, **kwargs)
    path = ee.save_pretrained(tmp_path / "ad")
    assert {p.name for p in path.iterdir()} == FILES
    with torch.no_grad():
        expected, every = ee(images), ee(images, all_exits=True)
    loaded = eexit.from_pretrained(fresh_copy(ee, factory), path)
    for key, value in ee.adapter_state_dict().items():
        assert torch.equal(value, loaded.adapter_state_dict()[key]), key
    # the resolved exit blocks are stored, so a later change of the default placement cannot move them
    assert loaded.config == dataclasses.replace(ee.config, exit_blocks=tuple(ee.exit_blocks))
    assert loaded.fit_config == ee.fit_config and loaded.history == ee.history and loaded.evaluation == ee.evaluation
    assert loaded.cost_table == ee.cost_table
    with torch.no_grad():
        got, got_every = loaded(images), loaded(images, all_exits=True)
    assert torch.equal(got.logits, expected.logits) and torch.equal(got.exit_index, expected.exit_index)
    assert torch.equal(got_every.gate_logits, every.gate_logits)


def test_saved_files_have_stable_names_and_metadata(tmp_path):
    ee = trained()
    path = hub.save_pretrained(ee, tmp_path)
    raw = (path / "eexit_adapter.safetensors").read_bytes()
    tensors = load_safetensors(raw)
    assert set(tensors) == {f"heads.{i}.net.{p}" for i in range(3) for p in ("weight", "bias")} | {
        f"gates.{i}.linear.{p}" for i in range(3) for p in ("weight", "bias")
    }
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    assert (
        header["library"] == "eexit"
        and header["format_version"] == str(FORMAT_VERSION)
        and header["backbone_family"] == "timm_vit"
    )
    assert all(isinstance(v, str) for v in header.values())
    meta = json.loads((path / "eexit_config.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["backbone"]["family"] == "timm_vit"
    assert meta["backbone"]["fingerprint"] == hub.backbone_fingerprint(ee.backbone)
    assert meta["tensors"]["sha256"] == hashlib.sha256(raw).hexdigest()
    assert meta["fit_config"]["lam"] == 0.25 and meta["num_classes"] == 5 and meta["feature_width"] == 32
    assert not (path / "adapter_config.json").exists() and not (path / "adapter_model.safetensors").exists()


def test_saving_the_same_adapter_twice_writes_the_same_bytes(tmp_path):
    ee = trained()
    first = folder_bytes(hub.save_pretrained(ee, tmp_path / "a"))
    assert folder_bytes(hub.save_pretrained(ee, tmp_path / "b")) == first  # stable diffs and Hub dedup


def test_generic_spec_adapter_needs_its_spec_again(tmp_path, images):
    spec = eexit.GenericSpec(blocks="blocks", pool="cls", norm="norm", num_classes=5, width=32)
    ee = trained(spec=spec, input_size=(3, 32, 32))
    path = hub.save_pretrained(ee, tmp_path)
    with pytest.raises(AdapterError, match="made with a GenericSpec; pass the same spec again"):
        eexit.from_pretrained(fresh_copy(ee), path)
    loaded = eexit.from_pretrained(fresh_copy(ee), path, spec=spec)
    with torch.no_grad():
        assert torch.equal(loaded(images).logits, ee(images).logits)


def test_model_card_front_matter_results_and_never_overwritten(tmp_path):
    ee = trained()
    path = hub.save_pretrained(ee, tmp_path, base_model="org/tiny-vit", base_model_revision="a" * 40)
    card = huggingface_hub.ModelCard.load(path / "README.md")
    assert card.data.library_name == "eexit" and card.data.base_model == "org/tiny-vit"
    assert {"eexit", "early-exit", "timm"} <= set(card.data.tags)
    assert "| `accuracy` | 0.75 |" in card.text and "```text" in card.text  # results table and text plot
    widths = ", ".join(str(w) for w in ee.feature_layout()[0])
    assert f"linear heads on features of width {widths}), " in card.text
    assert "hazard gates" in card.text
    (path / "README.md").write_text("my own card\n")
    ee.evaluation = None
    hub.save_pretrained(ee, path)
    assert (path / "README.md").read_text() == "my own card\n"
    assert json.loads((path / "eexit_config.json").read_text())["evaluation"] is None


def test_interrupted_save_leaves_the_previous_adapter_loadable(tmp_path, monkeypatch):
    old, new = trained(seed=0), trained(seed=1)
    new.backbone.load_state_dict(old.backbone.state_dict())
    path = hub.save_pretrained(old, tmp_path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    real = os.replace

    def crash_on_config(src, dst):  # fails while swapping the new files in; the save rolls back
        if Path(dst).name == "eexit_config.json":
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_config)
    with pytest.raises(OSError):
        hub.save_pretrained(new, path)
    monkeypatch.setattr(os, "replace", real)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before  # no temp files left either

    # A hard kill after the tensors were swapped: new tensors, previous config, previous tensors set aside.
    (path / hub.BACKUP_NAME).write_bytes(before["eexit_adapter.safetensors"])
    (path / "eexit_adapter.safetensors").write_bytes(hub._adapter_files(new, None, None, None).tensors)
    with pytest.warns(UserWarning, match="interrupted"):
        loaded = eexit.from_pretrained(fresh_copy(old), path)
    assert all(torch.equal(v, loaded.adapter_state_dict()[k]) for k, v in old.adapter_state_dict().items())
    hub.save_pretrained(new, path)  # the next save completes cleanly
    assert not (path / hub.BACKUP_NAME).exists()


def test_save_options(tmp_path):
    ee = trained()
    with pytest.raises(AdapterError, match="safetensors only"):
        hub.save_pretrained(ee, tmp_path, safe_serialization=False)
    assert hub.save_pretrained(ee, tmp_path / "rank1", is_main_process=False) == tmp_path / "rank1"
    assert not (tmp_path / "rank1").exists()
    with pytest.raises(AdapterError, match="no adapter named"):
        hub.save_pretrained(ee, tmp_path, adapter_name="nope")


def test_only_json_and_safetensors_are_read(tmp_path, monkeypatch):
    ee = trained()
    path = ee.save_pretrained(tmp_path)
    model = fresh_copy(ee)

    def refuse(*args, **kwargs):
        raise AssertionError("an adapter load must never unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr("pickle.load", refuse)
    monkeypatch.setattr("pickle.loads", refuse)
    eexit.from_pretrained(model, path)


# ------------------------------------------------------------------------------------------ fingerprint
def test_fingerprint_is_deterministic_and_sensitive():
    torch.manual_seed(0)
    model = tiny_timm_vit()
    first = hub.backbone_fingerprint(model)
    assert first.startswith("sha256:") and first == hub.backbone_fingerprint(model)
    ee = eexit.attach(model)
    assert hub.backbone_fingerprint(ee) == first  # heads and gates are not the backbone
    eexit.detach(ee)
    twin = tiny_timm_vit()
    twin.load_state_dict(model.state_dict())
    assert hub.backbone_fingerprint(twin) == first
    with torch.no_grad():
        weight = twin.blocks[2].mlp.fc1.weight
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(1e9))  # one ulp
    assert hub.backbone_fingerprint(twin) != first
    assert hub.backbone_fingerprint(model.double()) != first  # same values, another dtype


# ------------------------------------------------------------------------------------------ the Hub
def hub_cache(cache: Path, repo_id: str, refs: dict[str, dict[str, bytes]]) -> dict[str, str]:
    """Lay out ``models--org--name`` as huggingface_hub does: blobs, snapshots/<commit>/ links, refs/<ref>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commits = {}
    for ref, files in refs.items():
        commit = hashlib.sha1(ref.encode()).hexdigest()
        for rel, data in files.items():
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = repo / "snapshots" / commit / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            try:
                link.symlink_to(os.path.relpath(blob, link.parent))
            except OSError:  # no symlinks (Windows without developer mode): huggingface_hub copies too
                link.write_bytes(data)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        commits[ref] = commit
    return commits


def folder_bytes(folder: Path, prefix: str = "") -> dict[str, bytes]:
    return {f"{prefix}{p.name}": p.read_bytes() for p in folder.iterdir() if p.name in FILES}


def test_load_by_repo_id_revision_and_subfolder_from_the_cache(tmp_path, offline_hub, images):
    a, b = trained(seed=0), trained(seed=1)
    b.backbone.load_state_dict(a.backbone.state_dict())
    spread_exits(b, seed=7)
    pa, pb = hub.save_pretrained(a, tmp_path / "a"), hub.save_pretrained(b, tmp_path / "b")
    commits = hub_cache(
        offline_hub,
        "org/digits-exits",
        {
            "main": {**folder_bytes(pa), **folder_bytes(pb, "lam1/")},
            "v1": folder_bytes(pb),
        },
    )
    for kwargs, source in [
        ({}, a),
        ({"revision": "v1"}, b),
        ({"revision": commits["v1"]}, b),
        ({"subfolder": "lam1"}, b),
    ]:
        loaded = eexit.from_pretrained(fresh_copy(a), "org/digits-exits", **kwargs)
        with torch.no_grad():
            assert torch.equal(loaded(images).logits, source(images).logits), kwargs
    with pytest.raises(AdapterError, match="not in the local Hugging Face cache"):
        eexit.from_pretrained(fresh_copy(a), "org/other")
    with pytest.raises(AdapterError, match="not in the local Hugging Face cache"):
        eexit.from_pretrained(fresh_copy(a), "org/digits-exits", revision="v2")
    with pytest.raises(AdapterError, match="neither a local folder nor a valid Hub repo id"):
        eexit.from_pretrained(fresh_copy(a), "not a/valid//id")


@pytest.fixture
def fake_api(monkeypatch):
    """Replace only HfApi's network calls; record what they were asked."""
    calls: dict[str, list] = {"create_repo": [], "create_commit": [], "create_branch": []}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"].append((repo_id, kwargs))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        calls["create_commit"].append((repo_id, list(operations), kwargs))
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}",
            commit_message="",
            commit_description="",
            oid="0" * 40,
        )

    def create_branch(self, repo_id, **kwargs):
        calls["create_branch"].append((repo_id, kwargs))

    for name, fake in (
        ("create_repo", create_repo),
        ("create_commit", create_commit),
        ("create_branch", create_branch),
    ):
        monkeypatch.setattr(HfApi, name, fake)
    return calls


def test_push_makes_one_commit_with_exactly_three_files(fake_api, offline_hub, images):
    ee = trained()
    info = ee.push_to_hub("org/exits", private=True, commit_message="λ=0.25")
    assert info.oid == "0" * 40
    assert fake_api["create_repo"] == [("org/exits", {"private": True, "exist_ok": True, "repo_type": "model"})]
    assert fake_api["create_branch"] == []
    [(repo_id, operations, kwargs)] = fake_api["create_commit"]
    assert repo_id == "org/exits" and kwargs["commit_message"] == "λ=0.25" and kwargs["create_pr"] is False
    assert all(isinstance(op, CommitOperationAdd) for op in operations)
    assert sorted(op.path_in_repo for op in operations) == sorted(FILES)
    pushed = {op.path_in_repo: op.path_or_fileobj for op in operations}
    hub_cache(offline_hub, "org/exits", {"main": pushed})  # what a later pull would find
    loaded = eexit.from_pretrained(fresh_copy(ee), "org/exits")
    with torch.no_grad():
        assert torch.equal(loaded(images).logits, ee(images).logits)


def test_push_to_a_branch_or_pull_request(fake_api):
    ee = trained()
    hub.push_to_hub(ee, "org/exits", revision="lam-0.25", create_pr=True)
    assert fake_api["create_branch"] == [("org/exits", {"branch": "lam-0.25", "exist_ok": True, "repo_type": "model"})]
    [(_, operations, kwargs)] = fake_api["create_commit"]
    assert kwargs["revision"] == "lam-0.25" and kwargs["create_pr"] is True and len(operations) == 3


# ------------------------------------------------------------------------------------------ named adapters
def test_named_adapters_save_in_subfolders_and_load_back(tmp_path, images):
    ee = trained()
    ee.add_adapter("budget")
    ee.set_adapter("budget")
    spread_exits(ee, seed=3)
    with torch.no_grad():
        budget = ee(images).logits
    ee.set_adapter("default")
    path = hub.save_pretrained(ee, tmp_path, selected_adapters=["default", "budget"])
    assert {p.name for p in path.iterdir()} == FILES | {"budget"}
    loaded = eexit.from_pretrained(fresh_copy(ee), path)
    loaded.load_adapter(path, "budget", subfolder="budget")
    assert loaded.adapter_names == ["budget", "default"] and loaded.active_adapter == "default"
    loaded.set_adapter("budget")
    with torch.no_grad():
        assert torch.equal(loaded(images).logits, budget)
    with pytest.raises(AdapterError, match="exists already"):
        loaded.load_adapter(path, "budget", subfolder="budget")
    alone = hub.save_pretrained(ee, tmp_path / "alone", adapter_name="budget")
    assert json.loads((alone / "eexit_config.json").read_text())["adapter_name"] == "budget"
    only_sub = hub.save_pretrained(ee, tmp_path / "only-sub", selected_adapters=["budget"])
    with pytest.raises(AdapterError, match=r"subfolders \['budget'\]: pass subfolder="):
        eexit.from_pretrained(fresh_copy(ee), only_sub)


@pytest.mark.parametrize("bad", ["..", ".", "a/b", "a\\b", "", " padded"])
def test_adapter_names_that_cannot_be_folders_are_refused_when_given(tmp_path, bad):
    ee = trained()
    path = hub.save_pretrained(ee, tmp_path / "a")
    with pytest.raises(EexitValueError, match="adapter name"):
        ee.add_adapter(bad)
    with pytest.raises(AdapterError, match="adapter name"):
        ee.load_adapter(path, bad)  # refused before reading, not at the first save
    with pytest.raises(AdapterError, match="adapter name"):
        eexit.from_pretrained(fresh_copy(ee), path, adapter_name=bad)
    assert ee.adapter_names == ["default"]


def test_adapter_records_are_typed_snapshots(tmp_path):
    ee = trained(threshold=0.4)
    record = ee.adapter_record()
    assert isinstance(record, AdapterRecord) and record.threshold == 0.4 and record.fit_config == ee.fit_config
    assert record.state.keys() == ee.adapter_state_dict().keys()
    key = next(iter(record.state))
    record.state[key].zero_()  # a snapshot: changing it leaves the live exits alone
    assert ee.adapter_state_dict()[key].abs().sum() > 0
    ee.add_adapter("zeros", {"state": record.state, "threshold": 0.9})  # the dict form still works
    assert ee.adapter_record("zeros").threshold == 0.9 and ee.adapter_record("zeros").history == []
    with pytest.raises(EexitValueError, match="unknown adapter record fields"):
        ee.add_adapter("typo", {"state": record.state, "treshold": 0.9})
    with pytest.raises(EexitValueError, match="no adapter named"):
        ee.adapter_record("missing")


def test_each_adapter_keeps_its_own_threshold(tmp_path, images):
    ee = trained(threshold=0.3)
    path = hub.save_pretrained(ee, tmp_path / "strict")
    other = trained(threshold=0.8)
    other.backbone.load_state_dict(ee.backbone.state_dict())
    other.load_adapter(path, "strict")
    assert other.config.threshold == 0.8  # loading does not switch
    other.set_adapter("strict")
    assert other.config.threshold == 0.3 and other.default_policy().threshold == 0.3
    with torch.no_grad():
        assert torch.equal(other(images).exit_index, ee(images).exit_index)
    other.set_adapter("default")
    assert other.config.threshold == 0.8
    saved = hub.save_pretrained(other, tmp_path / "both", selected_adapters=["default", "strict"])
    assert json.loads((saved / "strict" / hub.CONFIG_NAME).read_text())["exit_config"]["threshold"] == 0.3
    assert json.loads((saved / hub.CONFIG_NAME).read_text())["exit_config"]["threshold"] == 0.8
    other.add_adapter("copy")  # a new adapter starts from the active one's threshold
    other.config = dataclasses.replace(other.config, threshold=0.6)
    other.set_adapter("copy")
    assert other.config.threshold == 0.8
    other.set_adapter("default")
    assert other.config.threshold == 0.6


def test_load_adapter_refuses_another_gate_kind(tmp_path):
    ee = trained()
    paper = trained(gates="paper")
    paper.backbone.load_state_dict(ee.backbone.state_dict())
    with pytest.raises(AdapterError, match="gates: 'hazard' vs 'paper'"):
        paper.load_adapter(hub.save_pretrained(ee, tmp_path), "hazard")
    assert paper.adapter_names == ["default"]


def test_load_adapter_refuses_an_adapter_that_does_not_fit(tmp_path):
    ee = trained()
    mlp = trained(head="mlp")
    mlp.backbone.load_state_dict(ee.backbone.state_dict())
    path = hub.save_pretrained(mlp, tmp_path)
    with pytest.raises(AdapterError, match="head: 'mlp' vs 'linear'"):
        ee.load_adapter(path, "mlp")
    assert ee.adapter_names == ["default"]
    other = trained(seed=4)
    with pytest.raises(AdapterError, match="ignore_fingerprint=True"):
        other.load_adapter(hub.save_pretrained(ee, tmp_path / "lin"), "x")
    assert other.adapter_names == ["default"]
