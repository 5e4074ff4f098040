"""Every adapter in the top-level ``adapters/`` folder still loads and still predicts what it predicted when it
was saved (issue 4, item 6): a change that breaks old files fails here. The folders are made by
``examples/make_reference_adapters.py``; ``adapters/README.md`` documents the format and the fixtures."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import eexit
from eexit import hub
from eexit.config import FORMAT_VERSION

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"
FOLDERS = sorted(p for p in ADAPTERS.iterdir() if (p / hub.CONFIG_NAME).is_file()) if ADAPTERS.is_dir() else []
FIXTURES = {"_test_backbone.safetensors", "_test_io.safetensors"}
MAX_BYTES = 200 * 1024


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # These are local folders; make sure a lookup can never fall through to the network.
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def rebuild_backbone(folder: Path) -> nn.Module:
    """The backbone the adapter was trained on, from the fixture's weights and recorded builder arguments."""
    path = folder / "_test_backbone.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["builder"] == "timm", f"{folder.name}: no rebuild recipe for builder {meta['builder']!r}"
    spec = json.loads(meta["spec"])
    model = timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"])
    dtype = getattr(torch, meta.get("load_dtype", "float32"))
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    model.load_state_dict(weights, strict=True)
    return model.eval()


def check_predictions(ee, io: dict[str, torch.Tensor], name: str) -> None:
    with torch.no_grad():
        out = ee(io["inputs"])
        every = ee(io["inputs"], all_exits=True)
    assert torch.equal(out.exit_index, io["exit_index"]), f"{name}: exit decisions changed"
    # Tolerances absorb float noise across CPUs and BLAS builds; the stored inputs decide far from the threshold.
    torch.testing.assert_close(out.logits, io["logits"], rtol=1e-4, atol=1e-4, msg=f"{name}: logits changed")
    torch.testing.assert_close(every.logits, io["all_logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(every.gate_logits, io["gate_logits"], rtol=1e-4, atol=1e-4)


def test_the_folder_holds_reference_adapters_and_documents_the_format():
    assert FOLDERS, f"no reference adapters in {ADAPTERS}; run examples/make_reference_adapters.py"
    doc = (ADAPTERS / "README.md").read_text()
    for word in (hub.CONFIG_NAME, hub.WEIGHTS_NAME, "format_version", "heads.{l}", "gates.{l}", "fingerprint"):
        assert word in doc, word


@pytest.mark.parametrize("folder", FOLDERS, ids=[p.name for p in FOLDERS])
def test_reference_adapter_is_complete_and_small(folder):
    names = {p.name for p in folder.iterdir()}
    assert names == {hub.CONFIG_NAME, hub.WEIGHTS_NAME, hub.CARD_NAME} | FIXTURES, names
    assert sum(p.stat().st_size for p in folder.iterdir()) < MAX_BYTES
    meta = json.loads((folder / hub.CONFIG_NAME).read_text())
    assert 1 <= meta["format_version"] <= FORMAT_VERSION
    assert (folder / hub.CARD_NAME).read_text().startswith("---\n")


@pytest.mark.parametrize("folder", FOLDERS, ids=[p.name for p in FOLDERS])
def test_reference_adapter_loads_and_predicts_as_saved(folder):
    ee = eexit.from_pretrained(rebuild_backbone(folder), folder)  # the fingerprint check proves the rebuild exact
    check_predictions(ee, load_file(str(folder / "_test_io.safetensors")), folder.name)
    assert ee.evaluation is not None and ee.fit_config is not None and ee.history


def test_adapters_of_one_backbone_load_side_by_side_as_named_adapters():
    groups: dict[tuple, list[Path]] = defaultdict(list)
    for folder in FOLDERS:
        meta = json.loads((folder / hub.CONFIG_NAME).read_text())
        exits = meta["exit_config"]
        gates = exits.get("gates", "paper")  # format-1 files have paper gates
        key = (meta["backbone"]["fingerprint"], gates, exits["head"], exits["head_hidden"], tuple(meta["exit_blocks"]))
        groups[key].append(folder)
    pairs = [group for group in groups.values() if len(group) > 1]
    if not pairs:
        pytest.skip("no two reference adapters share a backbone and an exit layout")
    first, *others = pairs[0]
    ee = eexit.from_pretrained(rebuild_backbone(first), first)
    for folder in others:
        ee.load_adapter(folder, folder.name)
    for folder in others:
        ee.set_adapter(folder.name)
        check_predictions(ee, load_file(str(folder / "_test_io.safetensors")), folder.name)
    ee.set_adapter("default")
    check_predictions(ee, load_file(str(first / "_test_io.safetensors")), first.name)
