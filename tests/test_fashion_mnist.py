"""The Fashion-MNIST loader, on small IDX files the test writes (and on the real files where installed)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch

from eexit import fashion_mnist
from eexit.errors import EexitValueError
from eexit.fashion_mnist import find_fashion_mnist, load_fashion_mnist


def _write_idx(folder: Path, n_train: int = 40, n_test: int = 12, packed: bool = True) -> None:
    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.arange(n, dtype=torch.uint8) % 10
        files = {
            f"{prefix}-images-idx3-ubyte": struct.pack(">IIII", 2051, n, 28, 28) + images.numpy().tobytes(),
            f"{prefix}-labels-idx1-ubyte": struct.pack(">II", 2049, n) + labels.numpy().tobytes(),
        }
        for name, data in files.items():
            if packed:
                with gzip.open(folder / f"{name}.gz", "wb") as f:
                    f.write(data)
            else:
                (folder / name).write_bytes(data)


def test_loads_gzipped_files_from_root_with_a_fixed_split(tmp_path):
    _write_idx(tmp_path / "src")
    splits = load_fashion_mnist(tmp_path / "src", val_size=10, cache_dir=tmp_path / "cache")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 10, 12)
    assert splits.train.tensors[0].shape == (30, 1, 28, 28) and splits.test.tensors[1].dtype == torch.long
    assert abs(float(splits.train.tensors[0].mean())) < 1e-4  # standardised on the training images
    again = load_fashion_mnist(tmp_path / "src", val_size=10, cache_dir=tmp_path / "cache")
    assert torch.equal(again.val.tensors[1], splits.val.tensors[1])  # the split is fixed
    limited = load_fashion_mnist(tmp_path / "src", val_size=10, limit=5, cache_dir=tmp_path / "cache")
    assert len(limited.train) == len(limited.val) == len(limited.test) == 5


def test_finds_plain_files_through_the_environment_variable(tmp_path, monkeypatch):
    _write_idx(tmp_path / "plain", packed=False)
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path / "plain"))
    assert find_fashion_mnist() == tmp_path / "plain"
    splits = load_fashion_mnist(val_size=8, cache_dir=tmp_path / "cache")
    assert len(splits.val) == 8


def test_missing_dataset_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "nothing")
    with pytest.raises(EexitValueError, match="apt-get install dataset-fashion-mnist"):
        find_fashion_mnist(tmp_path / "empty")
    _write_idx(tmp_path / "src")
    with pytest.raises(EexitValueError, match="val_size"):
        load_fashion_mnist(tmp_path / "src", val_size=40, cache_dir=tmp_path / "cache")
    with pytest.raises(EexitValueError, match="download=True needs root"):
        load_fashion_mnist(download=True)


@pytest.mark.skipif(not fashion_mnist.DEBIAN_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_the_real_files_load(tmp_path):
    splits = load_fashion_mnist(cache_dir=tmp_path)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (50_000, 10_000, 10_000)
    assert sorted(splits.test.tensors[1].unique().tolist()) == list(range(10))
