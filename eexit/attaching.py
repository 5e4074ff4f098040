"""attach() and detach(): hook exits onto a backbone and take them off again, leaving no trace.

``attach`` records every flag it changes (each parameter's ``requires_grad``, each module's training mode)
and every hook handle; ``detach`` puts them all back, so the backbone's outputs after ``detach`` equal its
outputs before ``attach``. The backbone's class, forward and weights are never edited.

A ``peft.PeftModel`` is seen through (:mod:`eexit._peft`): the exits go on the model it wraps, whose injected
LoRA layers then run in every exit, and ``detach`` hands the PeftModel back as it was.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import replace
from typing import Any

from torch import nn

from ._fingerprint import check_fingerprint
from ._peft import check_not_injected, is_peft_model, split_peft, wrap_with_saved_adapter
from .adapters import check_adapter_name
from .backbones.base import BackboneSpec, StagedSpec, find_spec
from .config import ExitConfig
from .cost import measure_cost_table
from .errors import AdapterError, BackboneError, EexitValueError
from .hub import check_pretrained, install_adapter, peft_adapter_folder, read_adapter_files
from .model import EarlyExitModel, make_driver

__all__ = ["attach", "detach", "from_pretrained"]

# Backbones that currently carry exits. A weak set, so that eexit keeps no backbone alive and writes nothing
# onto the backbone itself.
_ATTACHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _default_exit_blocks(num_blocks: int, has_head: bool) -> list[int]:
    # With its own classifier, the backbone's last block already feeds the last exit (its head).
    return list(range(num_blocks - 1)) if has_head else list(range(num_blocks))


def _resolve_num_classes(spec: BackboneSpec, model: nn.Module, num_classes: int | None) -> int:
    head_classes = spec.num_classes(model)
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
        raise EexitValueError(f"num_classes must be an int >= 2, got {num_classes!r}.")
    if head_classes is not None and num_classes is not None and head_classes != num_classes:
        raise EexitValueError(
            f"num_classes={num_classes} but the backbone's head predicts {head_classes} classes; the exits must "
            "predict the same classes as the last exit. Drop num_classes, or reset the backbone's head first "
            "(timm: model.reset_classifier(num_classes))."
        )
    resolved = head_classes if head_classes is not None else num_classes
    if resolved is None:
        raise EexitValueError(
            f"{type(model).__name__} has no classification head, so eexit cannot tell how many classes to "
            "predict; pass num_classes=C (the last exit is then an IM on the last block)."
        )
    return resolved


def attach(
    model: nn.Module,
    config: ExitConfig | None = None,
    *,
    spec: BackboneSpec | None = None,
    backbone: str | None = None,
    num_classes: int | None = None,
    input_size: tuple[int, int, int] | None = None,
    **config_overrides: Any,
) -> EarlyExitModel:
    """Hook IMs and gates onto ``model`` and return the early-exit model.

    The backbone is frozen and put in eval mode; everything changed is recorded for :func:`detach`.

    A ``peft.PeftModel`` (e.g. ``peft.get_peft_model(vit, LoraConfig(target_modules=["qkv"]))``) is attached through
    the model it wraps: the spec is matched on ``peft_model.get_base_model()``, the hooks go on its (LoRA-wrapped)
    blocks, so the LoRA layers run in every exit and in real early exit; ``ee.peft_model`` keeps the PeftModel and
    :func:`detach` returns it unchanged. ``fit(..., train_backbone="lora")`` then trains the LoRA weights with the
    exits, and ``ee.save_pretrained`` writes the PEFT adapter next to them.

    Args:
        model: a timm or transformers vision transformer (or any model a spec describes), or a PeftModel around
            one.
        config: where the exits go and what they are; keyword arguments override its fields
            (e.g. ``exit_blocks=(3, 6, 9)``, ``head="mlp"``, ``threshold=0.5``).
        spec: a spec instance, e.g. :class:`eexit.GenericSpec`, for models no registered spec knows.
        backbone: name of a registered spec to use instead of matching (see ``eexit.list_specs()``).
        num_classes: classes to predict; required when the backbone has no classification head.
        input_size: (C, H, W) at which to measure the cost table, when the backbone does not fix it; for a graph
            backbone, the reference graph size (nodes, edges) at which the JEI-DNN objective prices the exits
            (every graph is still charged its own cost).

    Returns:
        The :class:`EarlyExitModel`; call it on images for real early exit.

    Raises:
        BackboneError: no spec recognises the model, it has no blocks, it already carries exits, or it is a
            PeftModel whose adapter is prompt learning (eexit runs the wrapped model's blocks, not the PeftModel).
        EexitValueError: bad exit placement or class count.
    """
    wrapper = model
    model, peft_model = split_peft(model)
    if model in _ATTACHED or wrapper in _ATTACHED:
        raise BackboneError(
            f"this {type(wrapper).__name__} already has exits attached; call ee.detach() (or eexit.detach(ee)) "
            "before attaching again."
        )
    base = config or ExitConfig()
    if "gates" in config_overrides and "gate_features" not in config_overrides:
        # The base config resolved its features for its own gate kind; another kind takes that kind's default
        # (attach(model, gates="paper") gets the paper's four statistics), unless the base chose features itself.
        if base.gate_features == ExitConfig(gates=base.gates).gate_features:
            config_overrides = {**config_overrides, "gate_features": None}
    config = replace(base, **config_overrides) if config_overrides else base
    spec = spec if spec is not None else find_spec(model, backbone)
    blocks = spec.blocks(model)
    if not blocks:
        raise BackboneError(
            f"spec {spec.name!r} found no blocks in {type(model).__name__}; check the block names it was given."
        )
    classes = _resolve_num_classes(spec, model, num_classes)
    has_head = spec.num_classes(model) is not None
    exit_blocks = (
        list(config.exit_blocks) if config.exit_blocks is not None else _default_exit_blocks(len(blocks), has_head)
    )
    bad = [b for b in exit_blocks if not 0 <= b < len(blocks)]
    if bad:
        raise EexitValueError(f"exit_blocks {bad} are out of range: the backbone has blocks 0..{len(blocks) - 1}.")
    if not exit_blocks:
        raise EexitValueError(f"{type(model).__name__} has a single block: there is no place for an early exit.")

    staged = isinstance(spec, StagedSpec)
    graphs = spec.input_kind == "graphs"
    if input_size is None and (staged or graphs):
        # Any size runs; measure costs at the model's usual one (graphs: a reference (nodes, edges) size).
        input_size = spec.default_input_size(model)  # type: ignore[attr-defined]
    expected = spec.input_shape(model)
    shape = tuple(input_size) if input_size is not None else expected
    if any(s is None for s in shape):
        raise EexitValueError(
            f"cannot tell the input size of {type(model).__name__} (got {expected}); pass input_size=(C, H, W) "
            "so the cost table can be measured."
        )

    # Built before anything is changed, so a configuration the driver refuses leaves the model untouched.
    driver = make_driver(model, spec, exit_blocks, config)
    ee = EarlyExitModel(model, spec, exit_blocks, classes, config, driver, peft_model=peft_model)

    def forget() -> None:
        _ATTACHED.discard(model)
        _ATTACHED.discard(wrapper)

    ee.install(on_detach=forget)  # freezes the backbone, records what detach undoes
    _ATTACHED.add(model)
    _ATTACHED.add(wrapper)
    try:
        ee.cost_table = measure_cost_table(ee, shape)  # type: ignore[arg-type]
        ee.prepare_segments(shape)  # type: ignore[arg-type]
    except Exception:
        detach(ee)
        raise
    return ee


def detach(ee: EarlyExitModel) -> nn.Module:
    """Remove the exits from the backbone and restore every flag and mode ``attach`` changed.

    Returns:
        The backbone, exactly as it was before :func:`attach` (same outputs); the PeftModel itself when the
        backbone was attached as one (or wrapped by :func:`from_pretrained`).
    """
    if not isinstance(ee, EarlyExitModel):
        raise EexitValueError(f"detach expects the EarlyExitModel that attach returned, got {type(ee).__name__}.")
    return ee.detach()


def from_pretrained(
    model: nn.Module,
    path_or_repo_id: str | os.PathLike[str],
    *,
    revision: str | None = None,
    adapter_name: str = "default",
    subfolder: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    ignore_fingerprint: bool = False,
    **attach_kwargs: Any,
) -> EarlyExitModel:
    """Attach a saved adapter to ``model`` and return the early-exit model.

    ``path_or_repo_id`` is tried as a local folder first, then as a Hub repo id. Both files are validated
    before the model is touched; the tensors are loaded strictly; the backbone's weights must have the
    fingerprint the adapter recorded. On any error the model is left exactly as it was.

    An adapter trained on a PEFT-wrapped backbone was saved with its PEFT adapter (``peft_adapter/``). Given the
    plain backbone, that PEFT adapter is loaded first (safetensors only; the model becomes the base of a new
    ``peft.PeftModel``, which ``ee.peft_model`` holds and ``ee.detach()`` returns; a failed load takes it out
    again, leaving every module and weight as it was); given a PeftModel, its PEFT adapter must be the one the
    exits were trained with (fingerprint of its tensors and of its settings, e.g. ``lora_alpha``). A model that
    is the base of a PeftModel (or otherwise holds PEFT layers) is refused: pass the PeftModel itself.

    Args:
        model: the backbone the adapter was trained on (not an EarlyExitModel), or the PeftModel around it.
        path_or_repo_id: a folder written by :func:`save_pretrained`, or a Hub repo id (``"org/name"``).
        revision: branch, tag or commit of the Hub repo (ignored for a local folder).
        adapter_name: the name the adapter gets in the returned model.
        subfolder: the adapter's subfolder, for a folder holding several adapters.
        cache_dir: Hugging Face cache folder (default ``HF_HUB_CACHE``).
        token: Hub token for private repos (default: the logged-in one).
        local_files_only: never reach the Hub; use the local cache only.
        ignore_fingerprint: load even onto other backbone weights (warns instead of refusing).
        **attach_kwargs: passed to :func:`eexit.attach` (``spec=``, ``input_size=``, ``threshold=``, ...).

    Raises:
        AdapterError: the files are missing, unreadable, inconsistent or from a newer format, the adapter
            was made for another backbone (family, head, width, depth or weights, the PEFT adapter's weights and
            settings included), or its PEFT adapter would go into a model that already holds PEFT layers (pass
            the PeftModel itself).
        BackboneError: the model is a PeftModel whose adapter is prompt learning, or it already has exits.
    """
    if isinstance(model, EarlyExitModel):
        raise AdapterError(
            "from_pretrained expects the bare backbone, got an EarlyExitModel; to add an adapter to "
            "it use ee.load_adapter(path_or_repo_id, adapter_name)."
        )
    check_adapter_name(adapter_name, AdapterError)
    hub = {"cache_dir": cache_dir, "token": token, "local_files_only": local_files_only}
    saved, state, folder = read_adapter_files(path_or_repo_id, subfolder=subfolder, revision=revision, **hub)
    spec, attach_kwargs = check_pretrained(model, saved, attach_kwargs)  # family and shapes, before any change
    undo_peft = None
    if not is_peft_model(model) and saved.backbone.get("peft"):
        # Refused before anything is injected: PEFT layers on an attached backbone, or on top of a LoRA already
        # there, could not be taken out again without losing what was there.
        if model in _ATTACHED:
            raise BackboneError(
                f"this {type(model).__name__} already has exits attached; call ee.detach() (or eexit.detach(ee)) "
                "before loading an adapter onto it, or use ee.load_adapter(path, name) to add one to it."
            )
        check_not_injected(model)
        peft_folder = peft_adapter_folder(saved, folder, path_or_repo_id, subfolder, revision, **hub)
        if peft_folder is not None:
            model, undo_peft = wrap_with_saved_adapter(model, peft_folder, saved.backbone["peft"]["adapter_name"])
    try:
        check_fingerprint(saved, spec, model, ignore_fingerprint)
        ee = attach(model, saved.exit_config, spec=spec, **attach_kwargs)
        try:
            install_adapter(ee, saved, state, adapter_name)
        except BaseException:
            detach(ee)  # loads nothing: the user's model goes back to how it was
            raise
    except BaseException:
        if undo_peft is not None:
            undo_peft()  # and loses the PEFT layers this call injected
        raise
    return ee
