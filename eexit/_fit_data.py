"""Where :func:`eexit.fit` reads its batches from: the loaders, or the exit-feature cache built from them.

One process or many, every rank walks the same global batches (the same permutation) and computes its contiguous
share of each one's rows (:func:`batches`); the cache is in RAM for one process, on disk (built by every rank) with
``cache_dir`` or several processes (:func:`feature_cache`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .config import FitConfig
from .data import FeatureCache, check_images, check_labels, estimated_cache_bytes, unpack_batch
from .distributed import Dist
from .errors import EexitValueError
from .feature_store import disk_cache
from .model import AllExitsOutput, EarlyExitModel

__all__ = ["Batch", "GateStream", "batches", "cached_dataset", "check_cache", "feature_cache", "use_cache"]

#: Auto caching in RAM is skipped (with a warning) above this estimated size.
CACHE_LIMIT_BYTES = 4 * 1024**3

Batch = tuple["AllExitsOutput | None", "torch.Tensor | None", int]


def batches(
    ee: EarlyExitModel,
    source: FeatureCache | Iterable[Any],
    config: FitConfig,
    shuffle: bool,
    generator: torch.Generator,
    grad: bool,
    dist: Dist,
    autocast: torch.dtype | None = None,
) -> Iterator[Batch]:
    """(all-exit outputs, labels, global batch size) per batch, from the cache or from the loader.

    Every process walks the same global batches (the same permutation: the generators agree) and computes its
    contiguous share of each one's rows; outputs and labels are ``None`` where that share is empty.
    """
    device = next(ee.parameters()).device
    if isinstance(source, FeatureCache):
        for idx in source.batch_indices(config.batch_size, shuffle, generator):
            local = idx.tensor_split(dist.world)[dist.rank] if dist.active else idx
            if local.numel() == 0:
                yield None, None, idx.numel()
                continue
            feats, final, labels = source.take(local, device)
            with torch.set_grad_enabled(grad):
                yield ee.outputs_from_features(feats, final), labels, idx.numel()
        return
    if dist.active and type(getattr(source, "sampler", None)).__name__ == "DistributedSampler":
        raise EexitValueError(
            "the loader has a DistributedSampler, but eexit splits every batch over the processes itself: give every "
            "process the same loader over all the data (no DistributedSampler, no accelerator.prepare)."
        )
    for batch in source:
        images, labels = unpack_batch(batch)
        images = check_images(images, "train_loader" if grad else "val_loader")
        labels = check_labels(labels, ee.num_classes)
        total = labels.shape[0]
        if dist.active and not isinstance(images, torch.Tensor):
            raise EexitValueError(
                "training on batches of graphs runs in one process; several processes split image batches only. "
                "Launch without accelerate/torchrun."
            )
        if dist.active:  # the loader yields global batches; this process computes its share of the rows
            images, labels = images.tensor_split(dist.world)[dist.rank], labels.tensor_split(dist.world)[dist.rank]
            if labels.numel() == 0:
                yield None, None, total
                continue
        with torch.set_grad_enabled(grad), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            out = ee(images.to(device), all_exits=True)
        yield out, labels.to(device), total  # type: ignore[misc]


class GateStream:
    """Shuffled batches of the held-out gate split, without end (the gate phases' data when ``gate_data="val"``).

    Pass p is a permutation seeded by (seed, p), so the stream is known from (passes, position) alone, which a
    checkpoint stores, and agrees across processes.
    """

    def __init__(
        self, ee: EarlyExitModel, source: Any, config: FitConfig, dist: Dist, passes: int = 0, position: int = 0
    ) -> None:
        self.ee, self.source, self.config, self.dist = ee, source, config, dist
        self.passes, self.position = passes, position
        self._it: Iterator[Batch] | None = None

    def __next__(self) -> Batch:
        while True:
            try:
                if self._it is None:
                    gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.passes + 1)
                    self._it = batches(self.ee, self.source, self.config, True, gen, True, self.dist)
                    for _ in range(self.position):  # resuming mid-pass
                        next(self._it)
                batch = next(self._it)
            except StopIteration:
                self._it, self.passes, self.position = None, self.passes + 1, 0
                continue
            self.position += 1
            return batch


def check_cache(ee: EarlyExitModel, cache: FeatureCache, name: str, config: FitConfig) -> None:
    """Refuse a feature cache that cannot stand for this model's frozen backbone."""
    if config.train_backbone or config.cache_features is False:
        raise EexitValueError(
            f"{name} is a FeatureCache, but the config asks for train_backbone={config.train_backbone!r} and "
            f"cache_features={config.cache_features}: cached features only stand for a frozen backbone. Pass "
            "the data loader instead."
        )
    widths, with_head = ee.feature_layout()
    expected = [(w,) for w in widths]
    got = [tuple(f.shape[1:]) for f in cache.features]
    final_ok = (cache.final_logits is not None) == with_head and (
        cache.final_logits is None or cache.final_logits.shape[-1] == ee.num_classes
    )
    if got != expected or not final_ok:
        raise EexitValueError(
            f"{name}: the FeatureCache does not fit this model: expected exit features of widths {expected} and "
            f"{'head logits' if with_head else 'no head logits'}, got widths {got} and "
            f"{'no' if cache.final_logits is None else 'some'} head logits. Collect it with "
            "FeatureCache.collect(ee, loader, name) on this model."
        )
    check_labels(cache.labels, ee.num_classes)


def use_cache(ee: EarlyExitModel, train_loader: Iterable[Any], config: FitConfig, on_disk: bool) -> bool:
    if config.cache_features is not None:
        return config.cache_features
    if config.train_backbone:
        return False
    size = estimated_cache_bytes(ee, train_loader)
    if not on_disk and size is not None and size > CACHE_LIMIT_BYTES:
        warnings.warn(
            f"not caching exit features: they would take about {size / 1024**3:.1f} GiB of RAM. Every epoch will "
            "run the backbone; pass cache_dir= to cache them on disk, or cache_features=True to cache in RAM.",
            UserWarning,
            stacklevel=4,
        )
        return False
    return True


def feature_cache(
    ee: EarlyExitModel,
    loader: Iterable[Any],
    name: str,
    config: FitConfig,
    cache_dir: str | os.PathLike[str] | None,
    dist: Dist,
    autocast: torch.dtype | None,
) -> FeatureCache:
    """The loader's features: as given, in RAM (one process, no ``cache_dir``), or on disk, built by every rank."""
    if isinstance(loader, FeatureCache):
        return loader
    if cache_dir is None and not dist.active:
        return FeatureCache.collect(ee, loader, name, config.progress)
    dataset = cached_dataset(loader, name)
    batch_size = getattr(loader, "batch_size", None) or config.batch_size
    return disk_cache(
        ee,
        dataset,
        cache_dir,
        name=name.removesuffix("_loader"),
        batch_size=batch_size,
        num_workers=getattr(loader, "num_workers", 0),
        collate_fn=getattr(loader, "collate_fn", None),
        autocast=autocast,
        progress=config.progress,
        dist=dist,
    )


def cached_dataset(loader: Iterable[Any], name: str) -> Any:
    """What the loader yields, as the map-style dataset the disk cache stores: its dataset, or the subset its
    sampler draws from. Samplers that repeat, weight or shard items have no such dataset and are refused."""
    from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler, Subset, SubsetRandomSampler

    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise EexitValueError(
            f"{name}: the disk feature cache (cache_dir=, or several processes) reads a DataLoader over a map-style "
            f"dataset, got {type(loader).__name__}. Pass a torch DataLoader, or a FeatureCache you collected."
        )
    sampler = getattr(loader, "sampler", None)
    if getattr(loader, "batch_sampler", None) is not None and type(loader.batch_sampler).__name__ != "BatchSampler":
        sampler = loader.batch_sampler  # a custom batch sampler decides which items come
    if sampler is None or isinstance(sampler, SequentialSampler):
        return dataset
    if isinstance(sampler, RandomSampler) and not sampler.replacement and sampler.num_samples == len(dataset):
        return dataset  # the cache shuffles by itself
    if isinstance(sampler, SubsetRandomSampler):
        return Subset(dataset, sorted(int(i) for i in sampler.indices))
    why = (
        "it already splits the data over the processes; give every process the same loader over all the data "
        "(eexit splits each batch itself)"
        if isinstance(sampler, DistributedSampler)
        else "it repeats, weights or otherwise picks items, which a cache of each item once cannot reproduce"
    )
    raise EexitValueError(
        f"{name}: the feature cache stores each item of loader.dataset once, but this loader's sampler "
        f"({type(sampler).__name__}) {why}. Pass a loader over exactly the data to cache (e.g. "
        "DataLoader(Subset(dataset, indices))), or cache_features=False."
    )
