"""The saved adapter format: building its files from a model, writing them atomically, reading them back.

One adapter is three files (``adapters/README.md`` documents every field):

* ``eexit_config.json``: format_version, backbone provenance and fingerprint, exit placement, configs, cost
  table, training record, evaluation, and the names, shapes and sha256 of the tensors;
* ``eexit_adapter.safetensors``: the IM and gate tensors only, under ``heads.{l}.*`` / ``gates.{l}.*``;
* ``README.md``: the model card (:mod:`eexit._card`).

Nothing here touches a model: :func:`parse_config` and :func:`read_tensors` validate the files completely,
so that :mod:`eexit.hub` can refuse a bad adapter before it attaches anything. Only JSON and safetensors are
ever read; nothing is unpickled. Writing and reading the folder itself (atomic swaps, recovery from a save
killed halfway) is :mod:`eexit._disk`'s job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .adapters import AdapterRecord
from .backbones.base import StagedSpec
from .config import FORMAT_VERSION, ExitConfig, FitConfig
from .cost import CostTable
from .errors import AdapterError, EexitError

if TYPE_CHECKING:
    from .model import EarlyExitModel

__all__ = [
    "BACKUP_NAME",
    "CARD_NAME",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "AdapterFiles",
    "SavedAdapter",
    "build_files",
    "config_bytes",
    "parse_config",
    "read_tensors",
    "safetensors_bytes",
]

CONFIG_NAME = "eexit_config.json"
WEIGHTS_NAME = "eexit_adapter.safetensors"
CARD_NAME = "README.md"
#: The previous tensor file while a save swaps files in; a save killed mid-swap is recovered from it on load.
BACKUP_NAME = f".{WEIGHTS_NAME}.previous"

# Top-level keys of format_version 1: name -> allowed JSON types (None allows null).
_REQUIRED: dict[str, tuple[type | None, ...]] = {
    "format_version": (int,),
    "backbone": (dict,),
    "exit_config": (dict,),
    "exit_blocks": (list,),
    "num_classes": (int,),
    "cost_table": (dict,),
    "tensors": (dict,),
}
_OPTIONAL: dict[str, tuple[type | None, ...]] = {
    "eexit_version": (str,),
    "library_name": (str,),
    "adapter_name": (str,),
    "exit_names": (list,),
    "num_exits": (int,),
    "has_backbone_head": (bool,),
    "feature_width": (int, None),
    "fit_config": (dict, None),
    "history": (list,),
    "evaluation": (dict, None),
    "boosted": (dict, None),
}


@dataclass
class AdapterFiles:
    """The bytes of one adapter's files and the config dict they were built from."""

    config: bytes
    tensors: bytes
    meta: dict[str, Any]
    #: How the card describes the exits (from the live model; not part of the saved format).
    exits: str

    def card(self) -> bytes:
        from ._card import render_card

        return render_card(self.meta, self.exits).encode()


@dataclass
class SavedAdapter:
    """A validated ``eexit_config.json``."""

    meta: dict[str, Any]
    source: str
    exit_config: ExitConfig
    fit_config: FitConfig | None
    cost_table: CostTable
    history: list[dict[str, Any]]
    evaluation: dict[str, Any] | None
    boosted: dict[str, Any] | None = None

    @property
    def backbone(self) -> dict[str, Any]:
        return self.meta["backbone"]

    @property
    def family(self) -> str:
        return self.meta["backbone"]["family"]

    @property
    def exit_blocks(self) -> list[int]:
        return self.meta["exit_blocks"]

    @property
    def num_classes(self) -> int:
        return self.meta["num_classes"]


def jsonable(value: Any, where: str) -> Any:
    """``value`` as plain JSON types: tensors and tuples become lists; NaN and ±inf become null (strict JSON)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        return jsonable(value.detach().cpu().tolist(), where)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value), where)
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return jsonable(value.tolist(), where)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise AdapterError(
        f"{where} holds a {type(value).__name__}, which cannot be stored in eexit_config.json; keep only numbers, "
        "strings, lists, dicts and tensors there."
    )


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Serialise tensors to safetensors bytes that are the same for the same content, run after run.

    safetensors writes its JSON header from a hash map, so the order of its keys (and the file's sha256)
    changes between runs; the header is rewritten here with sorted keys. Only the header moves: data offsets
    are relative to the end of the header.
    """
    from safetensors.torch import save  # lazy: keep `import eexit` light

    raw = save(tensors, metadata=metadata)
    size = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8 : 8 + size]), separators=(",", ":"), sort_keys=True).encode()
    header += b" " * (-len(header) % 8)  # keep the data 8-byte aligned, as safetensors does
    return len(header).to_bytes(8, "little") + header + raw[8 + size :]


def build_files(ee: EarlyExitModel, name: str, record: AdapterRecord, backbone: dict[str, Any]) -> AdapterFiles:
    """Serialise one adapter of ``ee`` (its tensors and training record) to the bytes of its files.

    Args:
        ee: the model holding the adapter.
        name: the adapter's name (stored for information).
        record: the adapter's snapshot (``ee.adapter_record(name)``).
        backbone: provenance and fingerprint of the backbone (``backbone`` field of the config).
    """
    from ._version import __version__

    if ee.cost_table is None:
        raise AdapterError("this model has no cost table, so its adapter cannot be saved; build it with eexit.attach.")
    # Clone to contiguous CPU tensors: safetensors refuses views and shared storage.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in sorted(record.state.items())}
    fit_config = record.fit_config
    header = {
        "format": "pt",
        "library": "eexit",
        "format_version": str(FORMAT_VERSION),
        "eexit_version": __version__,
        "adapter_name": name,
        "backbone_family": backbone["family"],
    }
    tensors = safetensors_bytes(state, metadata=header)
    # Each adapter keeps its own gate threshold (set_adapter switches it); records made before that have none.
    threshold = {"threshold": float(record.threshold)} if record.threshold is not None else {}
    meta = {
        "format_version": FORMAT_VERSION,
        "eexit_version": __version__,
        "library_name": "eexit",
        "adapter_name": name,
        "backbone": backbone,
        # The resolved blocks are stored, so a later change of the default placement cannot move the exits.
        "exit_config": dataclasses.replace(ee.config, exit_blocks=tuple(ee.exit_blocks), **threshold).to_dict(),
        "exit_blocks": list(ee.exit_blocks),
        "exit_names": list(ee.exit_names),
        "num_exits": ee.num_exits,
        "has_backbone_head": ee.has_backbone_head,
        "num_classes": ee.num_classes,
        "feature_width": int(ee.spec.feature_width(ee.backbone)),
        "cost_table": ee.cost_table.to_dict(),
        "fit_config": fit_config.to_dict() if fit_config is not None else None,
        "history": jsonable(list(record.history), "history"),
        "evaluation": jsonable(record.evaluation, "evaluation"),
        **({"boosted": jsonable(record.boosted, "boosted")} if record.boosted is not None else {}),
        "tensors": {
            "file": WEIGHTS_NAME,
            "sha256": hashlib.sha256(tensors).hexdigest(),
            "dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in state.values()}),
            "shapes": {k: list(v.shape) for k, v in state.items()},
        },
    }
    config = config_bytes(meta)
    widths = ", ".join(str(w) for w in ee.feature_layout()[0])
    if isinstance(ee.spec, StagedSpec):
        exits = f"fine-tuned copies of the backbone's own exit classifiers, on its stage features of width {widths}"
    else:
        head = ee.config.head + (f", hidden {ee.config.head_hidden}" if ee.config.head_hidden else "")
        exits = f"{head} heads on features of width {widths}"
    return AdapterFiles(config=config, tensors=tensors, meta=meta, exits=exits)


def config_bytes(meta: dict[str, Any]) -> bytes:
    """The bytes of ``eexit_config.json`` for ``meta`` (sorted keys, no NaN)."""
    return (json.dumps(meta, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def _type_names(types: tuple[type | None, ...]) -> str:
    return " or ".join(
        "null" if t is None else {dict: "object", list: "array", int: "integer"}.get(t, t.__name__) for t in types
    )


def _check_types(meta: dict[str, Any], source: str) -> None:
    missing = sorted(k for k in _REQUIRED if k not in meta)
    if missing:
        hint = " It looks like a PEFT adapter_config.json, which eexit cannot load." if "peft_type" in meta else ""
        raise AdapterError(
            f"{source} lacks the required field(s) {missing}; it is not a complete eexit adapter "
            f"config.{hint} Save the adapter again with ee.save_pretrained()."
        )
    for key, types in {**_REQUIRED, **_OPTIONAL}.items():
        if key not in meta:
            continue
        value = meta[key]
        ok = any(
            value is None if t is None else isinstance(value, t) and not (t is int and isinstance(value, bool))
            for t in types
        )
        if not ok:
            raise AdapterError(f"{source}: field {key!r} must be {_type_names(types)}, got {value!r}.")


def _check_backbone(meta: dict[str, Any], source: str) -> None:
    backbone = meta["backbone"]
    if not isinstance(backbone.get("family"), str) or not backbone["family"]:
        raise AdapterError(
            f"{source}: backbone.family must name the backbone spec (e.g. 'timm_vit'), got {backbone.get('family')!r}."
        )
    fingerprint = backbone.get("fingerprint")
    if fingerprint is not None and (not isinstance(fingerprint, str) or not fingerprint.startswith("sha256:")):
        raise AdapterError(f"{source}: backbone.fingerprint must be 'sha256:<hex>' or null, got {fingerprint!r}.")
    blocks = meta["exit_blocks"]
    if not blocks or any(not isinstance(b, int) or isinstance(b, bool) or b < 0 for b in blocks):
        raise AdapterError(f"{source}: exit_blocks must be a non-empty list of block indices, got {blocks!r}.")
    if meta["num_classes"] < 2:
        raise AdapterError(f"{source}: num_classes must be >= 2, got {meta['num_classes']}.")
    tensors = meta["tensors"]
    shapes = tensors.get("shapes")
    if (
        not isinstance(tensors.get("sha256"), str)
        or not isinstance(shapes, dict)
        or not all(isinstance(s, list) and all(isinstance(d, int) for d in s) for s in shapes.values())
    ):
        raise AdapterError(f"{source}: tensors must hold 'sha256' (hex string) and 'shapes' ({{name: [dims]}}).")


def parse_config(raw: bytes, source: str) -> SavedAdapter:
    """Validate the bytes of an ``eexit_config.json`` completely and build its configs.

    Unknown top-level keys (written by a newer eexit with the same format) are dropped with a warning; a
    ``format_version`` this eexit does not know is an error.

    Raises:
        AdapterError: the file is not JSON, misses a field, has a wrong type or value, or a newer format.
    """
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterError(
            f"{source} is not valid JSON ({err}); the file is truncated or corrupted. Save or "
            "download the adapter again."
        ) from None
    if not isinstance(meta, dict):
        raise AdapterError(f"{source} must hold a JSON object, got a {type(meta).__name__}.")
    version = meta.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise AdapterError(
            f"{source} has format_version={version}, but this eexit reads format_version 1..{FORMAT_VERSION}; it "
            "was saved by a newer eexit. Upgrade eexit (pip install -U eexit) to load it."
        )
    _check_types(meta, source)
    if version < 1:
        raise AdapterError(f"{source}: format_version must be >= 1, got {version}.")
    unknown = sorted(set(meta) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        warnings.warn(
            f"{source}: ignoring unknown keys {unknown} (written by eexit {meta.get('eexit_version', '?')}, "
            "a newer version?).",
            UserWarning,
            stacklevel=3,
        )
        meta = {k: v for k, v in meta.items() if k not in unknown}
    _check_backbone(meta, source)
    try:
        # Unknown keys inside these (from a newer eexit) are dropped by from_dict with its own warning.
        exit_config = ExitConfig.from_dict(meta["exit_config"])
        fit = FitConfig.from_dict(meta["fit_config"]) if meta.get("fit_config") is not None else None
        cost_table = CostTable.from_dict(meta["cost_table"])
    except (EexitError, KeyError, TypeError, ValueError) as err:
        raise AdapterError(
            f"{source}: invalid exit_config, fit_config or cost_table ({type(err).__name__}: {err})."
        ) from None
    if list(exit_config.exit_blocks or ()) != meta["exit_blocks"]:
        raise AdapterError(
            f"{source}: exit_config.exit_blocks {exit_config.exit_blocks} disagrees with "
            f"exit_blocks {meta['exit_blocks']}; the file was edited inconsistently."
        )
    if "num_exits" in meta and cost_table.num_exits != meta["num_exits"]:
        raise AdapterError(
            f"{source}: the cost table has {cost_table.num_exits} exits but num_exits is {meta['num_exits']}."
        )
    boosted = meta.get("boosted")
    if boosted is not None:
        gamma, head = boosted.get("gamma"), boosted.get("boost_head", False)
        valid = isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and math.isfinite(gamma) and gamma >= 0
        if not valid or not isinstance(head, bool) or set(boosted) - {"gamma", "boost_head"}:
            raise AdapterError(
                f'{source}: boosted must be {{"gamma": a number >= 0, "boost_head": true/false}}, got {boosted!r}.'
            )
        boosted = {"gamma": float(gamma), "boost_head": head}
    return SavedAdapter(
        meta=meta,
        source=source,
        exit_config=exit_config,
        fit_config=fit,
        cost_table=cost_table,
        history=list(meta.get("history") or []),
        evaluation=meta.get("evaluation"),
        boosted=boosted,
    )


def read_tensors(path: Path, saved: SavedAdapter) -> dict[str, torch.Tensor]:
    """Read ``eexit_adapter.safetensors`` after checking it is the file its config was saved with.

    Raises:
        AdapterError: the file is missing, its sha256 differs from the config's, it cannot be parsed, or its
            tensor names and shapes differ from those the config lists.
    """
    from safetensors.torch import load as safetensors_load

    if not path.is_file():
        raise AdapterError(
            f"{path} is missing: an eexit adapter needs {CONFIG_NAME} and {WEIGHTS_NAME} side by "
            "side. Save or download the adapter again."
        )
    raw = path.read_bytes()
    expected = saved.meta["tensors"]["sha256"]
    if hashlib.sha256(raw).hexdigest() != expected:
        raise AdapterError(
            f"{path} is not the tensor file {saved.source} was saved with (sha256 differs from the recorded "
            f"{expected[:12]}...): it was corrupted, modified, or a save was interrupted. Save or download the "
            "adapter again."
        )
    try:
        state = safetensors_load(raw)
    except Exception as err:  # safetensors raises its own SafetensorError (and others) on a bad header
        raise AdapterError(
            f"{path} is not a readable safetensors file ({type(err).__name__}: {err}); save or "
            "download the adapter again."
        ) from None
    listed = {k: tuple(v) for k, v in saved.meta["tensors"]["shapes"].items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if listed != found:
        diff = sorted(set(listed) ^ set(found)) or sorted(k for k in listed if listed[k] != found[k])
        raise AdapterError(
            f"{path} holds tensors {diff} that differ from those listed in {saved.source}; the two "
            "files do not belong together. Save or download the adapter again."
        )
    return state
