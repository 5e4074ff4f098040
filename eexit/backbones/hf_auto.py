"""A spec that discovers the layout of a ViT-like ``transformers`` image model no family spec describes.

Used for ``AutoModelForImageClassification`` models such as ViT-MSN, I-JEPA, Data2Vec-vision, CLIP / SigLIP
vision classifiers, and their headless base models. It reads the model's own metadata instead of a table of
names, and checks what it finds:

1. **Layers**: the layer classes named by ``_can_record_outputs["hidden_states"]`` and ``_no_split_modules``
   (embeddings left out); the longest ``ModuleList`` made only of them holds the exit points.
2. **Final norm**: the first of ``layernorm``, ``post_layernorm``, ``norm``, ``final_layernorm``,
   ``layer_norm`` found on the modules above that list, nearest first (none: no norm).
3. **Pooling**: what the classifier reads is found by trying, on one random probe batch, each candidate
   pooling of the last layer's output (the CLS token, CLS + mean of patch tokens, mean of patch tokens, mean of
   all tokens, the model's pooler; each through the final norm, then without it) and keeping the first whose
   ``classifier(feature)`` reproduces the model's own logits. Thus an IM reads exactly what the classifier
   reads, or the spec refuses the model. Headless models read the CLS token (or the mean of the tokens when
   there is no CLS token) through the final norm.

The probe runs once per model (cached weakly, nothing is stored on the model) in eval mode under ``no_grad``,
with a temporary hook that is removed before it returns, and every module's mode is restored. Hierarchical
models (layers of different widths, feature maps instead of token sequences) are refused with the reason;
Swin and Swin V2 have their own spec.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import BackboneError
from ._hf import HFSpec
from .base import matched_elsewhere, register_spec
from .unsupported import refusal_reason

__all__ = ["HFAutoSpec"]

_NORM_NAMES = ("layernorm", "post_layernorm", "norm", "final_layernorm", "layer_norm")

#: pooling name -> f(hidden [B, N, D], norm, first patch token index) -> feature [B, D'], in the order tried
_POOLINGS: dict[str, Callable[[torch.Tensor, nn.Module, int], torch.Tensor]] = {
    "cls": lambda h, norm, p: norm(h[:, 0]),
    "cls+patch_mean": lambda h, norm, p: torch.cat([norm(h[:, 0]), norm(h)[:, p:].mean(dim=1)], dim=1),
    "patch_mean": lambda h, norm, p: norm(h)[:, p:].mean(dim=1),
    "mean": lambda h, norm, p: norm(h).mean(dim=1),
    "raw_cls": lambda h, norm, p: h[:, 0],
    "raw_patch_mean": lambda h, norm, p: h[:, p:].mean(dim=1),
    "raw_mean": lambda h, norm, p: h.mean(dim=1),
}


@dataclass(frozen=True)
class _Layout:
    layers: str  # path of the ModuleList of layers
    norm: str | None  # path of the final norm
    pooling: str  # a key of _POOLINGS, or the path of the model's pooler
    first_patch: int  # index of the first patch token (after CLS / register tokens)
    width: int


def _layer_class_names(model: nn.Module) -> set[str]:
    names = {n for n in (getattr(model, "_no_split_modules", None) or []) if "Embedding" not in n}
    recorded = (getattr(model, "_can_record_outputs", None) or {}).get("hidden_states")
    target = getattr(recorded, "target_class", recorded)  # a class, or an OutputRecorder naming one
    if isinstance(target, type):
        names.add(target.__name__)
    elif isinstance(target, str):
        names.add(target)
    return names


def _find_layers(model: nn.Module) -> str:
    names = _layer_class_names(model)
    candidates = [
        (len(module), path)
        for path, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) and all(type(m).__name__ in names for m in module)
    ]
    if not candidates:
        raise BackboneError(
            f"{type(model).__name__}: found no ModuleList made of its layer classes {sorted(names)} (from "
            "_no_split_modules / _can_record_outputs); its layers are nested in stages or named otherwise."
        )
    path = max(candidates)[1]
    widths = {_width_of(layer) for layer in model.get_submodule(path)} - {None}
    if len(widths) > 1 or any("Stage" in type(m).__name__ for m in model.get_submodule(path)):
        raise BackboneError(
            f"{type(model).__name__} is hierarchical (its layers at {path!r} are stages, or differ in width: "
            f"{sorted(widths)}); exits at its layers have no common feature and pooling."
        )
    return path


def _width_of(layer: nn.Module) -> int | None:
    for module in layer.modules():
        shape = getattr(module, "normalized_shape", None)
        if shape:
            return int(shape[-1])
    return None


def _find_norm(model: nn.Module, layers: str) -> str | None:
    parts = layers.split(".")
    for depth in range(len(parts) - 1, -1, -1):  # the parents of the layer list, nearest first
        owner = ".".join(parts[:depth])
        for name in _NORM_NAMES:
            path = f"{owner}.{name}" if owner else name
            try:
                module = model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(module, nn.Identity) or getattr(module, "normalized_shape", None):
                return path
    return None


def _find_pooler(model: nn.Module, layers: str) -> str | None:
    parts = layers.split(".")
    for depth in range(len(parts) - 1, -1, -1):  # the parents of the layer list, nearest first
        owner = ".".join(parts[:depth])
        if isinstance(getattr(model.get_submodule(owner), "pooler", None), nn.Module):
            return f"{owner}.pooler" if owner else "pooler"
    return None


class HFAutoSpec(HFSpec):
    """transformers ViT-like image models found by their own metadata (see the module docstring)."""

    name = "hf_auto"
    catch_all = True

    def __init__(self) -> None:
        self._layouts: weakref.WeakKeyDictionary[nn.Module, _Layout] = weakref.WeakKeyDictionary()

    def matches(self, model: nn.Module) -> bool:
        return (
            type(model).__module__.startswith("transformers.")
            and getattr(model, "main_input_name", None) == "pixel_values"
            and refusal_reason(model) is None
            and not matched_elsewhere(self, model)
        )

    def layout(self, model: nn.Module) -> _Layout:
        """The discovered layout of ``model`` (found once, then cached)."""
        if model not in self._layouts:
            self._layouts[model] = self._discover(model)
        return self._layouts[model]

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        path = self.layout(model).layers
        return [(f"{path}.{i}", layer) for i, layer in enumerate(model.get_submodule(path))]

    def feature_width(self, model: nn.Module) -> int:
        return self.layout(model).width

    def pool(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        layout = self.layout(model)
        norm = model.get_submodule(layout.norm) if layout.norm else nn.Identity()
        if layout.pooling in _POOLINGS:
            return _POOLINGS[layout.pooling](hidden, norm, layout.first_patch)  # [B, D']
        return model.get_submodule(layout.pooling)(norm(hidden))  # the model's pooler, [B, D']

    # ------------------------------------------------------------------ discovery
    def _discover(self, model: nn.Module) -> _Layout:
        layers = _find_layers(model)
        norm_path = _find_norm(model, layers)
        norm = model.get_submodule(norm_path) if norm_path else nn.Identity()
        hidden, logits = self._probe(model, model.get_submodule(layers)[-1])
        if hidden.dim() != 3:
            raise BackboneError(
                f"{type(model).__name__}: its layers return {hidden.dim()}-d hidden states {tuple(hidden.shape)}, "
                "not token sequences [B, N, D]; eexit cannot pool them without knowing the model."
            )
        first_patch = self._first_patch(model, hidden)
        if logits is None:  # headless: the CLS token, or the mean when there is none
            pooling = "cls" if first_patch > 0 else "mean"
            return _Layout(layers, norm_path, pooling, first_patch, int(_POOLINGS[pooling](hidden, norm, 0).shape[-1]))
        classifier = getattr(model, "classifier", None)
        if not isinstance(classifier, nn.Module):
            raise BackboneError(f"{type(model).__name__} has no `classifier` module whose input eexit could match.")
        tol = torch.finfo(logits.dtype).eps ** 0.5  # 3e-4 in float32; candidates differ by far more
        for pooling, feature in self._candidates(model, layers, hidden, norm, first_patch):
            with torch.no_grad():
                try:
                    guess = classifier(feature)
                except RuntimeError:  # the wrong width for this classifier
                    continue
            if guess.shape == logits.shape and torch.allclose(guess, logits, rtol=tol, atol=tol):
                return _Layout(layers, norm_path, pooling, first_patch, int(feature.shape[-1]))
        raise BackboneError(
            f"{type(model).__name__}: none of the poolings {[*_POOLINGS, 'the pooler']} of the last layer's output "
            "reproduces its classifier's logits, so eexit cannot tell what an exit should read. Describe it with "
            "eexit.GenericSpec(blocks=..., pool=<callable>, norm=..., num_classes=...)."
        )

    def _candidates(
        self, model: nn.Module, layers: str, hidden: torch.Tensor, norm: nn.Module, first_patch: int
    ) -> list[tuple[str, torch.Tensor]]:
        out = []
        with torch.no_grad():
            for name, pool in _POOLINGS.items():
                out.append((name, pool(hidden, norm, first_patch)))
            pooler = _find_pooler(model, layers)
            if pooler is not None:
                try:
                    out.append((pooler, model.get_submodule(pooler)(norm(hidden))))
                except RuntimeError:
                    pass  # a pooler for another layout (e.g. channels first): not what the classifier reads
        return [(name, feature) for name, feature in out if feature.dim() == 2]

    def _first_patch(self, model: nn.Module, hidden: torch.Tensor) -> int:
        cfg = model.config
        cfg = getattr(cfg, "vision_config", None) or cfg
        size, patch = getattr(cfg, "image_size", None), getattr(cfg, "patch_size", None)
        if isinstance(size, int) and isinstance(patch, int) and patch > 0:
            return max(0, hidden.shape[1] - (size // patch) ** 2)
        return 1 if any(name.endswith("cls_token") for name, _ in model.named_parameters()) else 0

    def _probe(self, model: nn.Module, last: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The last layer's hidden states and the model's logits (``None`` if headless) on a random batch."""
        param = next(model.parameters())
        channels, height, width = self.input_shape(model)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(2, channels, height, width, generator=generator).to(param.device, param.dtype)
        seen: list[torch.Tensor] = []
        modes = [(m, m.training) for m in model.modules()]
        handle = last.register_forward_hook(lambda module, args, output: seen.append(self.hidden(output)))
        try:
            model.eval()
            with torch.no_grad():
                output: Any = model(pixel_values=x)
        except Exception as err:  # any failure here means: this model is not what the spec can describe
            raise BackboneError(
                f"could not run {type(model).__name__}(pixel_values=<[2, {channels}, {height}, {width}]>) to "
                f"discover its layout ({type(err).__name__}: {err}). Describe it with eexit.GenericSpec."
            ) from err
        finally:
            handle.remove()
            for module, mode in modes:
                module.training = mode
        logits = getattr(output, "logits", None) if self.num_classes(model) is not None else None
        return seen[-1], logits

    def input_shape(self, model: nn.Module) -> tuple[int | None, int | None, int | None]:
        cfg = getattr(model.config, "vision_config", None) or model.config
        size = getattr(cfg, "image_size", None)
        if size is None or getattr(cfg, "num_channels", None) is None:
            raise BackboneError(
                f"{type(model).__name__} has no fixed input size (config.image_size / num_channels): it takes "
                "variable-resolution patches with extra inputs (e.g. SigLIP2's pixel_attention_mask and "
                "spatial_shapes), which eexit does not pass. Use a fixed-resolution model."
            )
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return int(cfg.num_channels), int(height), int(width)


register_spec(HFAutoSpec())
