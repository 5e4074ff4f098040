"""Safe reading and writing of backbone checkpoints, shared by the architectures in :mod:`eexit.models`.

Research checkpoints (T2T-ViT, Dynamic Perceiver, JEI-DNN's fine-tuned nets) are pickles written by timm-style
training scripts: a dict holding ``state_dict`` / ``state_dict_ema`` (or ``model`` / ``net``) next to an
``argparse.Namespace`` of the run's arguments and an optimizer state. Unpickling runs code, so we never call
``torch.load(weights_only=False)``: the weights-only unpickler is used with exactly one extra allowed type,
``argparse.Namespace``, and anything else is refused with a :class:`CheckpointError` that names the type.

``.safetensors`` files hold tensors only and are always safe; :func:`save_as_safetensors` converts a checked
pickle once, so later loads never touch pickle again.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eexit.errors import EexitValueError

__all__ = ["CheckpointError", "load_checkpoint_file", "load_into", "save_as_safetensors"]

#: The only non-tensor, non-builtin type official timm-style training checkpoints carry (``args``).
#: Keep this list minimal: each entry is a type an untrusted file may make us construct.
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)

_PICKLE_SUFFIXES = (".pth", ".pth.tar", ".pt", ".tar", ".ckpt", ".bin")
_STATE_DICT_KEYS = ("state_dict", "model", "net")
_EMA_KEYS = ("state_dict_ema", "model_ema")
_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")
_MAX_LISTED = 40  # keys listed per category in one error; the rest are counted


class CheckpointError(EexitValueError):
    """A checkpoint file cannot be read safely, holds no state dict, or does not fit the model."""


def load_checkpoint_file(path: str | os.PathLike[str], *, prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """Read a checkpoint file safely and return its bare state dict on the CPU.

    ``.safetensors`` files are read with safetensors; ``.pth``, ``.pth.tar``, ``.pt`` (and ``.tar``,
    ``.ckpt``, ``.bin``) with ``torch.load(weights_only=True)``, allowing only :data:`SAFE_GLOBALS` beside
    tensors and plain Python values. The state dict is taken from ``state_dict_ema`` / ``model_ema`` (if
    ``prefer_ema`` and present), else ``state_dict``, ``model``, ``net``, else the object itself when it is
    a flat dict of tensors (without ``prefer_ema`` the EMA keys are the last resort). A leading ``module.``
    (from ``DataParallel``) is stripped from every key.

    Args:
        path: The checkpoint file.
        prefer_ema: Take the EMA weights when the file has them (the official T2T-ViT evaluation does).

    Returns:
        The state dict, keys without ``module.``.

    Raises:
        CheckpointError: The file is missing, has an unknown suffix, pickles a type that is not allowed,
            or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No checkpoint file at {str(path)!r}. Check the path (it must be a file).")
    name = path.name.lower()
    if name.endswith(".safetensors"):
        from safetensors.torch import load_file  # lazy: keep `import eexit` light

        raw: Any = load_file(str(path), device="cpu")
    elif name.endswith(_PICKLE_SUFFIXES):
        raw = _safe_torch_load(path)
    else:
        raise CheckpointError(
            f"Unknown checkpoint suffix for {path.name!r}: expected .safetensors or one of "
            f"{', '.join(_PICKLE_SUFFIXES)}. Rename the file if it is a torch.save pickle."
        )
    return _strip_prefix(_unwrap(raw, path, prefer_ema=prefer_ema))


def _safe_torch_load(path: Path) -> Any:
    """``torch.load`` with the weights-only unpickler plus :data:`SAFE_GLOBALS`; refusals become errors."""
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = _refused_globals(path, str(err))
        raise CheckpointError(
            f"Refused to load {path.name!r}: it pickles {', '.join(refused)}, which is not on eexit's "
            f"allow-list (tensors, plain Python values and {', '.join(_qualname(t) for t in SAFE_GLOBALS)}). "
            "Unpickling an arbitrary type can run arbitrary code, so eexit never does it. If you trust this "
            "file, load it yourself with torch.load(path, weights_only=False), take its state dict and write "
            "it once with eexit.models._checkpoint.save_as_safetensors(state_dict, 'weights.safetensors')."
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(
            f"Cannot read {path.name!r} as a torch checkpoint ({type(err).__name__}: {err}). The file may be "
            "truncated or not a torch.save file; download or copy it again."
        ) from err


def _refused_globals(path: Path, message: str) -> list[str]:
    """Names of the pickled globals the weights-only unpickler refused, as precisely as torch tells us."""
    allowed = {_qualname(t) for t in SAFE_GLOBALS}
    names: list[str] = []
    try:  # zip-format files can be scanned for every offending global at once
        names = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
    except Exception:  # legacy (non-zip) files cannot be scanned; fall back to torch's message
        names = []
    if not names:
        names = _UNSAFE_GLOBAL.findall(message) or ["an unsupported object"]
    return names


def _qualname(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def _unwrap(raw: Any, path: Path, *, prefer_ema: bool) -> dict[str, torch.Tensor]:
    """Find the state dict inside a training checkpoint (or accept a bare one)."""
    if not isinstance(raw, Mapping):
        raise CheckpointError(
            f"{path.name!r} holds a {type(raw).__name__}, not a dict. Expected a state dict or a training "
            "checkpoint dict with 'state_dict', 'state_dict_ema', 'model' or 'net'."
        )
    # Without prefer_ema the EMA copy is still a fallback: a file holding only EMA weights is still usable.
    keys = (*_EMA_KEYS, *_STATE_DICT_KEYS) if prefer_ema else (*_STATE_DICT_KEYS, *_EMA_KEYS)
    for key in keys:
        inner = raw.get(key)
        if isinstance(inner, Mapping):
            raw = inner
            break
    bad = [k for k, v in raw.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{path.name!r} has no state dict under {', '.join(map(repr, keys))}, and its top level is not a "
            f"flat dict of tensors (non-tensor entries: {_listing(map(repr, bad))}). Pass a file saved from "
            "model.state_dict() or from a timm-style training script."
        )
    return {str(k): v for k, v in raw.items()}


def _strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """Drop the ``module.`` that ``DataParallel`` / DDP wrappers put in front of every key."""
    return {k.removeprefix(prefix): v for k, v in state_dict.items()}


def save_as_safetensors(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a state dict to ``path`` in safetensors format, atomically.

    The tensors go to a temporary file in the target folder, which then replaces ``path`` with
    ``os.replace``, so a crash never leaves a half-written file under the final name.

    Args:
        state_dict: Tensors to write. They are copied to contiguous CPU tensors first (safetensors refuses
            views and shared storage, which ``model.state_dict()`` can contain).
        path: Destination file, normally ending in ``.safetensors``.
        metadata: Optional string metadata stored in the file header.

    Returns:
        The path written.
    """
    from safetensors.torch import save_file  # lazy: keep `import eexit` light

    path = Path(path)
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"Only tensors can be saved as safetensors; non-tensor entries: {_listing(bad)}.")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique sibling name rather than mkstemp, whose 0600 mode would survive the rename and surprise users.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=dict(metadata) if metadata else None)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_into(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True
) -> nn.modules.module._IncompatibleKeys:
    """Load ``state_dict`` into ``model``, reporting every problem at once and by name.

    Shape mismatches are always an error (torch refuses them too, one at a time); each is listed with the
    model's expected shape and the checkpoint's shape. With ``strict``, missing and unexpected keys are an
    error as well; without it they are returned, as ``load_state_dict`` does.

    Args:
        model: The module to fill.
        state_dict: Parameters and buffers by name (as from :func:`load_checkpoint_file`).
        strict: Require the keys to match exactly.

    Returns:
        The missing and unexpected keys (both empty when ``strict``).

    Raises:
        CheckpointError: Some shapes differ, or (with ``strict``) some keys are missing or unexpected.
    """
    expected = model.state_dict()
    mismatched = [
        f"{k}: model expects {tuple(expected[k].shape)}, checkpoint has {tuple(v.shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es):\n{_listing(mismatched, sep=chr(10))}")
    if strict and missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if problems:
        raise CheckpointError(
            f"The checkpoint does not fit {type(model).__name__}.\n"
            + "\n".join(problems)
            + "\nCheck that the model was built with the same configuration (variant, num_classes, img_size) "
            "as the checkpoint, or drop the keys you mean to re-initialise before loading."
        )
    return model.load_state_dict(dict(state_dict), strict=False)


def _listing(items: Iterable[str], sep: str = ", ") -> str:
    """Join names for an error message, capped so a wholly wrong checkpoint still gives a readable error."""
    items = list(items)
    shown = sep.join(("  " + i) if sep == "\n" else i for i in items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f"{sep}... and {more} more" if more > 0 else "")
