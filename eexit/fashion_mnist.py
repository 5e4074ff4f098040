"""Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017): 70,000 real 28x28 photos of clothing, 10 classes.

The benchmark that decides accuracy-cost questions (DESIGN.md, "Metrics"): its 10,000 test images resolve
differences of a few tenths of a point, which the 360 test digits cannot. The images are read with
torchvision's ``FashionMNIST`` reader from the first place that has the four IDX files:

1. ``root=`` given by the caller;
2. the folder named by the environment variable ``EEXIT_FASHION_MNIST``;
3. Debian's package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).

The files may be gzipped (as Debian ships them): they are unpacked once into a cache folder, in the layout
torchvision expects (``<cache>/FashionMNIST/raw``). Where a network exists, ``download=True`` lets torchvision
fetch them instead.
"""

from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, TensorDataset

from .errors import EexitValueError

__all__ = [
    "DEBIAN_DIR",
    "ENV_VAR",
    "FashionMNISTSplits",
    "RawFashionMNIST",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_fashion_mnist_raw",
]

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "EEXIT_FASHION_MNIST"
_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass
class FashionMNISTSplits:
    """Train / validation / test tensors: images ``[N, 1, 28, 28]`` (standardised), labels ``[N]``.

    Validation is carved out of the official training file (never seen by a backbone trained on ``train``);
    test is the official 10,000-image test file.
    """

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset

    def loaders(self, batch_size: int = 256, seed: int = 0) -> tuple[DataLoader, DataLoader, DataLoader]:
        g = torch.Generator().manual_seed(seed)
        return (
            DataLoader(self.train, batch_size=batch_size, shuffle=True, generator=g),
            DataLoader(self.val, batch_size=batch_size),
            DataLoader(self.test, batch_size=batch_size),
        )


def _has_files(folder: Path) -> bool:
    return all((folder / f).is_file() or (folder / f"{f}.gz").is_file() for f in _FILES)


def find_fashion_mnist(root: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding the four Fashion-MNIST IDX files (plain or ``.gz``).

    Raises:
        EexitValueError: none of ``root``, ``$EEXIT_FASHION_MNIST`` and the Debian folder has them; the message
            says how to install them.
    """
    tried = []
    candidates = [Path(root)] if root is not None else []
    if os.environ.get(ENV_VAR):
        candidates.append(Path(os.environ[ENV_VAR]))
    candidates.append(DEBIAN_DIR)
    for folder in candidates:
        for sub in (folder, folder / "FashionMNIST" / "raw"):
            if _has_files(sub):
                return sub
        tried.append(str(folder))
    raise EexitValueError(
        f"Fashion-MNIST not found (looked in {', '.join(tried)} for {', '.join(_FILES)}, plain or .gz). Install "
        f"it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four IDX files in a folder "
        f"and pass root=... or set {ENV_VAR}."
    )


def _torchvision_root(source: Path, cache: Path) -> Path:
    """A root in torchvision's layout (``root/FashionMNIST/raw/<file>``), unpacking gzipped files once."""
    if source.name == "raw" and source.parent.name == "FashionMNIST" and all((source / f).is_file() for f in _FILES):
        return source.parent.parent
    raw = cache / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in _FILES:
        target = raw / name
        if target.is_file():
            continue
        plain, packed = source / name, source / f"{name}.gz"
        tmp = raw / f".{name}.tmp"
        if plain.is_file():
            shutil.copyfile(plain, tmp)
        else:
            with gzip.open(packed, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
        tmp.replace(target)  # atomic: a killed unpack never leaves a truncated file behind
    return cache


class RawFashionMNIST(NamedTuple):
    """The two IDX files as read (uint8 images ``[N, 28, 28]``, long labels) and the seeded train / val split."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    train_ix: torch.Tensor
    val_ix: torch.Tensor


def read_fashion_mnist_raw(
    root: str | os.PathLike[str] | None = None,
    *,
    val_size: int = 10_000,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
) -> RawFashionMNIST:
    """The raw images and labels of both files, and the indices of :func:`load_fashion_mnist`'s split.

    The arguments mean what they mean for :func:`load_fashion_mnist`, which builds its splits from this.
    """
    from torchvision.datasets import FashionMNIST

    if download:
        if root is None:
            raise EexitValueError("download=True needs root=..., the folder to download Fashion-MNIST into.")
        tv_root = Path(root)
    else:
        cache = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "eexit"
        tv_root = _torchvision_root(find_fashion_mnist(root), cache)
    train_file = FashionMNIST(str(tv_root), train=True, download=download)
    test_file = FashionMNIST(str(tv_root), train=False, download=download)
    y_all = train_file.targets.long()
    if not 0 < val_size < len(y_all):
        raise EexitValueError(f"val_size must be in (0, {len(y_all)}), got {val_size}.")
    order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(seed))
    return RawFashionMNIST(
        train_file.data, y_all, test_file.data, test_file.targets.long(), order[val_size:], order[:val_size]
    )


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None,
    *,
    val_size: int = 10_000,
    seed: int = 0,
    limit: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
) -> FashionMNISTSplits:
    """Load Fashion-MNIST with a fixed split: 50,000 train, 10,000 validation (from the training file), 10,000 test.

    Args:
        root: a folder with the IDX files (see the module docstring for where else they are looked for).
        val_size: images of the official training file held out as validation.
        seed: seed of the train / validation split (fixed by default, so every run sees the same images).
        limit: keep only the first ``limit`` images of each split (for quick tests).
        cache_dir: where gzipped files are unpacked (default ``~/.cache/eexit``).
        download: let torchvision download the files into ``root`` (needs a network and ``root``).

    Returns:
        The three splits, standardised with the training images' mean and standard deviation.
    """
    raw = read_fashion_mnist_raw(root, val_size=val_size, seed=seed, cache_dir=cache_dir, download=download)
    x_all = raw.train_images.float().unsqueeze(1) / 255.0  # [60000, 1, 28, 28]
    y_all = raw.train_labels
    train_ix, val_ix = raw.train_ix, raw.val_ix
    mean, std = x_all[train_ix].mean(), x_all[train_ix].std()  # statistics of the training images only
    x_test = (raw.test_images.float().unsqueeze(1) / 255.0 - mean) / std
    x_all = (x_all - mean) / std

    def cut(x: torch.Tensor, y: torch.Tensor) -> TensorDataset:
        return TensorDataset(x[:limit], y[:limit]) if limit is not None else TensorDataset(x, y)

    return FashionMNISTSplits(
        cut(x_all[train_ix], y_all[train_ix]),
        cut(x_all[val_ix], y_all[val_ix]),
        cut(x_test, raw.test_labels),
    )
