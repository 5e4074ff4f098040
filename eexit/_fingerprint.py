"""Backbone identity: fingerprints of its weights, and the checks that an adapter fits a backbone.

PEFT records the base model's name and revision but never checks that an adapter is loaded onto those
weights (peft issues #276, #1443, #1932: mismatches surface, if ever, as shape errors). eexit stores two
digests of the backbone with every adapter and checks them on load:

* the **fingerprint**: sha256 over every entry of ``backbone.state_dict()`` (parameters and persistent buffers),
  in sorted name order, of its name, dtype, shape and raw bytes. Any change of a weight, a dtype or the
  architecture changes it. Non-persistent buffers (derived tables such as position ids) are not covered, nor
  anything outside the state dict (the forward code, hooks, module flags).
* the **structure fingerprint**: the same over names and shapes only, so a mismatch can be explained as "another
  architecture", "the same architecture in another dtype" or "the same architecture, other weights".

A PEFT-wrapped backbone (``peft.PeftModel``) is fingerprinted through the model it wraps, whose state dict holds
the injected layers' weights too (``...qkv.lora_A.default.weight``): an adapter trained on a LoRA-adapted backbone
fits neither the plain backbone nor another LoRA. The PEFT adapter's own tensors are also digested apart
(``peft.fingerprint``), so a mismatch can say which part differs.

Bytes are hashed as stored in memory (little-endian on every platform torch supports), after a copy to the
CPU. Hashing runs at roughly 1 GB/s: about 0.3 s for a ViT-B/16.

The fit checks (:func:`spec_for`, :func:`check_structure`, :func:`check_fingerprint`) run on a validated config
before anything is attached, so a refused adapter leaves the model untouched.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._peft import PEFT_FOLDER, adapter_settings, adapter_tensors, describe_peft, is_peft_model
from .errors import AdapterError, EexitError, EexitValueError

if TYPE_CHECKING:
    from ._format import SavedAdapter
    from .backbones.base import BackboneSpec

__all__ = [
    "backbone_fingerprint",
    "check_fingerprint",
    "check_structure",
    "explain_mismatch",
    "fingerprint_info",
    "made_for",
    "spec_for",
    "state_fingerprint",
    "structure_fingerprint",
]

# Versioned salt: a future change of what is hashed must not produce digests that look comparable.
_SALT = b"eexit-backbone-fingerprint-v1\0"


def _backbone(model: nn.Module) -> nn.Module:
    # An EarlyExitModel keeps the user's model as `.backbone`; its heads and gates are not the backbone. Read
    # through its class marker rather than an import, so this module stays below the model in the layering.
    # A PeftModel is read through the model it wraps (which holds the injected layers), as attach does.
    if getattr(type(model), "wraps_backbone", False):
        return model.backbone
    return model.get_base_model() if is_peft_model(model) else model


def _peft_wrapper(model: nn.Module) -> nn.Module | None:
    """The PeftModel around the backbone, if any (given the PeftModel itself or an EarlyExitModel)."""
    if getattr(type(model), "wraps_backbone", False):
        return model.peft_model
    return model if is_peft_model(model) else None


def _entries(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    if not isinstance(model, nn.Module):
        raise EexitValueError(f"a fingerprint is taken of a torch.nn.Module, got {type(model).__name__}.")
    return _sorted_entries(_backbone(model).state_dict())


def _sorted_entries(state: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    entries = sorted((k, v) for k, v in state.items() if isinstance(v, torch.Tensor))
    meta = [k for k, v in entries if v.is_meta]
    if meta:
        raise EexitValueError(
            f"cannot fingerprint a backbone whose weights are on the meta device ({meta[:3]}...); load its "
            "weights first (e.g. model.to_empty(device='cpu') and load_state_dict)."
        )
    return entries


def _header(name: str, tensor: torch.Tensor, *, with_dtype: bool) -> bytes:
    dtype = str(tensor.dtype).removeprefix("torch.") if with_dtype else ""
    return f"{name}\0{dtype}\0{tuple(tensor.shape)}\0".encode()


def backbone_fingerprint(model: nn.Module) -> str:
    """A sha256 of the backbone's weights: names, dtypes, shapes and values of its state dict.

    Deterministic across runs, devices and processes for the same weights in the same dtype. An
    :class:`~eexit.EarlyExitModel` is fingerprinted by its backbone only (heads and gates are excluded); a
    ``peft.PeftModel`` by the model it wraps, PEFT's injected weights included.

    Args:
        model: the backbone (or an EarlyExitModel, or a PeftModel).

    Returns:
        ``"sha256:<64 hex digits>"``.
    """
    return _digest(_entries(model))


def state_fingerprint(state: dict[str, Any]) -> str:
    """:func:`backbone_fingerprint` of a state dict (or any part of one): names, dtypes, shapes and values."""
    return _digest(_sorted_entries(state))


def _digest(entries: list[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256(_SALT)
    for name, tensor in entries:
        digest.update(_header(name, tensor, with_dtype=True))
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if flat.numel():
            # A uint8 view exposes the raw bytes of any dtype (bfloat16 and bool included) without a copy.
            digest.update(flat.view(torch.uint8).numpy())
    return "sha256:" + digest.hexdigest()


def structure_fingerprint(model: nn.Module) -> str:
    """A sha256 of the backbone's state-dict names and shapes only (no dtypes, no values)."""
    digest = hashlib.sha256(_SALT + b"structure\0")
    for name, tensor in _entries(model):
        digest.update(_header(name, tensor, with_dtype=False))
    return "sha256:" + digest.hexdigest()


def _dtype(model: nn.Module) -> str | None:
    param = next(_backbone(model).parameters(), None)
    return str(param.dtype).removeprefix("torch.") if param is not None else None


def fingerprint_info(model: nn.Module) -> dict[str, Any]:
    """What an adapter records about its backbone's weights (stored under ``backbone`` in the config).

    For a PEFT-wrapped backbone (a PeftModel, or an EarlyExitModel attached to one) it adds ``peft``: the PEFT
    adapter's type, name and targets, a digest of its own tensors (which explain a mismatch in words), and its
    non-tensor settings (``config``, ``layers``: :func:`~eexit._peft.adapter_settings`), which change the outputs
    (``lora_alpha``, rsLoRA, ``fan_in_fan_out``, disabled layers...) but no tensor, and which
    :func:`check_fingerprint` compares too.
    """
    backbone = _backbone(model)
    info: dict[str, Any] = {
        "fingerprint": backbone_fingerprint(backbone),
        "structure_fingerprint": structure_fingerprint(backbone),
        "dtype": _dtype(backbone),
        "num_parameters": sum(p.numel() for p in backbone.parameters()),
    }
    wrapper = _peft_wrapper(model)
    if wrapper is not None:
        info["peft"] = {
            **describe_peft(wrapper),
            "fingerprint": _digest(_sorted_entries(adapter_tensors(wrapper))),
            **adapter_settings(wrapper),
        }
    return info


def _explain_peft(saved: dict[str, Any] | None, current: dict[str, Any] | None) -> str | None:
    """The PEFT side of a mismatch, when the PEFT adapters (or their absence) differ."""

    def what(peft: dict[str, Any]) -> str:
        return f"a {peft.get('peft_type', 'PEFT')} adapter {peft.get('adapter_name')!r} on {peft.get('target_modules')}"

    if saved and not current:
        return (
            f"the adapter's backbone carried {what(saved)} (PEFT), but this model is the plain backbone. "
            f"eexit.from_pretrained(model, path) loads the PEFT adapter saved next to the exits ({PEFT_FOLDER}/) onto "
            "the plain backbone (for exits attached already, take the backbone back with model = ee.detach() "
            f"first); if the folder lacks {PEFT_FOLDER}/, wrap the model with peft.PeftModel.from_pretrained(model, "
            "<that PEFT adapter>) and pass the PeftModel"
        )
    if current and not saved:
        return (
            f"this model carries {what(current)} (PEFT), but the adapter was trained on the plain backbone: load "
            "it onto a fresh copy of the plain base model (not peft_model.unload(), which would strip this model's "
            "LoRA for good)"
        )
    if saved and current and saved.get("fingerprint") != current.get("fingerprint"):
        return (
            f"this model carries another PEFT adapter ({what(current)}; the adapter's backbone had {what(saved)}, "
            "with other weights): load it onto the backbone with the LoRA it was trained with"
        )
    return None


def _settings_mismatch(saved: dict[str, Any] | None, current: dict[str, Any] | None) -> str | None:
    """Which non-tensor PEFT settings differ between the adapter's backbone and this one (``None``: none, or
    nothing recorded to compare: an adapter saved before eexit recorded them)."""
    if not saved or not current or "config" not in saved:
        return None
    theirs, ours = saved.get("config") or {}, current.get("config") or {}
    differ = [f"{k}: {theirs.get(k)!r} saved, {ours.get(k)!r} here" for k in sorted({*theirs, *ours})
              if theirs.get(k) != ours.get(k)]  # fmt: skip
    if differ:
        return (
            f"its PEFT adapter has other settings than the one the exits were trained with ({'; '.join(differ)}), "
            "which change the outputs although every tensor is the same"
        )
    if saved.get("layers") and saved.get("layers") != current.get("layers"):
        return (
            "its PEFT layers are scaled, disabled or merged differently than when the exits were trained (e.g. after "
            "set_scale, disable_adapter_layers or merge_adapter), which changes the outputs although every tensor "
            "is the same"
        )
    return None


def explain_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """Say in words how the model at hand differs from the one an adapter recorded (both from fingerprint_info)."""
    peft = _explain_peft(saved.get("peft"), current.get("peft"))
    if peft is not None:
        return peft
    if saved.get("structure_fingerprint") and saved["structure_fingerprint"] != current["structure_fingerprint"]:
        return (
            f"it is a different architecture (parameter names or shapes differ; {saved.get('num_parameters')} "
            f"parameters recorded, {current['num_parameters']} here)"
        )
    if saved.get("dtype") and saved["dtype"] != current["dtype"]:
        return (
            f"it is the same architecture in {current['dtype']}, while the adapter's backbone was in "
            f"{saved['dtype']} (if these are the same weights in another precision, ignore_fingerprint=True is safe)"
        )
    return "it is the same architecture with different weights (another checkpoint, or a fine-tuned copy)"


# ---------------------------------------------------------------------------------------------- fit checks
def made_for(saved: SavedAdapter) -> str:
    backbone = saved.backbone
    where = f", {backbone['base_model']}" if backbone.get("base_model") else ""
    where += f" @ {backbone['revision']}" if backbone.get("revision") else ""
    return f"a {backbone['family']!r} backbone ({backbone.get('model_class', '?')}{where})"


def spec_for(model: nn.Module, saved: SavedAdapter, spec: BackboneSpec | None, name: str | None = None) -> BackboneSpec:
    """The backbone spec to attach with; refuses a model of another family than the adapter's."""
    from .backbones.base import find_spec, get_spec, list_specs

    if spec is None and saved.family == "generic":
        raise AdapterError(
            f"{saved.source} was made with a GenericSpec; pass the same spec again: "
            "eexit.from_pretrained(model, path, spec=eexit.GenericSpec(...))."
        )
    given = spec is not None
    if spec is None:
        try:
            spec = get_spec(name or saved.family)
        except EexitError:
            raise AdapterError(
                f"{saved.source} was made for a backbone spec named {saved.family!r}, which is not registered here "
                f"(registered: {list_specs()}). Import the code that registers it, or pass spec=."
            ) from None
    # A cost convention the spec was built with (GRITSpec(costs="uniform")) is part of what the gates learned.
    costs = saved.backbone.get("costs")
    if costs is not None and getattr(spec, "costs", costs) != costs:
        if given:
            raise AdapterError(
                f"{saved.source} was trained with costs={costs!r}, but the spec given has costs={spec.costs!r}; "
                f"pass spec={type(spec).__name__}(costs={costs!r}) or no spec."
            )
        spec = type(spec)(costs=costs)  # type: ignore[call-arg]
    if spec.name != saved.family:
        raise AdapterError(
            f"{saved.source} was made for {made_for(saved)}, but the spec given is {spec.name!r}; "
            "load it with the spec it was made with."
        )
    if not spec.matches(model):
        try:
            actual = f"a {find_spec(model).name!r} backbone"
        except EexitError:
            actual = "a model no registered spec recognises"
        raise AdapterError(
            f"{saved.source} was made for {made_for(saved)}, but the model passed is a {type(model).__name__}, "
            f"{actual}. Load the adapter onto the backbone family it was trained on."
        )
    return spec


def check_structure(saved: SavedAdapter, spec: BackboneSpec, model: nn.Module) -> None:
    """Refuse, before attaching anything, a model whose head, width or depth cannot carry the adapter."""
    problems = []
    head = spec.num_classes(model)
    saved_head = saved.meta.get("has_backbone_head", saved.cost_table.num_exits > len(saved.exit_blocks))
    if (head is not None) != saved_head:
        problems.append(
            "the adapter's last exit is "
            + (
                "the backbone's own head, but this model has none"
                if saved_head
                else "an IM, but this model has its own head"
            )
        )
    elif head is not None and head != saved.num_classes:
        problems.append(f"the adapter predicts {saved.num_classes} classes, this model's head {head}")
    width, saved_width = spec.feature_width(model), saved.meta.get("feature_width")
    if saved_width is not None and width != saved_width:
        problems.append(f"the adapter reads features of width {saved_width}, this model's are {width} wide")
    depth = len(spec.blocks(model))
    if max(saved.exit_blocks) >= depth:
        problems.append(f"the adapter has exits after blocks {saved.exit_blocks}, this model has {depth} blocks")
    if problems:
        raise AdapterError(
            f"{saved.source} was made for {made_for(saved)} and does not fit this "
            f"{type(model).__name__}: " + "; ".join(problems) + "."
        )


def check_fingerprint(saved: SavedAdapter, spec: BackboneSpec, model: nn.Module, ignore: bool) -> None:
    """Refuse (or, with ``ignore``, warn about) a backbone whose weights are not those the adapter recorded.

    ``model`` may be the backbone, the PeftModel around it or an EarlyExitModel: the PEFT adapter is part of what
    is compared, and its presence, absence or other weights are named in the message.
    """
    recorded = saved.backbone.get("fingerprint")
    if recorded is None:
        warnings.warn(
            f"{saved.source} records no backbone fingerprint; cannot check that this is the backbone "
            "the adapter was trained on.",
            UserWarning,
            stacklevel=3,
        )
        return
    current = fingerprint_info(model)
    settings = _settings_mismatch(saved.backbone.get("peft"), current.get("peft"))
    if current["fingerprint"] == recorded and settings is None:
        return
    base = spec.describe(_backbone(model)).get("base_model")
    if current["fingerprint"] == recorded:
        message = (
            f"{saved.source} was made for {made_for(saved)}, and the model passed ({type(model).__name__}"
            f"{', ' + base if base else ''}) has its weights, but {settings}."
        )
    else:
        message = (
            f"{saved.source} was made for {made_for(saved)} with weights {recorded}, but the model passed "
            f"({type(model).__name__}{', ' + base if base else ''}) has weights {current['fingerprint']}: "
            f"{explain_mismatch(saved.backbone, current)}."
        )
    if ignore:
        warnings.warn(
            message + " Loading anyway (ignore_fingerprint=True); its exits may be wrong.", UserWarning, stacklevel=3
        )
        return
    raise AdapterError(
        message + " Load it onto the backbone it was trained on, or pass ignore_fingerprint=True to "
        "load it anyway (its exits may then be wrong)."
    )
