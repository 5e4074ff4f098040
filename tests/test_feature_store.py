"""The disk feature cache: same features as the in-memory cache, found again by key, refused for another model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import IMG, tiny_timm_vit

import eexit
from eexit.data import FeatureCache
from eexit.errors import EexitTypeError, EexitValueError
from eexit.feature_store import DiskFeatureCache, cache_key, data_fingerprint, disk_cache, open_disk_cache


def _data(n: int = 40, classes: int = 5, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 3, IMG, IMG, generator=g), torch.arange(n) % classes)


@pytest.fixture
def ee():
    torch.manual_seed(0)
    return eexit.attach(tiny_timm_vit())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_equals_the_in_memory_cache(ee, tmp_path, dtype):
    data = _data()
    memory = FeatureCache.collect(ee, torch.utils.data.DataLoader(data, batch_size=16), "data", progress=False)
    disk = disk_cache(ee, data, tmp_path, dtype=dtype, batch_size=7, progress=False)
    assert isinstance(disk, DiskFeatureCache) and len(disk) == len(memory)
    assert disk.features[0].dtype == dtype and torch.equal(disk.labels, memory.labels)
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for (fa, _, la), (fb, _, lb) in zip(disk.batches(9, True, gen_a), memory.batches(9, True, gen_b)):
        assert torch.equal(la, lb)  # shuffled reads give the same rows in the same order
        for a, b in zip(fa, fb):
            torch.testing.assert_close(a.float(), b, atol=tol * b.abs().max().item(), rtol=0)
    # A plain safetensors file: any reader opens it.
    from safetensors.torch import load_file

    raw = load_file(str(disk.path / "features.safetensors"))
    assert raw["features"].shape == (len(data), sum(ee.feature_layout()[0]))


def test_found_again_without_running_the_backbone(ee, tmp_path, monkeypatch):
    data = _data()
    first = disk_cache(ee, data, tmp_path, progress=False)
    monkeypatch.setattr(ee, "exit_features", lambda *a: pytest.fail("the backbone ran again"))
    again = disk_cache(ee, data, tmp_path, progress=False)
    assert again.path == first.path and torch.equal(again.features[1], first.features[1])


def test_unfinished_build_is_built_again(ee, tmp_path):
    data = _data()
    first = disk_cache(ee, data, tmp_path, progress=False)
    (first.path / "cache.json").unlink()  # as if killed before the build finished
    with pytest.raises(EexitValueError, match="no finished feature cache"):
        open_disk_cache(first.path)
    again = disk_cache(ee, data, tmp_path, progress=False)
    assert (again.path / "cache.json").is_file() and torch.equal(again.labels, first.labels)


def test_another_backbone_exit_placement_or_data_gets_another_key(ee, tmp_path):
    data = _data()
    key = cache_key(ee, data_fingerprint(data))
    torch.manual_seed(1)
    other_weights = eexit.attach(tiny_timm_vit())
    other_exits = eexit.attach(tiny_timm_vit(), exit_blocks=(1,))
    assert cache_key(other_weights, data_fingerprint(data)) != key
    assert cache_key(other_exits, data_fingerprint(data)) != key
    assert cache_key(ee, data_fingerprint(_data(seed=1))) != key
    assert cache_key(ee, data_fingerprint(data), torch.float32) != key
    assert data_fingerprint(_data()) == data_fingerprint(data)


def test_a_cache_opened_by_path_is_refused_for_another_model(ee, tmp_path):
    data = _data()
    cache = disk_cache(ee, data, tmp_path, progress=False)
    torch.manual_seed(1)
    other = eexit.attach(tiny_timm_vit())
    with pytest.raises(EexitValueError, match="another backbone, exit placement or dataset"):
        open_disk_cache(cache.path, other, data_fingerprint(data))
    with pytest.raises(EexitValueError, match="other backbone weights"):
        open_disk_cache(cache.path, other)  # without the data's key, the stored fingerprint still refuses it
    torch.manual_seed(0)
    fewer = eexit.attach(tiny_timm_vit(), exit_blocks=(1,))  # the same weights, other exits
    with pytest.raises(EexitValueError, match="another exit placement"):
        open_disk_cache(cache.path, fewer)
    assert open_disk_cache(cache.path, ee, data_fingerprint(data)).key == cache.key
    meta = json.loads((cache.path / "cache.json").read_text())
    meta["format"] = "something-else"
    (cache.path / "cache.json").write_text(json.dumps(meta))
    with pytest.raises(EexitValueError, match="not an eexit-feature-cache"):
        open_disk_cache(cache.path)
    (cache.path / "cache.json").write_text("{")
    with pytest.raises(EexitValueError, match="is damaged"):
        open_disk_cache(cache.path)


def test_bad_input(ee, tmp_path):
    with pytest.raises(EexitValueError, match="empty"):
        disk_cache(ee, _data(0), tmp_path, progress=False)
    with pytest.raises(EexitTypeError, match="map-style dataset"):
        disk_cache(ee, iter([]), tmp_path, progress=False)
    with pytest.raises(EexitValueError, match="dtype"):
        disk_cache(ee, _data(), tmp_path, dtype=torch.int8, progress=False)
    with pytest.raises(EexitValueError, match=r"labels must lie in \[0, 5\)"):
        disk_cache(ee, _data(classes=7), tmp_path, progress=False)
    bad = _data()
    bad.tensors[0][3, 0, 0, 0] = float("nan")
    with pytest.raises(EexitValueError, match="NaN"):
        disk_cache(ee, bad, tmp_path / "nan", progress=False)


def test_fit_on_disk_matches_fit_in_memory(tmp_path):
    data, val = _data(60), _data(30, seed=1)
    loaders = [torch.utils.data.DataLoader(d, batch_size=16) for d in (data, val)]
    states = []
    for cache_dir in (None, tmp_path):
        torch.manual_seed(0)
        ee = eexit.attach(tiny_timm_vit(), gates="paper")
        eexit.fit(ee, *loaders, lam=0.2, epochs=2, warmup_epochs=1, progress=False, cache_dir=cache_dir)
        states.append(ee.adapter_state_dict())
    assert len(list(tmp_path.glob("*/cache.json"))) == 2  # train and val
    for key in states[0]:  # fp16 storage of the features is the only difference
        torch.testing.assert_close(states[1][key], states[0][key], atol=2e-3, rtol=2e-3)


def test_fit_refuses_a_disk_cache_without_a_map_style_dataset(tmp_path):
    ee = eexit.attach(tiny_timm_vit())
    batches = [(torch.randn(4, 3, IMG, IMG), torch.arange(4))]
    with pytest.raises(EexitValueError, match="map-style"):
        eexit.fit(ee, batches, batches, epochs=1, warmup_epochs=0, progress=False, cache_dir=tmp_path)


def test_values_beyond_the_stored_dtype_and_dropped_samples_are_refused(ee, tmp_path, monkeypatch):
    exit_features = ee.exit_features

    def huge(x):
        feats, final = exit_features(x)
        return [f * 1e6 for f in feats], final

    monkeypatch.setattr(ee, "exit_features", huge)
    with pytest.raises(EexitValueError, match=r"not finite once stored as torch\.float16"):
        disk_cache(ee, _data(), tmp_path, progress=False)
    monkeypatch.undo()

    def dropping(items):
        return torch.utils.data.default_collate(items[1:])  # loses one sample per batch

    with pytest.raises(EexitValueError, match="drops samples"):
        disk_cache(ee, _data(), tmp_path, collate_fn=dropping, progress=False)
    assert not list(tmp_path.glob("*/cache.json")) and not list(tmp_path.glob("*/features.safetensors"))


def test_subsets_are_fingerprinted_by_their_indices_and_unknown_datasets_warn():
    data = _data()
    a, b = torch.utils.data.Subset(data, [0, 1, 2]), torch.utils.data.Subset(data, [0, 1, 3])
    assert data_fingerprint(a) != data_fingerprint(b)
    assert data_fingerprint(a) == data_fingerprint(torch.utils.data.Subset(_data(), [0, 1, 2]))

    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.full((3,), float(i)), i

    with pytest.warns(UserWarning, match="dataset.fingerprint"):
        data_fingerprint(Plain())
    named = Plain()
    named.fingerprint = "plain-v1"
    with pytest.warns(UserWarning):
        unnamed = data_fingerprint(Plain())
    assert data_fingerprint(named) != unnamed
