"""Exit features on disk: one memory-mapped cache shared by every epoch, λ, run and process.

With a frozen backbone the exits only ever read each sample's pooled features at every exit, so they are
computed once and stored. :class:`~eexit.data.FeatureCache` keeps them in RAM; for data that does not fit (an
ImageNet-size cache: 1.28 M images × 12 exits × 384 wide ≈ 12 GB in fp16) :func:`disk_cache` writes them to disk
and maps them back, so RAM holds only the pages in use and the kernel can drop them at will.

Layout: ``<root>/<key>/features.safetensors`` and ``<root>/<key>/cache.json``. The tensors file is a plain
safetensors file (any safetensors reader opens it) with ``features`` ``[N, ΣD]`` (every exit's feature side by
side, fp16 by default), ``final_logits`` ``[N, C]`` (only with a backbone head) and ``labels`` ``[N]`` int64.
Its header and size are fixed before any row is computed, so every rank writes its own rows in place
(``os.pwrite`` at the row's offset, by dataset index), and ``cache.json`` is written last: a folder without it
is an unfinished build and is built again.

The key is a sha256 of the backbone's weights (:func:`eexit._fingerprint.backbone_fingerprint`), the exit
placement (spec, exit blocks, feature widths), the data's fingerprint and the stored dtype: a cache made for
another backbone, exit placement or dataset is never found, and one opened by path is refused.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import mmap
import os
import shutil
import struct
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ._fingerprint import backbone_fingerprint
from .data import FeatureCache, check_images, check_labels, unpack_batch
from .distributed import Dist, current
from .errors import EexitTypeError, EexitValueError

if TYPE_CHECKING:
    from .model import EarlyExitModel

__all__ = ["DiskFeatureCache", "cache_key", "data_fingerprint", "default_cache_dir", "disk_cache", "open_disk_cache"]

logger = logging.getLogger("eexit")

_FORMAT = "eexit-feature-cache-v1"
_TENSORS, _META = "features.safetensors", "cache.json"
_DTYPES = {torch.float16: ("F16", np.float16), torch.bfloat16: ("BF16", np.uint16), torch.float32: ("F32", np.float32)}
_NAMES = {code: dtype for dtype, (code, _) in _DTYPES.items()}
_NUMPY = {"I64": np.int64, **{code: np_dtype for code, np_dtype in _DTYPES.values()}}


class DiskFeatureCache(FeatureCache):
    """A :class:`~eexit.data.FeatureCache` whose tensors are views of a memory-mapped file.

    Everything that takes a feature cache takes this one (``eexit.fit``, sweeps, baselines, ``collect_outputs``);
    mini-batches are gathered from the mapped file as they are read, in the stored dtype.
    """

    path: Path
    key: str

    def take(
        self, idx: torch.Tensor, device: torch.device | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor]:
        """Rows ``idx``, gathered from the file in ascending order (neighbouring rows share pages) and returned in
        the order asked."""
        order = torch.argsort(idx)
        feats, final, labels = super().take(idx[order], device)
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel())
        back = back.to(labels.device)
        return [f[back] for f in feats], final[back] if final is not None else None, labels[back]

    def __repr__(self) -> str:
        widths = [f.shape[1] for f in self.features]
        return f"DiskFeatureCache({len(self)} samples, widths={widths}, path={str(self.path)!r})"


def default_cache_dir() -> Path:
    """``$EEXIT_CACHE``, else ``~/.cache/eexit/features``."""
    return Path(os.environ.get("EEXIT_CACHE", Path.home() / ".cache" / "eexit" / "features"))


def data_fingerprint(dataset: Any) -> str:
    """A digest of what a dataset yields, for the cache key.

    Uses the dataset's own ``fingerprint`` attribute (set by :func:`eexit.image_data.load_image_dataset`; set it
    yourself on any dataset) or ``_fingerprint`` (Hugging Face ``datasets``); a torchvision folder dataset's file
    list and transform; a ``TensorDataset``'s bytes; a ``Subset``'s dataset and indices; otherwise the type, the
    length and the bytes of 8 evenly spaced items, with a warning: that last is a heuristic.
    """
    digest = hashlib.sha256(type(dataset).__name__.encode())
    for attr in ("fingerprint", "_fingerprint"):
        value = getattr(dataset, attr, None)
        if isinstance(value, str):
            digest.update(f"{attr}:{value}".encode())
            return digest.hexdigest()
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, list):  # torchvision DatasetFolder / ImageFolder
        for path, label in samples:
            stat = os.stat(path)
            digest.update(f"{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        digest.update(repr(getattr(dataset, "transform", None)).encode())
        return digest.hexdigest()
    tensors = getattr(dataset, "tensors", None)
    if isinstance(tensors, tuple):
        for t in tensors:
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(_as_bytes(t))
        return digest.hexdigest()
    indices = getattr(dataset, "indices", None)
    inner = getattr(dataset, "dataset", None)
    if indices is not None and inner is not None:  # torch.utils.data.Subset
        digest.update(data_fingerprint(inner).encode())
        digest.update(np.asarray(list(indices), dtype=np.int64).tobytes())
        return digest.hexdigest()
    warnings.warn(
        f"the feature cache identifies this {type(dataset).__name__} by its length and 8 sampled items; if its items "
        "can change without those changing (or are random, e.g. augmented), set dataset.fingerprint = '<a name for "
        "this exact data>' so a stale cache is never reused.",
        UserWarning,
        stacklevel=3,
    )
    n = len(dataset)
    digest.update(str(n).encode())
    for i in sorted({int(k * (n - 1) / 7) for k in range(8)} if n else set()):
        for part in _leaves(dataset[i]):
            digest.update(part)
    return digest.hexdigest()


def _leaves(item: Any) -> list[bytes]:
    if isinstance(item, torch.Tensor):
        return [f"{item.dtype}{tuple(item.shape)}".encode(), _as_bytes(item)]
    if isinstance(item, dict):
        return [b for k in sorted(item) for b in [str(k).encode(), *_leaves(item[k])]]
    if isinstance(item, (list, tuple)):
        return [b for v in item for b in _leaves(v)]
    return [repr(item).encode()]


def cache_key(
    ee: EarlyExitModel, data_key: str, dtype: torch.dtype = torch.float16, autocast: torch.dtype | None = None
) -> str:
    """The key a disk cache is stored and found under: backbone weights, exit placement, data, stored dtype and the
    precision the backbone ran in."""
    widths, with_head = ee.feature_layout()
    placement = {
        "format": _FORMAT,
        "spec": ee.spec.name,
        "exit_blocks": list(ee.exit_blocks),
        "widths": widths,
        "head_logits": ee.num_classes if with_head else 0,
        "dtype": _DTYPES[dtype][0],
        "autocast": str(autocast) if autocast is not None else None,
        "backbone": backbone_fingerprint(ee.backbone),
        "data": data_key,
    }
    return hashlib.sha256(json.dumps(placement, sort_keys=True).encode()).hexdigest()


def _layout(ee: EarlyExitModel, n: int, dtype: torch.dtype) -> dict[str, Any]:
    widths, with_head = ee.feature_layout()
    shapes = {"features": ([n, sum(widths)], _DTYPES[dtype][0])}
    if with_head:
        shapes["final_logits"] = ([n, ee.num_classes], _DTYPES[dtype][0])
    shapes["labels"] = ([n], "I64")
    return shapes


def _header(shapes: dict[str, Any], key: str) -> tuple[bytes, dict[str, Any]]:
    """The safetensors header for ``shapes`` (name -> (shape, dtype code)), padded to 8 bytes."""
    entries: dict[str, Any] = {"__metadata__": {"format": _FORMAT, "key": key}}
    offset = 0
    for name, (shape, code) in shapes.items():
        size = int(np.prod(shape)) * (8 if code == "I64" else 4 if code == "F32" else 2)
        entries[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, entries


def _read_header(path: Path) -> tuple[int, dict[str, Any]]:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > 1 << 20:
            raise EexitValueError(f"{path} is not an eexit feature cache (header of {length} bytes).")
        return 8 + length, json.loads(handle.read(length))


def open_disk_cache(
    folder: str | os.PathLike[str], ee: EarlyExitModel | None = None, data_key: str | None = None
) -> DiskFeatureCache:
    """Map a finished disk cache; with ``ee`` (and ``data_key``), refuse one made for another backbone or data.

    Raises:
        EexitValueError: the folder holds no finished cache, or one whose key does not match this model.
    """
    folder = Path(folder)
    meta_path, path = folder / _META, folder / _TENSORS
    if not meta_path.is_file() or not path.is_file():
        raise EexitValueError(
            f"{folder} holds no finished feature cache ({_META} or {_TENSORS} missing); build it with "
            "eexit.feature_store.disk_cache(ee, dataset, root)."
        )
    try:
        meta = json.loads(meta_path.read_text())
        _ = meta["key"], meta["widths"], meta["dtype"]  # present in every finished cache
    except (ValueError, KeyError, TypeError) as err:
        raise EexitValueError(f"{meta_path} is damaged ({err!r}); delete {folder} to build the cache again.") from err
    if meta.get("format") != _FORMAT:
        raise EexitValueError(f"{meta_path}: not an {_FORMAT} cache (format {meta.get('format')!r}).")
    if ee is not None:
        dtype = _NAMES[meta["dtype"]]
        if data_key is not None and cache_key(ee, data_key, dtype) != meta["key"]:
            raise EexitValueError(
                f"the feature cache at {folder} was made for another backbone, exit placement or dataset (key "
                f"{meta['key'][:12]}…, this model and data give {cache_key(ee, data_key, dtype)[:12]}…). Its features "
                "would be wrong for this model: build a new cache (another folder, or delete this one)."
            )
        if meta.get("backbone") not in (None, backbone_fingerprint(ee.backbone)):
            raise EexitValueError(
                f"the feature cache at {folder} was made from other backbone weights; its features would be wrong for "
                "this model. Build a new cache (another folder, or delete this one)."
            )
        widths, with_head = ee.feature_layout()
        placement_differs = meta.get("exit_blocks") not in (None, list(ee.exit_blocks))
        if placement_differs or meta["widths"] != widths or bool(meta["head_logits"]) != with_head:
            raise EexitValueError(
                f"the feature cache at {folder} stores exits of widths {meta['widths']}, this model's exits read "
                f"{widths}: it was made for another exit placement. Build a new cache."
            )
    start, header = _read_header(path)
    if header.get("__metadata__", {}).get("key") != meta["key"]:
        raise EexitValueError(f"{folder}: {_TENSORS} and {_META} disagree; delete the folder and build it again.")
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        lo, _ = entry["data_offsets"]
        # Copy-on-write mapping: writable (as torch.from_numpy wants) but never written back to the file.
        array = np.memmap(path, dtype=_NUMPY[entry["dtype"]], mode="c", offset=start + lo, shape=tuple(entry["shape"]))
        # Training reads rows in random order: the kernel's read-ahead would pull in ~30 rows around each one and,
        # once the file outgrows the page cache, evict what the next batch needs (measured: over 100x the file's
        # size read in one shuffled pass under a 1 GB cgroup). MADV_RANDOM reads only the pages asked for.
        if hasattr(mmap, "MADV_RANDOM") and getattr(array, "_mmap", None) is not None:
            array._mmap.madvise(mmap.MADV_RANDOM)
        tensor = torch.from_numpy(array)
        tensors[name] = tensor.view(torch.bfloat16) if entry["dtype"] == "BF16" else tensor
    bounds = np.cumsum([0, *meta["widths"]])
    cache = DiskFeatureCache(
        [tensors["features"][:, int(a) : int(b)] for a, b in itertools.pairwise(bounds)],
        tensors.get("final_logits"),
        tensors["labels"],
    )
    cache.path, cache.key = folder, meta["key"]
    return cache


def _size(num_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"


def _as_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def disk_cache(
    ee: EarlyExitModel,
    dataset: Any,
    root: str | os.PathLike[str] | None = None,
    *,
    name: str = "train",
    data_key: str | None = None,
    dtype: torch.dtype = torch.float16,
    batch_size: int = 64,
    num_workers: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    autocast: torch.dtype | None = None,
    progress: bool = True,
    dist: Dist | None = None,
) -> DiskFeatureCache:
    """The exit features of ``dataset`` on disk: found under ``root`` if built before, else built now.

    Under a multi-process launcher every rank computes and writes a contiguous share of the rows; all ranks
    return the same mapped cache. The backbone must stay frozen while the cache is used.

    Args:
        ee: the attached model (its backbone frozen).
        dataset: a map-style dataset of ``(image, label)`` items (or dicts, as loaders' batches).
        root: the cache folder (default :func:`default_cache_dir`); each cache gets a sub-folder named by its key.
        name: what the data is called in messages and progress bars.
        data_key: the data's identity in the key (default :func:`data_fingerprint`).
        dtype: stored dtype: ``torch.float16`` (default), ``torch.bfloat16`` or ``torch.float32``.
        batch_size, num_workers, collate_fn: how the backbone reads the data.
        autocast: run the backbone under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16`` on GPU).
        progress: a progress bar on the main rank.
        dist: the job (default: :func:`eexit.distributed.current`).

    Raises:
        EexitValueError: an empty dataset, labels outside the model's classes, NaN/Inf images, too little disk.
    """
    if dtype not in _DTYPES:
        raise EexitValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype}.")
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise EexitTypeError(
            f"{name}: the disk cache reads a map-style dataset (with __len__ and __getitem__), got "
            f"{type(dataset).__name__}; pass loader.dataset, or use the in-memory cache for iterable data."
        )
    dist = dist or current()
    n = len(dataset)
    if n == 0:
        raise EexitValueError(f"{name} is empty; give it at least one sample.")
    if data_key is None:
        data_key = data_fingerprint(dataset)
    # Rank 0's key for everyone: a dataset whose sampled items differ between processes (random transforms)
    # would otherwise give each rank another folder.
    key = dist.broadcast_text(cache_key(ee, data_key, dtype, autocast))
    folder = Path(root or default_cache_dir()) / key[:32]
    if dist.broadcast_text(str((folder / _META).is_file())) == "True":  # rank 0 decides: all build, or none
        return open_disk_cache(folder)
    head, entries = _header(_layout(ee, n, dtype), key)
    total = entries["labels"]["data_offsets"][1]
    error: BaseException | None = None
    # The rows go into a file private to this build; it becomes the cache only once every rank has written its
    # rows, so a concurrent build of the same cache, or a killed one, never leaves a half-written file in place.
    partial = folder / dist.broadcast_text(f".{_TENSORS}.{uuid.uuid4().hex}.tmp")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if free < total:
            raise EexitValueError(
                f"caching {name} features needs {_size(total)} on disk and {folder} has {_size(free)} free; "
                "pass another cache folder (root=, --cache-dir or $EEXIT_CACHE)."
            )
        if dist.is_main:
            kind = _DTYPES[dtype][0].lower()
            message = f"eexit: caching {name} features: {n} samples, {_size(total)} as {kind}, in {folder}"
            logger.info(message)
            if progress:
                tqdm.write(message)
            with open(partial, "wb") as handle:
                handle.write(head)
                handle.truncate(len(head) + total)  # sparse: the ranks write the rows below
    except Exception as err:  # re-raised by agree: here, and as a pointer to this rank on the others
        error = err
    dist.agree(error, f"preparing the {name} feature cache")
    try:
        if not partial.is_file():
            raise EexitValueError(
                f"{partial} is not visible from rank {dist.rank}: the cache folder must be on a file system every "
                "process sees (pass --cache-dir / cache_dir= on shared storage)."
            )
        args = (ee, dataset, partial, len(head), entries, dist, name, batch_size, num_workers, collate_fn)
        _write_rows(*args, autocast, progress)
    except Exception as err:
        error = err
    dist.agree(error, f"caching {name} features")
    if dist.is_main:
        widths, with_head = ee.feature_layout()
        meta = {
            "format": _FORMAT,
            "key": key,
            "name": name,
            "samples": n,
            "widths": widths,
            "head_logits": ee.num_classes if with_head else 0,
            "dtype": _DTYPES[dtype][0],
            "bytes": total,
            "backbone": backbone_fingerprint(ee.backbone),
            "exit_blocks": list(ee.exit_blocks),
        }
        os.replace(partial, folder / _TENSORS)
        staged = folder / f".{_META}.{uuid.uuid4().hex}.tmp"
        staged.write_text(json.dumps(meta, indent=2))
        os.replace(staged, folder / _META)  # the build is finished only once this file exists
    dist.barrier()
    return open_disk_cache(folder)


def _write_rows(
    ee: EarlyExitModel,
    dataset: Any,
    path: Path,
    start: int,
    entries: dict[str, Any],
    dist: Dist,
    name: str,
    batch_size: int,
    num_workers: int,
    collate_fn: Callable[[list[Any]], Any] | None,
    autocast: torch.dtype | None,
    progress: bool,
) -> None:
    """This rank's contiguous share of the rows, computed and written in place."""
    n = len(dataset)
    lo, hi = n * dist.rank // dist.world, n * (dist.rank + 1) // dist.world
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, range(lo, hi)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_fn,
    )
    device = next(ee.parameters()).device
    dtype = _NAMES[entries["features"]["dtype"]]
    row = {
        k: (v["data_offsets"][1] - v["data_offsets"][0]) // max(n, 1) for k, v in entries.items() if k != "__metadata__"
    }
    was_training = ee.training
    ee.eval()
    fd = os.open(path, os.O_WRONLY)
    try:
        bar = tqdm(total=hi - lo, desc=f"caching {name} features", disable=not (progress and dist.is_main), unit="img")
        index = lo
        for batch in loader:
            images, labels = unpack_batch(batch)
            images = check_images(images, name).to(device)
            labels = check_labels(labels, ee.num_classes)
            with torch.no_grad(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                feats, final = ee.exit_features(images)
            parts = {"features": torch.cat([f.float() for f in feats], dim=1).to(dtype), "labels": labels}
            if "final_logits" in entries:
                parts["final_logits"] = final.float().to(dtype)
            for key in ("features", "final_logits"):
                if key in parts and not bool(torch.isfinite(parts[key]).all()):
                    raise EexitValueError(
                        f"{name}: some exit features of samples {index}..{index + labels.shape[0] - 1} are not finite "
                        f"once stored as {dtype} (values beyond its range); build the cache with "
                        "dtype=torch.bfloat16 or torch.float32."
                    )
            for key, tensor in parts.items():
                os.pwrite(fd, _as_bytes(tensor), start + entries[key]["data_offsets"][0] + index * row[key])
            index += labels.shape[0]
            bar.update(labels.shape[0])
        bar.close()
        if index != hi:
            raise EexitValueError(
                f"{name}: the loader gave {index - lo} samples for rows {lo}..{hi - 1} ({hi - lo} expected); a "
                "collate_fn that drops samples would shift every later row's features and label. Filter the dataset "
                "instead."
            )
        os.fsync(fd)
    finally:
        os.close(fd)
        ee.train(was_training)
