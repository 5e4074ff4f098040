"""What the command line needs around the library: backbones named by strings, and run folders.

A run folder (``eexit fit --out DIR``) holds the adapter (``eexit_config.json``, ``eexit_adapter.safetensors``,
``README.md``), ``run.json`` (how to rebuild the backbone and which data trained it), ``results.json``, a plot and
``checkpoints/``. ``eexit evaluate DIR`` and ``eexit push DIR`` rebuild the backbone from ``run.json`` and load
the adapter with its fingerprint check, so an adapter never lands on other weights.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import EexitValueError

__all__ = ["load_backbone", "read_run", "write_json"]

RUN_FILE = "run.json"


def load_backbone(
    model: str,
    checkpoint: str | None = None,
    num_classes: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """A backbone from ``timm:NAME`` or ``hf:PATH_OR_REPO``, with weights from a ``.safetensors`` checkpoint.

    ``timm:NAME`` builds timm's architecture (eexit's T2T-ViT and Dynamic Perceiver included) without downloading
    weights; ``--checkpoint`` gives them. ``hf:PATH`` reads a transformers image classifier saved with
    ``save_pretrained`` (safetensors only), or a Hub repo when the network allows. ``model_kwargs`` go to
    ``timm.create_model`` (architecture options such as ``img_size``).
    """
    kind, _, name = model.partition(":")
    if not name or kind not in ("timm", "hf"):
        raise EexitValueError(
            f"--model {model!r}: expected timm:NAME (e.g. timm:vit_small_patch16_224) or hf:PATH_OR_REPO (a "
            "transformers image classifier folder or Hub id)."
        )
    if model_kwargs and kind != "timm":
        raise EexitValueError("--model-kwargs applies to timm models only; an hf: model reads its own config.")
    if kind == "timm":
        import timm

        if not timm.is_model(name):
            raise EexitValueError(
                f"--model {model!r}: timm has no model {name!r}; list them with timm.list_models('*vit*')."
            )
        kwargs = dict(model_kwargs or {})
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        try:
            backbone = timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as err:
            raise EexitValueError(f"--model-kwargs {model_kwargs}: {name} does not take them ({err}).") from err
    else:
        from transformers import AutoModelForImageClassification

        kwargs = {} if num_classes is None else {"num_labels": num_classes, "ignore_mismatched_sizes": True}
        try:
            backbone = AutoModelForImageClassification.from_pretrained(name, use_safetensors=True, **kwargs)
        except (OSError, ValueError) as err:
            raise EexitValueError(
                f"--model {model!r}: cannot read a transformers image classifier there ({err}). Give a folder "
                "written by save_pretrained with model.safetensors."
            ) from err
    if checkpoint is not None:
        _load_weights(backbone, checkpoint)
    return backbone.eval()


def _load_weights(backbone: nn.Module, checkpoint: str) -> None:
    path = Path(checkpoint)
    if path.suffix != ".safetensors":
        raise EexitValueError(
            f"--checkpoint {checkpoint}: only .safetensors files are read (other formats can run code when "
            "loaded); convert it with safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')."
        )
    if not path.is_file():
        raise EexitValueError(f"--checkpoint {checkpoint} does not exist.")
    from safetensors.torch import load_file

    state = load_file(str(path))
    try:
        result = backbone.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes differ: another width, depth or class count
        first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err)[:300])
        raise EexitValueError(
            f"--checkpoint {checkpoint} does not fit the model ({first}). Check --model, --model-kwargs and "
            "--num-classes."
        ) from err
    if result.missing_keys or result.unexpected_keys:
        raise EexitValueError(
            f"--checkpoint {checkpoint} does not fit the model: {len(result.missing_keys)} missing keys (e.g. "
            f"{result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected (e.g. "
            f"{result.unexpected_keys[:3]}). Check --model and --num-classes."
        )


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a crash leaves the previous file)."""
    staged = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    staged.write_text(json.dumps(data, indent=2, default=_plain))
    os.replace(staged, path)


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def read_run(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """``run.json`` of a run folder, with a clear error when the folder is not one."""
    path = Path(folder) / RUN_FILE
    if not Path(folder).is_dir():
        raise EexitValueError(f"run folder {folder} does not exist; give the --out folder of an `eexit fit`.")
    if not path.is_file():
        raise EexitValueError(
            f"{folder} is not an eexit run folder ({RUN_FILE} missing); give the --out of `eexit fit`."
        )
    try:
        run = json.loads(path.read_text())
        _ = run["model"], run["checkpoint"], run["num_classes"], run["val_dataset"]
    except (ValueError, KeyError, TypeError) as err:
        raise EexitValueError(f"{path} is damaged ({err!r}); run `eexit fit` again into a new folder.") from err
    return run
