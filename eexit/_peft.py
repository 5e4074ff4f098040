"""PEFT-wrapped backbones: eexit sees through a ``peft.PeftModel`` to the model it wraps.

PEFT's layer-injecting methods (LoRA, LoHa, IA3, ...) replace modules *inside* the base model, in place, so the
base model's own forward, which eexit's hooks and segments run, already goes through the adapted layers; the
PeftModel's forward adds nothing for them. eexit therefore matches specs, hooks blocks, measures costs and takes
fingerprints on ``peft_model.get_base_model()``, and keeps the PeftModel only to hand it back on detach and to
save its adapter next to the exits. Prompt-learning methods (prompt, prefix, p-tuning) add virtual tokens in the
PeftModel's own forward, which eexit never calls, so they are refused.

peft is optional: nothing here imports it at module level. A model is recognised as a PeftModel only when peft
is already imported, since a model cannot be an instance of a class that was never loaded.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .errors import AdapterError, BackboneError, EexitValueError

__all__ = [
    "INSTALL_HINT",
    "PEFT_FOLDER",
    "adapter_settings",
    "adapter_subtrees",
    "adapter_tensors",
    "check_not_injected",
    "describe_peft",
    "import_peft",
    "is_peft_model",
    "lora_fix",
    "peft_installed",
    "split_peft",
    "wrap_with_saved_adapter",
]

#: The subfolder of an eexit adapter folder that holds the backbone's PEFT adapter (peft's own files).
PEFT_FOLDER = "peft_adapter"
#: How to get peft with a version eexit is tested with.
INSTALL_HINT = "pip install 'eexit[peft]'"
#: The only PEFT files eexit reads: safetensors and JSON, never a pickle (``adapter_model.bin``).
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def is_peft_model(model: object) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (never imports peft)."""
    cls = getattr(sys.modules.get("peft.peft_model"), "PeftModel", None)
    return isinstance(cls, type) and isinstance(model, cls)


def peft_installed() -> bool:
    """Whether peft can be imported (without importing it)."""
    return importlib.util.find_spec("peft") is not None


def import_peft(purpose: str) -> ModuleType:
    """peft itself, or an error that says how to install it (``purpose`` says what needed it)."""
    try:
        return importlib.import_module("peft")
    except ImportError as err:
        raise EexitValueError(f"{purpose} needs the peft package, which is not installed: {INSTALL_HINT}.") from err


def _check_layer_injecting(peft_model: Any) -> None:
    prompt = sorted(name for name, cfg in peft_model.peft_config.items() if getattr(cfg, "is_prompt_learning", False))
    if prompt:
        kinds = sorted({str(getattr(peft_model.peft_config[n].peft_type, "value", "?")) for n in prompt})
        raise BackboneError(
            f"the PeftModel's adapter(s) {prompt} use prompt learning ({', '.join(kinds)}), which adds tokens in "
            "the PeftModel's own forward; eexit runs the wrapped model block by block and would skip them. Use a "
            "method that adapts the model's layers (LoRA, LoHa, IA3, ...)."
        )


def split_peft(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """``(base model, PeftModel)`` for a PeftModel, ``(model, None)`` for any other model.

    Raises:
        BackboneError: the PeftModel uses prompt learning, which eexit cannot run.
    """
    if not is_peft_model(model):
        return model, None
    _check_layer_injecting(model)
    return model.get_base_model(), model  # type: ignore[operator]


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple, list)):
        return sorted(str(v) for v in value)
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def describe_peft(peft_model: Any) -> dict[str, Any]:
    """What an eexit adapter records of the backbone's PEFT adapter (for messages; the fingerprint checks it)."""
    name = peft_model.active_adapter
    config = peft_model.peft_config[name]
    return {
        "adapter_name": name,
        "adapters": sorted(peft_model.peft_config),
        "peft_type": str(getattr(config.peft_type, "value", config.peft_type)),
        "target_modules": _jsonable(getattr(config, "target_modules", None)),
        "modules_to_save": _jsonable(getattr(config, "modules_to_save", None)),
    }


#: PEFT config fields that do not change what the adapted model computes: bookkeeping, and how the adapter's
#: weights were initialised (eexit always injects with plain init and then loads the saved weights).
_NOT_SETTINGS = frozenset(
    {
        "inference_mode",
        "base_model_name_or_path",
        "revision",
        "peft_version",
        "auto_mapping",
        "init_lora_weights",
        "init_weights",
        "init_ia3_weights",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "runtime_config",
    }
)


def _canonical(value: Any) -> Any:
    """``value`` as plain JSON: sets (and tuples) become sorted lists, enums their value, unknowns their str."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (set, frozenset)):
        return sorted((_canonical(v) for v in value), key=repr)
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    enum_value = getattr(value, "value", None)
    return enum_value if isinstance(enum_value, (str, int)) else str(value)


def _tuner_classes() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """peft's tuner-layer classes, and its wrapper classes (modules_to_save, trainable tokens); peft is loaded."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import other

    wrappers = tuple(
        cls
        for cls in (getattr(other, "AuxiliaryTrainingWrapper", None), getattr(other, "ModulesToSaveWrapper", None))
        if isinstance(cls, type)
    )
    return (BaseTunerLayer,), wrappers


def _layer_state(module: nn.Module, name: str) -> dict[str, Any]:
    """The non-tensor state of one PEFT layer that changes its output for adapter ``name``."""
    scaling = getattr(module, "scaling", None)
    return {
        "scaling": _canonical(scaling.get(name)) if isinstance(scaling, dict) else None,
        "disabled": bool(getattr(module, "disable_adapters", False)),
        "active": _canonical(list(getattr(module, "active_adapters", []) or [])),
        "merged": _canonical(list(getattr(module, "merged_adapters", []) or [])),
    }


def adapter_settings(peft_model: Any) -> dict[str, Any]:
    """The active PEFT adapter's non-tensor settings, which the tensor fingerprint cannot see.

    ``config``: the adapter's ``peft_config`` as canonical JSON, without the fields that do not change what the
    model computes (``inference_mode``, ``base_model_name_or_path``, ``revision``, ``peft_version`` and the
    weight-initialisation ones); ``layers``: a sha256 over every PEFT layer's scaling (``lora_alpha`` / r, rsLoRA,
    ``set_scale``), enabled, active and merged state.
    """
    name = peft_model.active_adapter
    config = {k: v for k, v in _canonical(peft_model.peft_config[name].to_dict()).items() if k not in _NOT_SETTINGS}
    layers, _ = _tuner_classes()
    state = [
        [module_name, _layer_state(module, name)]
        for module_name, module in peft_model.get_base_model().named_modules()
        if isinstance(module, layers)
    ]
    digest = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
    return {"config": config, "layers": f"sha256:{digest}"}


def adapter_subtrees(base: nn.Module) -> list[str]:
    """Names (in ``base``) of the PEFT-only submodules that hold a trainable parameter, with their siblings.

    For every PEFT tuner layer (LoRA, LoHa, ...) whose adapter parts hold a parameter with ``requires_grad``: its
    children other than ``base_layer`` (``lora_A``, ``lora_B``, ``lora_dropout``, ...); for every
    ``modules_to_save`` (or trainable-tokens) wrapper: its children other than ``original_module``. These are what
    ``fit(train_backbone="lora")`` puts in train mode; every module of the base model stays in eval mode.
    """
    layers, wrappers = _tuner_classes()
    out: list[str] = []
    for name, module in base.named_modules():
        if isinstance(module, layers):
            skip = "base_layer"
        elif wrappers and isinstance(module, wrappers):
            skip = "original_module"
        else:
            continue
        parts = [(child, sub) for child, sub in module.named_children() if child != skip]
        if any(p.requires_grad for _, sub in parts for p in sub.parameters()):
            out += [f"{name}.{child}" if name else child for child, _ in parts]
    return out


def _holds_tuner_layers(model: nn.Module) -> bool:
    if "peft" not in sys.modules:  # nothing can hold a peft layer when peft was never imported
        return False
    layers, wrappers = _tuner_classes()
    return any(isinstance(m, layers + wrappers) for m in model.modules())


def check_not_injected(model: nn.Module) -> None:
    """Refuse to inject a saved PEFT adapter into a model that already holds PEFT layers (or a ``peft_config``).

    Raises:
        AdapterError: naming the fix (pass the PeftModel itself).
    """
    if hasattr(model, "peft_config") or _holds_tuner_layers(model):
        raise AdapterError(
            f"this {type(model).__name__} already holds PEFT layers (it is the model inside a peft.PeftModel, or "
            "was given adapters with inject_adapter_in_model); eexit will not inject a second PEFT adapter on top "
            "of them. Pass the PeftModel itself (eexit.from_pretrained(peft_model, path): its LoRA is then checked "
            "against the one the exits were trained with), or a fresh copy of the plain base model."
        )


def adapter_tensors(peft_model: Any) -> dict[str, torch.Tensor]:
    """Every PEFT adapter's own tensors (what peft saves), under ``<adapter name>/<key>``."""
    from peft import get_peft_model_state_dict  # peft is loaded: the model is a PeftModel

    out: dict[str, torch.Tensor] = {}
    for name in sorted(peft_model.peft_config):
        for key, value in get_peft_model_state_dict(peft_model, adapter_name=name).items():
            out[f"{name}/{key}"] = value
    return out


def _lora_targets(block: nn.Module) -> list[str]:
    """The usual LoRA ``target_modules`` for a transformer block: its attention's query/value (or fused qkv)."""
    leaves = {name.rpartition(".")[2] for name, m in block.named_modules() if name and isinstance(m, nn.Linear)}
    for choice in (["qkv"], ["query", "value"], ["q_proj", "v_proj"], ["q", "v"]):
        if set(choice) <= leaves:
            return choice
    return sorted(leaves)[:4]


def lora_fix(block: nn.Module | None) -> str:
    """The code that wraps a backbone with LoRA, with target modules read from one of its blocks."""
    targets = _lora_targets(block) if block is not None else []
    shown = repr(targets) if targets else "[...]"
    hint = "" if targets else " (the names of its attention's Linear layers)"
    install = "" if peft_installed() else f" (install peft first: {INSTALL_HINT})"
    wrap = f"model = peft.get_peft_model(model, peft.LoraConfig(target_modules={shown}))"
    return f"{wrap}{hint} before eexit.attach{install}"


def _check_files(folder: Path) -> None:
    missing = [name for name in PEFT_FILES if not (folder / name).is_file()]
    if missing:
        pickle = ""
        if (folder / "adapter_model.bin").is_file():
            pickle = " (it holds adapter_model.bin, a pickle, which eexit never loads)"
        raise AdapterError(
            f"{folder} lacks {missing}{pickle}; save the adapter again with ee.save_pretrained() from the "
            "PEFT-wrapped backbone."
        )


def _plain_init(config: Any) -> None:
    """Make ``config`` inject with plain initialisation. OLoRA, PiSSA, CorDA, LoftQ, EVA and the like compute
    their init from the base weights and rewrite those in place; the saved weights are loaded right after anyway."""
    for field in ("init_lora_weights", "init_weights", "init_ia3_weights"):
        if hasattr(config, field):
            setattr(config, field, True)


def _strip_tuner_layers(model: nn.Module) -> None:
    """Replace every PEFT layer in ``model`` by the module it wraps (a failed injection may have left some)."""
    if "peft" not in sys.modules:
        return
    layers, wrappers = _tuner_classes()
    for name, module in list(model.named_modules()):
        if not name or not isinstance(module, layers + wrappers):
            continue
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
        except AttributeError:  # inside a layer already replaced
            continue
        if getattr(parent, child, None) is not module:
            continue
        original = module.get_base_layer() if isinstance(module, layers) else module.original_module
        setattr(parent, child, original)


def _check_keys(wrapped: Any, folder: Path, adapter_name: str) -> None:
    """Refuse a saved PEFT adapter whose tensors are not exactly those of the layers its config injects."""
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    expected = set(get_peft_model_state_dict(wrapped, adapter_name=adapter_name))
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        saved = set(handle.keys())
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if missing or unexpected:
        raise AdapterError(
            f"the PEFT adapter in {folder} does not match the layers its adapter_config.json injects: missing keys "
            f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}. Save the adapter again with ee.save_pretrained() from the "
            "PEFT-wrapped backbone."
        )


def wrap_with_saved_adapter(model: nn.Module, folder: Path, adapter_name: str) -> tuple[nn.Module, Callable[[], None]]:
    """Wrap the plain ``model`` with the PEFT adapter saved in ``folder`` (safetensors and JSON only).

    What ``PeftModel.from_pretrained(model, folder)`` does, in its two public steps (inject the layers, then load
    their weights, strictly), so that a load failing in the second step can still take the layers out again. The
    layers are injected with plain initialisation (never OLoRA / PiSSA / LoftQ..., which rewrite base weights),
    so taking them out gives back exactly the modules and weights ``model`` had. PEFT changes ``model`` in place;
    this returns, with the PeftModel, the function that undoes it (original modules, ``requires_grad`` flags and
    training modes), for a load that fails later.

    Raises:
        AdapterError: ``model`` already holds PEFT layers (pass the PeftModel itself), the files are missing, or
            the saved tensors are not exactly the injected layers' (missing or unexpected keys named).
    """
    check_not_injected(model)
    peft = import_peft(f"{folder.parent} holds a PEFT adapter ({PEFT_FOLDER}/): loading it")
    _check_files(folder)
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]

    def undo() -> None:
        _strip_tuner_layers(model)  # every layer this call injected (the model held none before)
        if hasattr(model, "peft_config"):  # an injection that failed halfway may have left its config behind
            del model.peft_config
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode

    try:
        config = peft.PeftConfig.from_pretrained(str(folder))
        config.inference_mode = True
        _plain_init(config)
        wrapped = peft.get_peft_model(model, config, adapter_name=adapter_name)
        _check_keys(wrapped, folder, adapter_name)
        wrapped.load_adapter(str(folder), adapter_name, is_trainable=False)
    except AdapterError:
        undo()
        raise
    except Exception as err:
        undo()
        raise AdapterError(f"could not load the PEFT adapter in {folder} ({type(err).__name__}: {err}).") from err
    return wrapped, undo
