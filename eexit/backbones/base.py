"""What a backbone spec is, and the registry that picks one for a model.

A spec *describes* one backbone family: which modules are the blocks (candidate exit points), how a block's
output becomes the pooled feature an IM reads (through the backbone's own final norm and pooling), how to call
the model and read its logits, and how to shrink the batch at a block. It holds no hook, training or saving
code: :mod:`eexit.attach` and :mod:`eexit.inference` act on what it says.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from ..errors import BackboneError, EexitValueError

__all__ = ["BackboneSpec", "find_spec", "get_spec", "list_specs", "register_spec"]


class BackboneSpec:
    """Base class of backbone specs; subclasses override what differs from a plain token transformer.

    The defaults suit blocks that return a ``[B, N, D]`` tensor or a tuple whose first element is one.
    """

    #: unique registry name, stored in saved adapters as the backbone family
    name: str = ""
    #: what the model reads: ``"images"`` (tensors [B, C, H, W]) or ``"graphs"`` (torch_geometric batches, GRIT)
    input_kind: str = "images"

    def matches(self, model: nn.Module) -> bool:
        """Whether this spec describes ``model``."""
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The ordered blocks (qualified module name, module) whose outputs can feed an exit."""
        raise NotImplementedError

    def feature_width(self, model: nn.Module) -> int:
        """Width D of the pooled feature :meth:`pool` returns."""
        raise NotImplementedError

    def pool(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Pool a block's hidden states ``[B, N, D]`` into the feature ``[B, D]`` an IM reads."""
        raise NotImplementedError

    def exit_width(self, model: nn.Module, block: int) -> int:
        """Width of the feature :meth:`pool_at` returns at block ``block`` (index into :meth:`blocks`).

        Every block of a plain transformer has the same width, :meth:`feature_width`; hierarchical backbones
        (Swin) override this, since their stages differ in width.
        """
        return self.feature_width(model)

    def pool_at(self, model: nn.Module, hidden: torch.Tensor, block: int) -> torch.Tensor:
        """Pool the hidden states of block ``block`` into ``[B, exit_width(model, block)]``.

        Defaults to :meth:`pool`, which suits backbones whose blocks all pool alike; hierarchical backbones
        override it because only the last stage can go through the backbone's own final norm.
        """
        return self.pool(model, hidden)

    def num_classes(self, model: nn.Module) -> int | None:
        """Classes of the backbone's own head, or ``None`` when it has no classifier."""
        raise NotImplementedError

    def input_shape(self, model: nn.Module) -> tuple[int | None, int | None, int | None]:
        """Expected (channels, height, width) of an input image; ``None`` where any value is accepted."""
        return (None, None, None)

    def call(self, model: nn.Module, pixel_values: torch.Tensor) -> Any:
        """Run the whole backbone on a batch."""
        return model(pixel_values)

    def logits(self, output: Any) -> torch.Tensor:
        """Read the class logits ``[B, C]`` from what :meth:`call` returned."""
        if isinstance(output, torch.Tensor):
            return output
        logits = getattr(output, "logits", None)
        if isinstance(logits, torch.Tensor):
            return logits
        raise BackboneError(f"{self.name}: cannot read logits from a backbone output of type {type(output)}.")

    def hidden(self, block_output: Any) -> torch.Tensor:
        """The hidden-state tensor inside a block's output."""
        if isinstance(block_output, torch.Tensor):
            return block_output
        if isinstance(block_output, (tuple, list)) and isinstance(block_output[0], torch.Tensor):
            return block_output[0]
        raise BackboneError(
            f"{self.name}: a block returned {type(block_output).__name__}; expected a tensor or a tuple whose "
            "first element is the hidden states."
        )

    def shrink(self, block_output: Any, keep: torch.Tensor) -> Any:
        """Keep only the samples at positions ``keep`` (a 1-D index tensor) in a block's output."""
        if isinstance(block_output, torch.Tensor):
            return block_output.index_select(0, keep)
        rest = tuple(block_output[1:])
        return type(block_output)((block_output[0].index_select(0, keep), *rest))

    def describe(self, model: nn.Module) -> dict[str, Any]:
        """Provenance stored with an adapter: model class, base model id and revision where known."""
        return {"family": self.name, "model_class": type(model).__name__}

    # ------------------------------------------------------------------ segments (eexit.segments)
    #: Whether the spec can run the backbone as segments without its own forward (:meth:`embed`, :meth:`run_block`,
    #: :meth:`final_logits`): what the eager early-exit path, ``ee.compile`` and ``ee.export`` use.
    segments = False

    def embed(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` to the hidden states ``[B, N, D]`` block 0 reads (what the forward does first)."""
        raise NotImplementedError

    def run_block(self, model: nn.Module, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Run block ``index`` on hidden states ``[B, N, D]`` as the backbone's forward calls it."""
        return self.hidden(self.blocks(model)[index][1](hidden))

    def final_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The backbone head's logits ``[B, C]`` from the last block's hidden states (models with a head)."""
        raise NotImplementedError


class StagedSpec(BackboneSpec):
    """A backbone run as stages, stage k ending at the model's own exit classifier k.

    A subclass describes the stages; :class:`eexit.staged.StagedDriver` runs them (no hooks installed). Its
    ``blocks`` are the exit classifiers, so ``exit_blocks`` index the model's exits; the last classifier is the
    final exit. ``pool``, ``hidden`` and ``shrink`` (per-block hooks) are not used.
    """

    def exit_classifiers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The model's exit classifiers (qualified name, module), in forward order; the last is the final exit."""
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return self.exit_classifiers(model)

    def exit_width(self, model: nn.Module, block: int) -> int:
        """Width D_k of the feature :meth:`run_stage` returns for exit ``block``."""
        raise NotImplementedError

    def start(self, model: nn.Module, images: torch.Tensor) -> Any:
        """Check ``images`` [B, C, H, W] and return the state before stage 0."""
        raise NotImplementedError

    def run_stage(self, model: nn.Module, k: int, state: Any) -> tuple[Any, torch.Tensor]:
        """Run stage k's trunk (no classifier) on ``state``; return the next state and exit k's feature [B, D_k]."""
        raise NotImplementedError

    def classifier_input(
        self, model: nn.Module, k: int, feature: torch.Tensor, logits: list[torch.Tensor]
    ) -> torch.Tensor:
        """The input of exit k's classifier, from its feature and the logits of exits 0..k-1 (same samples)."""
        return feature

    def shrink_state(self, model: nn.Module, state: Any, keep: torch.Tensor) -> Any:
        """Keep only the samples at positions ``keep`` (a 1-D index tensor) in every batch-sized part of ``state``."""
        raise NotImplementedError

    def state_tensors(self, state: Any) -> tuple[torch.Tensor, ...]:
        """The batch-first tensors of a stage state, for segments (whose carry is a flat tuple of tensors)."""
        raise NotImplementedError

    def state_from_tensors(self, model: nn.Module, tensors: tuple[torch.Tensor, ...]) -> Any:
        """The stage state back from :meth:`state_tensors`."""
        raise NotImplementedError

    def default_input_size(self, model: nn.Module) -> tuple[int, int, int] | None:
        """(C, H, W) at which :func:`eexit.attach` measures the cost table when no ``input_size`` is given."""
        return None

    def pool(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        raise BackboneError(f"{self.name}: a staged spec reads exit features with run_stage, not pool().")


_REGISTRY: dict[str, BackboneSpec] = {}
_BUILTINS: frozenset[str] = frozenset()


def register_spec(spec: BackboneSpec) -> BackboneSpec:
    """Register a backbone spec under its ``name``; a duplicate name is an error.

    Returns:
        The spec itself, so this can decorate an instance at module level.
    """
    if not spec.name:
        raise EexitValueError(f"{type(spec).__name__} has an empty name; give the spec a unique `name`.")
    if spec.name in _REGISTRY:
        raise EexitValueError(
            f"a backbone spec named {spec.name!r} is already registered ({type(_REGISTRY[spec.name]).__name__}); "
            "pick another name."
        )
    _REGISTRY[spec.name] = spec
    return spec


def seal_builtins() -> None:
    """Mark the specs registered so far as eexit's own (``eexit.backbones`` calls this once it imported them).

    :func:`find_spec` asks the specs users register before the built-in ones, so a user's spec for a model that a
    built-in spec also describes wins, whenever it was registered.
    """
    global _BUILTINS
    _BUILTINS = frozenset(_REGISTRY)


def list_specs() -> list[str]:
    """Names of the registered backbone specs."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    """The registered spec called ``name``."""
    if name not in _REGISTRY:
        raise EexitValueError(f"no backbone spec named {name!r}; registered specs: {sorted(_REGISTRY)}.")
    return _REGISTRY[name]


def find_spec(model: nn.Module, name: str | None = None) -> BackboneSpec:
    """The spec for ``model``: the one called ``name``, or the first registered spec that matches."""
    if not isinstance(model, nn.Module):
        raise BackboneError(f"eexit attaches to a torch.nn.Module, got {type(model).__name__}.")
    if name is not None:
        spec = get_spec(name)
        if not spec.matches(model):
            raise BackboneError(f"backbone spec {name!r} does not describe a {type(model).__name__}.")
        return spec
    # Users' specs first (a stable sort keeps each group in registration order), then eexit's own.
    for spec in sorted(_REGISTRY.values(), key=lambda s: s.name in _BUILTINS):
        if spec.matches(model):
            return spec
    raise BackboneError(
        f"no backbone spec recognises {type(model).__module__}.{type(model).__name__}. Known specs: "
        f"{sorted(_REGISTRY)}. For another transformer, describe it with a generic spec: "
        "eexit.attach(model, spec=eexit.GenericSpec(blocks='encoder.layers', pool='cls', norm='norm'))."
    )


def matched_elsewhere(spec: BackboneSpec, model: nn.Module) -> bool:
    """Whether a registered spec other than ``spec``, and not a catch-all, describes ``model``.

    Catch-all specs (class attribute ``catch_all = True``: the transformers discovery spec, the refusals) call
    this in :meth:`BackboneSpec.matches`, so that they defer to every family spec whatever the registration
    order, including specs users register later.
    """
    return any(
        other is not spec and not getattr(other, "catch_all", False) and other.matches(model)
        for other in _REGISTRY.values()
    )


def loaded_class(module: str, name: str) -> type | None:
    """The class ``module.name`` if ``module`` is already imported, else ``None``.

    A model can only be an instance of a class whose module is loaded, so matchers use this to answer "no"
    without importing timm or transformers (seconds) for a model that comes from neither.
    """
    cls = getattr(sys.modules.get(module), name, None)
    return cls if isinstance(cls, type) else None


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)`` with an error that names the missing path."""
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise BackboneError(f"{type(model).__name__} has no submodule {path!r} ({err}).") from None
