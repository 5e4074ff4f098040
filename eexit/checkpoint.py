"""Epoch checkpoints of :func:`eexit.fit`, so a killed fit resumes where its last epoch ended.

A checkpoint is a folder ``epoch-<k>-<tag>/`` with ``state.safetensors`` (every tensor: the adapter, the best epoch's
adapter, the optimiser's buffers, the random generators' states) and ``state.json`` (everything else: epoch,
phase counter, history, the optimiser's hyper-parameters). Only safetensors and JSON are read back, so resuming
never unpickles anything. The folder is written under a temporary name and renamed, then ``latest.json`` is
replaced to point at it (an atomic rename): a fit killed while saving leaves the previous checkpoint as the
latest, never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import EexitValueError

__all__ = ["load_optimizer_state", "optimizer_state", "read_checkpoint", "write_checkpoint"]

_LATEST = "latest.json"


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimiser's state split into tensors (for safetensors) and plain values (for JSON)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                plain["state"].setdefault(str(index), {})[name] = value
    return tensors, plain


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], plain: dict[str, Any]
) -> None:
    """Inverse of :func:`optimizer_state`."""
    state: dict[int, dict[str, Any]] = {int(k): dict(v) for k, v in plain["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": plain["param_groups"]})


def write_checkpoint(
    folder: str | os.PathLike[str], epoch: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> Path:
    """Write epoch ``epoch``'s checkpoint atomically and make it the latest; older ones are removed."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".epoch-*.tmp"):  # left by a fit killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    tag = uuid.uuid4().hex[:8]
    staged = root / f".epoch-{epoch}-{tag}.tmp"
    staged.mkdir()
    try:
        save_file({k: v.detach().cpu().clone() for k, v in tensors.items()}, str(staged / "state.safetensors"))
        (staged / "state.json").write_text(json.dumps({"epoch": epoch, **meta}, indent=1))
        for name in ("state.safetensors", "state.json"):
            with open(staged / name, "rb") as handle:
                os.fsync(handle.fileno())
        final = root / f"epoch-{epoch}-{tag}"  # a new name: the latest checkpoint stays whole until the switch
        os.replace(staged, final)
        pointer = root / f".{_LATEST}.{uuid.uuid4().hex}.tmp"
        pointer.write_text(json.dumps({"latest": final.name}))
        os.replace(pointer, root / _LATEST)  # the switch: before it, the previous checkpoint is the latest
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
    for old in root.glob("epoch-*"):
        if old.name != final.name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(folder: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The latest checkpoint's tensors and values, or ``None`` when ``folder`` has none yet."""
    root = Path(folder)
    pointer = root / _LATEST
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["latest"]
        path = root / name
        meta = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "state.safetensors"))
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise EexitValueError(
            f"the checkpoint in {root} cannot be read ({type(err).__name__}: {err}); delete the folder to start "
            "the fit from scratch."
        ) from err
    return tensors, meta
