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

import importlib
import importlib.util
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
    "adapter_tensors",
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


def wrap_with_saved_adapter(model: nn.Module, folder: Path, adapter_name: str) -> tuple[nn.Module, Callable[[], None]]:
    """Wrap the plain ``model`` with the PEFT adapter saved in ``folder`` (safetensors and JSON only).

    What ``PeftModel.from_pretrained(model, folder)`` does, in its two public steps (inject the layers, then load
    their weights), so that a load failing in the second step can still take the layers out again. PEFT changes
    ``model`` in place; this returns, with the PeftModel, the function that undoes it (original modules,
    ``requires_grad`` flags and training modes), for a load that fails later.
    """
    peft = import_peft(f"{folder.parent} holds a PEFT adapter ({PEFT_FOLDER}/): loading it")
    _check_files(folder)
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    wrapped = None

    def undo() -> None:
        if wrapped is not None:
            wrapped.unload()  # puts the original modules back
        if hasattr(model, "peft_config"):  # an injection that failed halfway may have left its config behind
            del model.peft_config
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode

    try:
        config = peft.PeftConfig.from_pretrained(str(folder))
        config.inference_mode = True
        wrapped = peft.get_peft_model(model, config, adapter_name=adapter_name)
        wrapped.load_adapter(str(folder), adapter_name, is_trainable=False)
    except Exception as err:
        undo()
        raise AdapterError(f"could not load the PEFT adapter in {folder} ({type(err).__name__}: {err}).") from err
    return wrapped, undo
