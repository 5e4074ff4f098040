"""Epoch checkpoints of :func:`eexit.fit`, so a killed fit resumes where its last epoch ended.

A checkpoint is a folder ``epoch-<k>-<tag>/`` with ``state.safetensors`` (every tensor: the adapter, the best epoch's
adapter, the optimiser's buffers, the random generators' states; with ``train_backbone`` the backbone tensors the
fit trains: all of them, or with ``"lora"`` the PEFT adapter's trainable parameters and the buffers of the PEFT-only
modules that train with them) and ``state.json`` (everything else: epoch,
phase counter, history, the optimiser's hyper-parameters). Only safetensors and JSON are read back, so resuming
never unpickles anything. The folder is written under a temporary name and renamed, then ``latest.json`` is
replaced to point at it (an atomic rename): a fit killed while saving leaves the previous checkpoint as the
latest, never a half-written one.

:func:`save_fit_checkpoint` / :func:`load_fit_checkpoint` say what a fit's checkpoint holds and refuse one written
with other settings, for another backbone or on other data; :class:`FitRun` is how a fit runs (processes,
precision, cache and checkpoint folders), as opposed to what it learns (:class:`~eexit.FitConfig`).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._fingerprint import state_fingerprint
from .config import FitConfig
from .distributed import Dist
from .errors import EexitValueError

if TYPE_CHECKING:
    from .model import EarlyExitModel

__all__ = [
    "FitRun",
    "backbone_identity",
    "backbone_parameters",
    "backbone_state",
    "check_backbone_state",
    "load_backbone_state",
    "load_fit_checkpoint",
    "load_optimizer_state",
    "optimizer_state",
    "read_checkpoint",
    "save_fit_checkpoint",
    "write_checkpoint",
]

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


@dataclass
class FitRun:
    """How this fit runs (not what it learns): processes, precision, where caches and checkpoints go."""

    dist: Dist
    autocast: torch.dtype | None
    cache_dir: str | os.PathLike[str] | None
    checkpoint_dir: str | os.PathLike[str] | None
    resume: bool
    identity: dict[str, Any] = field(default_factory=dict)  # what a checkpoint must match: backbone and data


def config_digest(config: FitConfig) -> dict[str, Any]:
    """The settings that decide what a fit computes (not how it shows progress, nor which eexit wrote it)."""
    skip = {"progress", "eexit_version", "format_version"}
    return {k: v for k, v in config.to_dict().items() if k not in skip}


def data_identity(source: Any) -> Any:
    """What a checkpoint records of a split, to refuse resuming on other data."""
    key = getattr(source, "key", None)  # a disk cache
    if isinstance(key, str):
        return key
    try:
        return len(source.dataset) if hasattr(source, "dataset") else len(source)
    except TypeError:
        return None


def backbone_parameters(ee: EarlyExitModel, train_backbone: bool | str) -> dict[str, torch.nn.Parameter]:
    """The backbone parameters a fit with ``train_backbone`` trains, by name: none, every one (``True``), or the
    ones PEFT marked trainable before attach froze them (``"lora"``: the LoRA weights, and modules_to_save)."""
    if not train_backbone:
        return {}
    named = dict(ee.backbone.named_parameters())
    return {name: named[name] for name in ee.peft_trainable} if train_backbone == "lora" else named


def _lora_tensors(ee: EarlyExitModel) -> dict[str, torch.Tensor]:
    """The live backbone tensors a ``"lora"`` fit changes: the trainable PEFT parameters, and the (persistent)
    buffers of the PEFT-only modules in train mode meanwhile (:attr:`EarlyExitModel.peft_train_modules`: e.g. a
    BatchNorm inside a ``modules_to_save`` copy). Nothing of the base model: it stays in eval mode, frozen."""
    out: dict[str, torch.Tensor] = dict(backbone_parameters(ee, "lora"))
    persistent = set(ee.backbone.state_dict(keep_vars=True))
    for prefix in ee.peft_train_modules:
        for name, buffer in ee.backbone.get_submodule(prefix).named_buffers(prefix=prefix):
            if name in persistent:
                out[name] = buffer
    return out


def backbone_state(ee: EarlyExitModel, train_backbone: bool | str) -> dict[str, torch.Tensor]:
    """A copy of the backbone tensors a fit changes: its whole state dict (``True``), or with ``"lora"`` the PEFT
    adapter's trainable parameters and its train-mode modules' buffers (the frozen base is not copied); what a
    snapshot and a checkpoint keep."""
    if train_backbone == "lora":
        return {k: v.detach().clone() for k, v in _lora_tensors(ee).items()}
    return {k: v.detach().clone() for k, v in ee.backbone.state_dict().items()} if train_backbone else {}


def backbone_identity(ee: EarlyExitModel, train_backbone: bool | str) -> str | None:
    """What a checkpoint records of the backbone it was written on, to refuse resuming onto another one: the
    fingerprint of the whole backbone when it is frozen, of everything but what the fit trains with ``"lora"``
    (the base weights, and the LoRA layout), and ``None`` with ``True`` (the checkpoint holds the whole backbone)."""
    if train_backbone is True:
        return None
    state = ee.backbone.state_dict()
    if train_backbone == "lora":
        trained = set(_lora_tensors(ee))
        state = {k: v for k, v in state.items() if k not in trained}
    return state_fingerprint(state)


def check_backbone_state(ee: EarlyExitModel, train_backbone: bool | str, state: dict[str, torch.Tensor]) -> None:
    """Refuse, before anything is loaded, a saved LoRA state that does not name exactly the tensors trained here."""
    if train_backbone != "lora":
        return
    here = _lora_tensors(ee)
    if set(state) != set(here):
        raise EexitValueError(
            f"the saved LoRA state names other tensors than this model's PEFT adapter trains ({len(state)} saved, "
            f"{len(here)} here); resume with the same PeftModel, or use another checkpoint_dir."
        )


def load_backbone_state(ee: EarlyExitModel, train_backbone: bool | str, state: dict[str, torch.Tensor]) -> None:
    """Put back what :func:`backbone_state` copied (strictly: a LoRA state must name exactly the trained tensors)."""
    if train_backbone != "lora":
        ee.backbone.load_state_dict(state)
        return
    check_backbone_state(ee, train_backbone, state)
    with torch.no_grad():
        for name, tensor in _lora_tensors(ee).items():
            tensor.copy_(state[name])


def save_fit_checkpoint(
    ee: EarlyExitModel,
    run: FitRun,
    config: FitConfig,
    epoch: int,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    counters: dict[str, Any],
    best_state: dict[str, Any],
) -> None:
    tensors = {f"adapter.{k}": v for k, v in ee.adapter_state_dict().items()}
    tensors.update({f"best.{k}": v for k, v in best_state["adapter"].items()})
    if config.train_backbone:  # the whole backbone, or with "lora" only the PEFT adapter's trained tensors
        tensors.update({f"backbone.{k}": v for k, v in backbone_state(ee, config.train_backbone).items()})
        tensors.update({f"best_backbone.{k}": v for k, v in best_state["backbone"].items()})
    optim_tensors, optim_plain = optimizer_state(optimizer)
    tensors.update(optim_tensors)
    tensors["rng.generator"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    meta = {"config": config_digest(config), "optimizer": optim_plain, **run.identity, **counters}
    write_checkpoint(run.checkpoint_dir, epoch, tensors, meta)  # type: ignore[arg-type]


def load_fit_checkpoint(
    ee: EarlyExitModel,
    run: FitRun,
    config: FitConfig,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
    """Restore the latest checkpoint: returns (next epoch, counters, best state), or ``None`` without one."""
    found = read_checkpoint(run.checkpoint_dir)  # type: ignore[arg-type]
    if found is None:
        return None
    tensors, meta = found
    current = config_digest(config)
    if meta.get("config") != current:
        saved = meta.get("config") or {}
        changed = sorted(k for k in {*saved, *current} if saved.get(k) != current.get(k))
        raise EexitValueError(
            f"the checkpoint in {run.checkpoint_dir} was written by a fit with other settings ({changed}); resume "
            "with the same settings, or use another checkpoint_dir to start afresh."
        )
    if meta.get("backbone") != run.identity["backbone"]:
        lora = " (with train_backbone='lora': its base weights, or the layout of its PEFT adapter)"
        raise EexitValueError(
            f"the checkpoint in {run.checkpoint_dir} was written for another backbone"
            f"{lora if config.train_backbone == 'lora' else ''} (its weights differ); resume on the same backbone, "
            "or use another checkpoint_dir."
        )
    if meta.get("data") != run.identity["data"]:
        raise EexitValueError(
            f"the checkpoint in {run.checkpoint_dir} was written by a fit on other data (train/val {meta.get('data')}, "
            f"now {run.identity['data']}); resume on the same data, or use another checkpoint_dir."
        )

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    if config.train_backbone:  # checked before anything is loaded: a refused resume leaves ee as it was
        check_backbone_state(ee, config.train_backbone, part("backbone."))
        check_backbone_state(ee, config.train_backbone, part("best_backbone."))
    ee.load_adapter_state_dict(part("adapter."))
    best: dict[str, Any] = {"adapter": part("best.")}
    if config.train_backbone:
        load_backbone_state(ee, config.train_backbone, part("backbone."))
        best["backbone"] = part("best_backbone.")
    load_optimizer_state(optimizer, tensors, meta["optimizer"])
    generator.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
    if cuda and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return int(meta["epoch"]) + 1, meta, best
