"""Datasets named on the command line: a spec string becomes a map-style Dataset of ``(image tensor, label)``.

Specs: ``imagefolder:PATH`` (or a bare existing folder; ``PATH/[train/]<class>/*.png``), ``parquet:PATH`` (a folder
of parquet files), ``arrow:PATH`` (a ``Dataset.save_to_disk`` folder), ``hub:NAME`` (or a bare ``owner/name``; needs
the network or the cache). Images get the backbone's own eval-time preprocessing (:func:`preprocessing_for`), and
every label is checked against the model's class count on loading, so a wrong ``--num-classes`` fails at once
instead of as a CUDA assert in the middle of training.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import EexitTypeError, EexitValueError

if TYPE_CHECKING:
    import datasets
    from PIL import Image

__all__ = ["ImageDataset", "load_image_dataset", "preprocessing_for"]

_IMAGE_COLUMNS = ("image", "img", "pixel_values")
_LABEL_COLUMNS = ("label", "labels", "target", "fine_label")
_FORMS = "imagefolder:PATH, parquet:PATH, arrow:PATH, hub:NAME, a bare existing folder or a bare Hub name owner/name"
# Versioned salt: a change of what is hashed must not produce fingerprints that look comparable to old ones.
_SALT = "eexit-image-dataset-v1"
# A Hub name is "owner/name"; anything else with a "/" (./x, /data/x, a/b/c) is a mistyped local path.
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class _ToModelInput:
    """PIL image -> tensor: convert to the model's colour mode, then its transform. A class, not a lambda, so
    DataLoader workers can pickle it, and with a repr that names every step, since the repr is fingerprinted."""

    def __init__(self, mode: str, transform: Callable[[Any], torch.Tensor]) -> None:
        self.mode, self.transform = mode, transform

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image if image.mode == self.mode else image.convert(self.mode))

    def __repr__(self) -> str:
        return f"ToModelInput(mode={self.mode!r}, transform={self.transform!r})"


def _per_channel(values: Any, channels: int) -> tuple[float, ...]:
    # RGB statistics on a 1-channel model: grey pixels are the average of R, G and B, so use the averages.
    values = tuple(float(v) for v in values)
    return values if len(values) == channels else (sum(values) / len(values),) * channels


def _mode(channels: int, model: nn.Module) -> str:
    if channels not in (1, 3):
        raise EexitValueError(
            f"{type(model).__name__} takes {channels}-channel images; only 1- (grey) and 3-channel (RGB) models "
            "can be fed from image files, so preprocess this data yourself and pass a DataLoader."
        )
    return "RGB" if channels == 3 else "L"


def preprocessing_for(model: nn.Module) -> Callable[[Image.Image], torch.Tensor]:
    """The backbone's eval-time preprocessing: PIL image in, float tensor ``[C, H, W]`` out.

    * timm (``pretrained_cfg``): ``resolve_data_config`` + ``create_transform(is_training=False)``, at the model's
      own input size and channels (patch embedding ``img_size``, first conv), as ``pretrained_cfg`` keeps the
      checkpoint's (224 for a ViT built with ``img_size=32``).
    * transformers (``config.image_size``): resize to it (bilinear, no crop, as ``ViTImageProcessor``),
      ``ToTensor``, ``Normalize`` with the mean/std of a ``model.image_processor`` attribute, else of
      ``config.image_mean``/``image_std``, else 0.5 (ViT's default): no processor is downloaded.
    * An :class:`~eexit.EarlyExitModel`: its backbone's. Images are first converted to RGB (grey for 1 channel).

    Args:
        model: a timm or transformers image model, or an EarlyExitModel around one.

    Returns:
        A picklable callable whose ``repr`` names every step.

    Raises:
        EexitTypeError: ``model`` is not a torch module.
        EexitValueError: the model carries no data config to derive preprocessing from.
    """
    if not isinstance(model, nn.Module):
        raise EexitTypeError(f"preprocessing is derived from a torch.nn.Module, got {type(model).__name__}.")
    # Read through the class marker rather than an import of EarlyExitModel (keeps this module low in the layers).
    if getattr(type(model), "wraps_backbone", False):
        model = model.backbone
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if pretrained_cfg:
        import timm.data

        cfg = timm.data.resolve_data_config(pretrained_cfg=dict(pretrained_cfg), model=model)
        channels, height, width = cfg["input_size"]
        try:  # the first conv's channels are the model's own (in_chans=1 keeps an RGB pretrained_cfg)
            channels = model.get_submodule(pretrained_cfg.get("first_conv") or "").in_channels
        except AttributeError:
            pass
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if isinstance(img_size, (tuple, list)) and len(img_size) == 2 and all(isinstance(s, int) for s in img_size):
            height, width = img_size
        cfg.update(input_size=(channels, height, width))
        cfg.update(mean=_per_channel(cfg["mean"], channels), std=_per_channel(cfg["std"], channels))
        return _ToModelInput(_mode(channels, model), timm.data.create_transform(**cfg, is_training=False))
    config = getattr(model, "config", None)
    config = config if hasattr(config, "image_size") else getattr(config, "vision_config", None)
    if config is not None and getattr(config, "image_size", None) is not None:
        from torchvision import transforms

        size = config.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        channels = int(getattr(config, "num_channels", 3))
        processor = getattr(model, "image_processor", None)
        mean = getattr(processor, "image_mean", None) or getattr(config, "image_mean", None) or (0.5,)
        std = getattr(processor, "image_std", None) or getattr(config, "image_std", None) or (0.5,)
        steps = [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.ToTensor(),
            transforms.Normalize(_per_channel(mean, channels), _per_channel(std, channels)),
        ]
        return _ToModelInput(_mode(channels, model), transforms.Compose(steps))
    raise EexitValueError(
        f"could not derive preprocessing for a {type(model).__name__}: it has neither a timm pretrained_cfg nor a "
        "transformers config with image_size; give it one, or preprocess the data yourself and pass a DataLoader."
    )


class ImageDataset(torch.utils.data.Dataset):
    """A map-style dataset of ``(FloatTensor [C, H, W], int label)``, preprocessed for one model.

    Attributes:
        fingerprint: sha256 hex of the data (its ``datasets`` fingerprint, and for local folders their files'
            paths, sizes and mtimes), the split and the preprocessing; stable across runs, so usable as a cache key.
        num_classes: the model's class count every label was checked against.
        class_names: the label feature's names when it is a ``ClassLabel``, else None.
    """

    def __init__(
        self,
        data: datasets.Dataset,
        image_column: str,
        label_column: str,
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        fingerprint: str,
        num_classes: int,
        class_names: list[str] | None,
    ) -> None:
        # Only the two columns used: a row read then decodes no other image or array.
        self.data = data.select_columns([image_column, label_column])
        self.image_column, self.label_column, self.transform = image_column, label_column, transform
        self.fingerprint, self.num_classes, self.class_names = fingerprint, num_classes, class_names

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.data[int(index)]
        return self.transform(row[self.image_column]), int(row[self.label_column])

    def __repr__(self) -> str:
        return f"ImageDataset({len(self)} images, {self.num_classes} classes, fingerprint={self.fingerprint[:12]})"


def _parse(spec: str) -> tuple[str, str]:
    if os.path.isdir(spec):
        return "imagefolder", spec
    if os.path.exists(spec):
        raise EexitValueError(f"{spec} is a file; give the folder that holds the data ({_FORMS}).")
    kind, sep, target = spec.partition(":")
    if sep and kind in ("imagefolder", "parquet", "arrow", "hub") and target:
        return kind, target
    if not sep and _HUB_NAME.match(spec):
        return "hub", spec
    if not sep and "/" in spec:
        raise EexitValueError(f"dataset folder {spec} does not exist; check the path.")
    raise EexitValueError(f"unknown dataset spec {spec!r}; give one of {_FORMS}.")


def _files_digest(root: Path) -> str:
    # datasets' own fingerprint of a folder does not follow every edit (an arrow folder's is stored in its
    # state.json), so hash each file's relative path, size and mtime: a changed file changes the fingerprint.
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _read(kind: str, target: str, split: str | None, cache_dir: str | None) -> datasets.Dataset:
    import datasets

    if kind == "hub":
        try:
            return datasets.load_dataset(target, split=split or "train", cache_dir=cache_dir)
        except Exception as err:  # network, not found, gated, unknown split: all mean "cannot read it here"
            raise EexitValueError(
                f"could not load the Hub dataset {target!r} (split {split or 'train'!r}): {err}; check the name and "
                "network access, or download it and pass a local folder (imagefolder:PATH, parquet:PATH, arrow:PATH)."
            ) from err
    if not os.path.isdir(target):
        what = "is a file, not a folder" if os.path.exists(target) else "does not exist"
        raise EexitValueError(f"dataset folder {target} {what}; check the path.")
    try:
        if kind != "arrow":
            return datasets.load_dataset(kind, data_dir=target, split=split or "train", cache_dir=cache_dir)
        data = datasets.load_from_disk(target)
    except Exception as err:  # no images, unreadable files, unknown split: datasets' message says which
        # datasets refuses empty folders and splits itself, in two ways; name both as what they are.
        empty = getattr(datasets.data_files, "EmptyDatasetError", ())
        if isinstance(err, empty) or "corresponds to no data" in str(err):
            raise EexitValueError(
                f"dataset folder {target} is empty for split {split or 'train'!r} ({err}); point it at a folder or "
                "split that holds data."
            ) from err
        raise EexitValueError(f"could not read {target} as a {kind} dataset: {err}") from err
    if isinstance(data, datasets.DatasetDict):
        if (split or "train") not in data:
            raise EexitValueError(
                f"{target} has splits {sorted(data)}, not {split or 'train'!r}; pass one of them as the split."
            )
        return data[split or "train"]
    if split is not None:
        # A plain saved Dataset has no splits: evaluating "test" on it could silently be the training data.
        raise EexitValueError(f"{target} holds a single dataset without splits; drop the split {split!r}.")
    return data


def _columns(data: datasets.Dataset, where: str) -> tuple[str, str]:
    import datasets

    features = data.features
    image = next((c for c in _IMAGE_COLUMNS if c in features), None)
    image = image or next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
    label = next((c for c in _LABEL_COLUMNS if c in features), None)
    label = label or next((c for c, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    if image is None or label is None:
        raise EexitValueError(
            f"{where} has columns {list(features)}; it needs an image column (one of {list(_IMAGE_COLUMNS)} or an "
            f"Image feature) and a label column (one of {list(_LABEL_COLUMNS)} or a ClassLabel feature)."
        )
    if not isinstance(features[image], datasets.Image):
        raise EexitValueError(
            f"column {image!r} of {where} holds {features[image]}, not images; cast it with "
            f"dataset.cast_column({image!r}, datasets.Image()) and save it again."
        )
    return image, label


def load_image_dataset(
    spec: str, model: nn.Module, num_classes: int, *, split: str | None = None, cache_dir: str | None = None
) -> ImageDataset:
    """Read the dataset a spec string names, preprocessed for ``model``, with every label checked.

    Args:
        spec: ``imagefolder:PATH``, ``parquet:PATH``, ``arrow:PATH``, ``hub:NAME``, a bare existing folder
            (an image folder) or a bare Hub name ``owner/name``.
        model: the backbone (or EarlyExitModel) the images are for; see :func:`preprocessing_for`.
        num_classes: the model's class count; every label must lie in ``[0, num_classes)``.
        split: the split to read; ``"train"`` when None (a plain ``save_to_disk`` Dataset takes none).
        cache_dir: where ``datasets`` keeps its arrow cache; its default (``~/.cache/huggingface``) when None.

    Returns:
        The dataset, with ``fingerprint``, ``num_classes`` and ``class_names``.

    Raises:
        EexitTypeError: ``spec`` is not a string or ``model`` not a torch module.
        EexitValueError: unknown spec, missing folder, unreadable or empty data, no image or label column,
            labels that are not integers or lie outside ``[0, num_classes)``, or a model without data config.
    """
    if not isinstance(spec, str):
        raise EexitTypeError(f"a dataset spec is a string such as 'imagefolder:PATH', got {type(spec).__name__}.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise EexitValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    import datasets

    transform = preprocessing_for(model)  # first: a model without data config fails before any reading
    kind, target = _parse(spec)
    data = _read(kind, target, split, cache_dir)
    where = f"dataset {spec!r}" + (f" (split {split!r})" if split else "")
    if len(data) == 0:
        raise EexitValueError(f"{where} is empty; point it at a folder or split that holds images.")
    image, label = _columns(data, where)
    feature = data.features[label]
    labels = data.with_format("numpy", columns=[label])[:][label]
    if labels.dtype.kind not in "iu":
        raise EexitValueError(
            f"the labels of {where} (column {label!r}) are {labels.dtype}, not class indices; encode them with "
            f"dataset.class_encode_column({label!r})."
        )
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise EexitValueError(
            f"{where} has label {low} in column {label!r} (unlabelled rows, as in some test splits); use a labelled "
            "split or drop those rows."
        )
    if high >= num_classes:
        count = max(high + 1, len(names or ()))
        named = f" ({', '.join(names[:10])}{', ...' if count > 10 else ''})" if names else ""
        raise EexitValueError(
            f"{where} has {count} classes{named} but the model has {num_classes} outputs; pass --num-classes "
            f"{count} with a model of {count} outputs, or a dataset whose labels lie in [0, {num_classes})."
        )
    files = _files_digest(Path(target)) if kind != "hub" else None
    parts = [_SALT, kind, getattr(data, "_fingerprint", None), files, split or "train", repr(transform)]
    fingerprint = hashlib.sha256(json.dumps(parts).encode()).hexdigest()
    return ImageDataset(
        data, image, label, transform, fingerprint=fingerprint, num_classes=num_classes, class_names=names
    )
