"""Reading batches from user loaders, and the exit-feature cache used when the backbone is frozen."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ._checks import all_finite, nonfinite_graph_field
from .errors import EexitTypeError, EexitValueError

if TYPE_CHECKING:
    from .model import EarlyExitModel

__all__ = ["FeatureCache", "check_loader", "unpack_batch"]

_IMAGE_KEYS = ("pixel_values", "image", "images", "img", "x")
_LABEL_KEYS = ("labels", "label", "targets", "target", "y")


def unpack_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels from a ``(images, labels)`` pair or a dict (``pixel_values``/``labels`` and alikes); a
    torch_geometric batch of graphs is its own input, with its labels in ``y``."""
    if is_graph_batch(batch):
        y = getattr(batch, "y", None)
        if y is None:
            raise EexitValueError("a batch of graphs needs its labels in `y` (one class index per graph).")
        graphs = int(getattr(batch, "num_graphs", 1))
        if y.numel() != graphs:
            raise EexitValueError(
                f"a batch of {graphs} graphs has labels `y` of shape {tuple(y.shape)}: expected one class index per "
                "graph (not one-hot, not one per node)."
            )
        return batch, y.view(-1)
    if isinstance(batch, dict):
        image_key = next((k for k in _IMAGE_KEYS if k in batch), None)
        label_key = next((k for k in _LABEL_KEYS if k in batch), None)
        if image_key is None or label_key is None:
            raise EexitValueError(
                f"a batch dict needs an image key {list(_IMAGE_KEYS)} and a label key {list(_LABEL_KEYS)}; "
                f"got keys {sorted(batch)}."
            )
        return batch[image_key], batch[label_key]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise EexitTypeError(
        f"a loader must yield (images, labels) pairs or dicts with 'pixel_values' and 'labels'; got "
        f"{type(batch).__name__}."
    )


def check_labels(labels: Any, num_classes: int) -> torch.Tensor:
    """Labels as a long tensor, refusing values outside [0, num_classes)."""
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.dim() != 1:
        raise EexitValueError(
            f"labels must be a 1-D tensor of class indices, got dtype {labels.dtype} and shape {tuple(labels.shape)}."
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise EexitValueError(
            f"labels must lie in [0, {num_classes}) for this {num_classes}-class model, got values in "
            f"[{int(labels.min())}, {int(labels.max())}]; check the dataset's label mapping or num_classes."
        )
    return labels.long()


def is_graph_batch(batch: Any) -> bool:
    """Whether ``batch`` is a torch_geometric ``Batch`` / ``Data`` (graph backbones' input)."""
    return hasattr(batch, "edge_index") and hasattr(batch, "x") and not isinstance(batch, (dict, tuple, list))


def check_images(images: Any, where: str) -> torch.Tensor:
    """Refuse non-tensors and NaN/Inf pixels (or node features), which would silently poison every exit's statistics."""
    if is_graph_batch(images):
        bad = nonfinite_graph_field(images)
        if bad is not None:
            raise EexitValueError(f"{where}: some graphs' {bad} values are NaN or Inf; clean the graphs.")
        return images
    if not isinstance(images, torch.Tensor):
        raise EexitTypeError(f"{where}: images must be a torch.Tensor, got {type(images).__name__}.")
    if images.is_floating_point() and not all_finite(images):
        raise EexitValueError(f"{where}: the images contain NaN or Inf values; clean or re-normalise the data.")
    return images


def check_loader(loader: Iterable[Any], name: str) -> None:
    """Refuse loaders that are known to be empty before any work is done."""
    try:
        length = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return
    if length == 0:
        raise EexitValueError(f"{name} is empty (len 0); give it at least one batch.")


@dataclass
class FeatureCache:
    """Pooled features of every IM exit, the backbone head's logits and the labels, for a whole dataset."""

    features: list[torch.Tensor]  # E_im x [N, D]
    final_logits: torch.Tensor | None  # [N, C]
    labels: torch.Tensor  # [N]
    #: Graph backbones: each sample's FLOPs at every exit [N, E] and of the bare backbone [N] (a graph's cost
    #: depends on its size, which the features do not keep); ``None`` for images and for the disk cache, where
    #: every sample is priced with the cost table.
    sample_flops: torch.Tensor | None = None
    backbone_flops: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def collect(cls, ee: EarlyExitModel, loader: Iterable[Any], name: str, progress: bool = True) -> FeatureCache:
        """Run the frozen backbone once over ``loader`` and keep what the exits read."""
        feats: list[list[torch.Tensor]] = []
        finals: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        costs: list[tuple[torch.Tensor, torch.Tensor]] = []
        per_sample = ee.cost_table is not None and ee.cost_table.per_sample
        device = next(ee.parameters()).device
        with torch.no_grad():
            for batch in tqdm(loader, desc=f"caching {name} features", disable=not progress, leave=False):
                images, y = unpack_batch(batch)
                images = check_images(images, name).to(device)
                labels.append(check_labels(y, ee.num_classes).to(device))
                exit_feats, final = ee.exit_features(images)
                feats.append(exit_feats)
                if final is not None:
                    finals.append(final)
                if per_sample:
                    costs.append(ee.sample_costs(images))
        if not labels:
            raise EexitValueError(f"{name} yielded no batch; give it at least one.")
        features = [torch.cat([f[k] for f in feats]) for k in range(len(feats[0]))]
        flops = torch.cat([c[0] for c in costs]).cpu() if costs else None
        bare = torch.cat([c[1] for c in costs]).cpu() if costs else None
        return cls(features, torch.cat(finals) if finals else None, torch.cat(labels), flops, bare)

    def batch_indices(
        self, batch_size: int, shuffle: bool, generator: torch.Generator | None = None
    ) -> Iterator[torch.Tensor]:
        """The row indices of each mini-batch (a permutation drawn from ``generator`` when shuffling)."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        yield from order.split(batch_size)

    def take(
        self, idx: torch.Tensor, device: torch.device | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor]:
        """Rows ``idx``: (features, final logits, labels), moved to ``device`` when given."""
        idx = idx.to(self.labels.device)
        final = self.final_logits[idx] if self.final_logits is not None else None
        feats, labels = [f[idx] for f in self.features], self.labels[idx]
        if device is not None:
            feats = [f.to(device, non_blocking=True) for f in feats]
            final = final.to(device, non_blocking=True) if final is not None else None
            labels = labels.to(device, non_blocking=True)
        return feats, final, labels

    def batches(
        self,
        batch_size: int,
        shuffle: bool,
        generator: torch.Generator | None = None,
        device: torch.device | None = None,
    ) -> Iterator[tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor]]:
        """Yield (features, final logits, labels) mini-batches."""
        for idx in self.batch_indices(batch_size, shuffle, generator):
            yield self.take(idx, device)

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self) / batch_size)


def estimated_cache_bytes(ee: EarlyExitModel, loader: Iterable[Any]) -> int | None:
    """Size in bytes of the feature cache :class:`FeatureCache` would build for ``loader`` (``None`` if the dataset
    size is unknown): every exit's feature at its own width, the backbone head's logits, the labels."""
    dataset = getattr(loader, "dataset", None)
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return None
    # Per-exit widths: hierarchical (Swin) and staged backbones have a different width at each exit.
    widths, with_head = ee.feature_layout()
    param = next(ee.backbone.parameters(), None)
    item = param.element_size() if param is not None else 4  # features come in the backbone's dtype
    per_sample = (sum(widths) + (ee.num_classes if with_head else 0)) * item + 8  # + the int64 label
    return n * per_sample
