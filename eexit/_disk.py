"""An adapter's folder on disk: atomic writes that never lose the previous adapter, and reads that recover from a
save killed mid-way. The bytes themselves are :mod:`eexit._format`'s.

For a PEFT-wrapped backbone the folder also holds the PEFT adapter, written by peft itself (safetensors and JSON)
into ``peft_adapter/``: staged whole under a temporary name first, and its files' sha256 recorded in the eexit
config (``backbone.peft.files``); then the old ``peft_adapter/`` is moved aside to ``.peft_adapter.<tag>.previous``,
the new one swapped in, and the eexit files written, the config last. A save that *fails* puts the previous pair
back. A save *killed* part-way can leave the old config with no ``peft_adapter/`` or with the new one, the old PEFT
adapter then lying in ``.peft_adapter.<tag>.previous``; the loader (:func:`find_peft_folder`) picks whichever
PEFT folder matches the config's hashes (with a warning), and refuses, saying so, when none does. The next
successful save removes such leftovers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch

from ._format import (
    BACKUP_NAME,
    CARD_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterFiles,
    SavedAdapter,
    config_bytes,
    parse_config,
    read_tensors,
)
from ._peft import PEFT_FILES, PEFT_FOLDER
from .errors import AdapterError

__all__ = ["find_peft_folder", "peft_files_match", "read_folder", "stage_peft", "write_folder"]


def _peft_hashes(folder: Path) -> dict[str, str]:
    return {name: "sha256:" + hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in PEFT_FILES}


def peft_files_match(folder: Path, recorded: dict[str, str]) -> bool:
    """Whether ``folder`` holds the PEFT files whose sha256 an eexit config recorded."""
    try:
        return folder.is_dir() and _peft_hashes(folder) == recorded
    except OSError:
        return False


def find_peft_folder(folder: Path, saved: SavedAdapter) -> Path | None:
    """The PEFT adapter that belongs to the eexit adapter in the local ``folder``: ``peft_adapter/`` when its files
    have the sha256 the config recorded, else the leftover of a killed save that has them (with a warning);
    ``None`` when there is no PEFT folder at all (the fingerprint then explains "plain backbone").

    Raises:
        AdapterError: a PEFT folder is there but none matches the config (an interrupted save, or edited files).
    """
    local = folder / PEFT_FOLDER
    recorded = (saved.backbone.get("peft") or {}).get("files")
    if not recorded:  # saved before eexit recorded the hashes: take the folder as it is
        return local if local.is_dir() else None
    if peft_files_match(local, recorded):
        return local
    leftovers = sorted(p for p in folder.glob(f".{PEFT_FOLDER}.*") if p.is_dir())
    for candidate in leftovers:
        if peft_files_match(candidate, recorded):
            warnings.warn(
                f"{folder}: a save was interrupted; loading the PEFT adapter that belongs to {CONFIG_NAME} from "
                f"{candidate.name}. Save again to finish it.",
                UserWarning,
                stacklevel=4,
            )
            return candidate
    if local.is_dir() and not all((local / name).is_file() for name in PEFT_FILES):
        return local  # files missing: the loader says which (and that a pickle there is never read)
    if local.is_dir() or leftovers:
        raise AdapterError(
            f"{local} does not hold the PEFT adapter {folder / CONFIG_NAME} records (the sha256 of its files "
            "differ, and no leftover of an interrupted save matches): a save was interrupted, or the files were "
            "edited. Save the adapter again with ee.save_pretrained() from the PEFT-wrapped backbone."
        )
    return None


def _with_peft_hashes(files: AdapterFiles, hashes: dict[str, str]) -> AdapterFiles:
    backbone = dict(files.meta["backbone"])
    backbone["peft"] = {**backbone["peft"], "files": hashes}
    meta = {**files.meta, "backbone": backbone}
    return dataclasses.replace(files, meta=meta, config=config_bytes(meta))


def stage_peft(parent: Path, peft_model: Any, tag: str) -> Path:
    """Have peft write the active PEFT adapter into a new folder under ``parent``; returns that folder.

    peft puts an adapter not called ``"default"`` in a subfolder of its name; it is moved up, so the saved folder
    always holds ``adapter_config.json`` and ``adapter_model.safetensors`` at its top.
    """
    name = peft_model.active_adapter
    staged = parent / f".{PEFT_FOLDER}.{tag}.tmp"
    peft_model.save_pretrained(str(staged), safe_serialization=True, selected_adapters=[name])
    if name != "default":
        flat = parent / f".{PEFT_FOLDER}.{tag}.flat"
        os.replace(staged / name, flat)
        shutil.rmtree(staged)
        staged = flat
    return staged


def write_folder(folder: Path, files: AdapterFiles, peft_model: Any = None) -> None:
    """Write one adapter atomically, and with ``peft_model`` its backbone's PEFT adapter in ``peft_adapter/``.

    The PEFT adapter is written completely under a temporary name before anything is replaced, and its files'
    sha256 go into the eexit config, which is renamed in last; if writing the eexit files then fails before the
    config is in place, the previous PEFT adapter is put back. What a save killed part-way leaves is described in
    this module's docstring; :func:`find_peft_folder` recovers it.
    """
    if peft_model is None:
        _write_files(folder, files)
        return
    folder.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex
    target, previous = folder / PEFT_FOLDER, folder / f".{PEFT_FOLDER}.{tag}.previous"
    staged = None
    try:
        staged = stage_peft(folder, peft_model, tag)
        files = _with_peft_hashes(files, _peft_hashes(staged))
        if target.exists():
            os.replace(target, previous)
        try:
            os.replace(staged, target)
            _write_files(folder, files)
        except BaseException:
            config = folder / CONFIG_NAME
            if not (config.is_file() and config.read_bytes() == files.config):  # the new pair is not in place
                shutil.rmtree(target, ignore_errors=True)
                if previous.exists():
                    os.replace(previous, target)
            raise
        shutil.rmtree(previous, ignore_errors=True)
        for stale in folder.glob(f".{PEFT_FOLDER}.*"):  # what saves killed earlier left behind
            shutil.rmtree(stale, ignore_errors=True)
    finally:
        for stale in folder.glob(f".{PEFT_FOLDER}.{tag}.*"):
            if stale != previous:
                shutil.rmtree(stale, ignore_errors=True)


def _write_files(folder: Path, files: AdapterFiles) -> None:
    """Write one adapter's files atomically: stage every file, then swap them in; the card only if there is none."""
    folder.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex
    staged = {name: folder / f".{name}.{tag}.tmp" for name in (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME)}
    tensors, config, card = folder / WEIGHTS_NAME, folder / CONFIG_NAME, folder / CARD_NAME
    backup = folder / BACKUP_NAME
    swapped = False
    try:
        for name, data in ((WEIGHTS_NAME, files.tensors), (CONFIG_NAME, files.config)):
            _write_synced(staged[name], data)
        # The swap: the old tensors are kept aside until the new config is in place, so at every instant the
        # folder holds a consistent pair (the config's sha256 picks the right tensor file on load).
        if tensors.exists():
            os.replace(tensors, backup)
        swapped = True
        os.replace(staged[WEIGHTS_NAME], tensors)
        os.replace(staged[CONFIG_NAME], config)
        swapped = False
        backup.unlink(missing_ok=True)
        if not card.exists():  # a card that is there was perhaps edited by hand: never overwrite it
            _write_synced(staged[CARD_NAME], files.card())
            try:
                os.link(staged[CARD_NAME], card)  # fails if a card appeared meanwhile
            except FileExistsError:
                pass
            except OSError:  # no hard links on this file system
                os.replace(staged[CARD_NAME], card)
    finally:
        if swapped and backup.exists():  # failed mid-swap: put the previous tensors back
            os.replace(backup, tensors)
        for path in staged.values():
            path.unlink(missing_ok=True)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def read_folder(folder: Path) -> tuple[SavedAdapter, dict[str, torch.Tensor]]:
    """Read and validate the adapter in ``folder``, recovering from a save that was killed mid-swap."""
    saved = parse_config((folder / CONFIG_NAME).read_bytes(), str(folder / CONFIG_NAME))
    try:
        return saved, read_tensors(folder / WEIGHTS_NAME, saved)
    except AdapterError as first:
        backup = folder / BACKUP_NAME
        if not backup.is_file():
            raise
        try:  # killed between swapping the tensors and the config: the previous pair is intact
            state = read_tensors(backup, saved)
        except AdapterError:
            raise first from None
        warnings.warn(
            f"{folder}: a save was interrupted; loading the previous adapter. Save again to finish it.",
            UserWarning,
            stacklevel=4,
        )
        return saved, state
