"""Backbone spec for the Dynamic Perceiver (Han et al., "Dynamic Perceiver for Efficient Visual Recognition",
ICCV 2023): its four exits become eexit's exits, and early exit skips the stages after a sample's exit.

As in the JEI-DNN authors' Dyn-Perceiver experiment (Regol et al., ICLR 2024; ``reference/backbones.md`` §1.9):

* the exits are the model's own classifiers, named explicitly (registration order differs between trunks):
  ``early_classifier3``, ``classifier_att``, ``classifier_cnn`` carry a gate each; ``classifier_merge`` is the
  final exit;
* the IMs are trainable copies of the first three (:mod:`eexit.staged`); the isc links, the merged head and
  everything else stay frozen;
* exit 2 reads ``isc3(logits of exit 1)`` and exit 4 reads ``isc4(logits of exit 2)``. By default the IM losses
  flow through these links, as in the authors' wrapper; ``DynPerceiverSpec(detach_isc=True)`` cuts them so each
  IM learns from its own exit only (``reference/backbones.md`` §1.10). Either way the final exit reads the
  *fine-tuned* exit 2, so its predictions move as the IMs train (as in the authors' setup): ``evaluate``'s
  "backbone alone" row is that final exit, not the untouched model;
* the model runs at any resolution, but the exits' costs depend on it: ``attach`` measures them at
  ``input_size`` (default: the model's ``pretrained_cfg``, 224 px) and the early-exit model accepts that size only.

The four stages follow the paper's inference order (Fig. 6): stem ... SA3 -> exit 1; CNN stage 3, z2x4/x2z4,
SA4 -> exit 2; CNN stage 4 -> exit 3; last z2x -> exit 4. They run the model's own stage methods (``_trunk1`` ...
``_trunk4``, which :meth:`~eexit.models.dynamic_perceiver.DynPerceiver.forward_exits` and ``forward_stages`` run
too, and which share their step methods with ``forward``; a test checks that they reproduce the model's outputs
bit for bit), and the state is shrunk with the model's
own ``shrink``. The bare backbone's forward (the cost table's reference) is ``forward_exits``, all four exits as
released; the model's own ``forward`` returns the merged logits in eval mode, as a timm classifier does.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import EexitTypeError, EexitValueError
from .base import StagedSpec, register_spec

if TYPE_CHECKING:
    from ..models.dynamic_perceiver import DynPerceiver, DynPerceiverState

__all__ = ["DynPerceiverSpec"]

_MODULE = "eexit.models.dynamic_perceiver"


class DynPerceiverSpec(StagedSpec):
    """:class:`~eexit.models.dynamic_perceiver.DynPerceiver` (every trunk and configuration).

    Args:
        detach_isc: stop gradients at the isc links, so exit 2's loss does not train exit 1's IM (nor the final
            exit's loss exit 2's). Default False, as the JEI-DNN authors trained. Pass the instance to
            ``eexit.attach(model, spec=DynPerceiverSpec(detach_isc=True))``.
    """

    name = "dyn_perceiver"

    def __init__(self, detach_isc: bool = False) -> None:
        if not isinstance(detach_isc, bool):
            raise EexitTypeError(f"detach_isc must be True or False, got {detach_isc!r}.")
        self.detach_isc = detach_isc

    def matches(self, model: nn.Module) -> bool:
        # No import: if the model module was never imported, no DynPerceiver can exist.
        module = sys.modules.get(_MODULE)
        return module is not None and isinstance(model, module.DynPerceiver)

    # ------------------------------------------------------------------ description
    def exit_classifiers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        if model.classifier_merge is None or model.num_classes == 0:
            raise EexitValueError(
                f"This {type(model).__name__} has no final classifier (num_classes=0, reset_classifier(0) or "
                "prune_intermediate_layers removed it), but eexit's final exit is its classifier_merge. Give it "
                "classes first: model.reset_classifier(num_classes), or timm.create_model(name, num_classes=...)."
            )
        return [(name, model.get_submodule(name)) for name in model.exit_names]

    def feature_width(self, model: nn.Module) -> int:
        """The widest exit feature: the final exit's (pooled final map and mean latent, before isc4)."""
        merge_in = int(model.classifier_merge[0].num_features)
        return merge_in - self._latent_width(model) if model.config.with_isc else merge_in

    def exit_width(self, model: nn.Module, block: int) -> int:
        """Width of exit ``block``'s feature: mean latent C3, mean latent C4, pooled map C_out, both C_out + C4."""
        final = self.feature_width(model)
        return (
            int(model.early_classifier3.in_features),
            self._latent_width(model),
            final - self._latent_width(model),
            final,
        )[block]

    def num_classes(self, model: nn.Module) -> int | None:
        return int(model.num_classes)

    def input_shape(self, model: nn.Module) -> tuple[int | None, int | None, int | None]:
        return (3, None, None)  # any size >= the trunk's stride; attach pins the cost table's size

    def default_input_size(self, model: nn.Module) -> tuple[int, int, int] | None:
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
        return tuple(int(s) for s in size) if size else None  # type: ignore[return-value]

    def call(self, model: nn.Module, pixel_values: torch.Tensor) -> Any:
        """The whole model with every exit (``forward_exits``): the bare backbone's cost is the released forward's."""
        return model.forward_exits(pixel_values)

    def logits(self, output: Any) -> torch.Tensor:
        # forward_exits' tuple ends with y_merge; model(x) is y_merge itself in eval mode.
        return output[-1] if isinstance(output, (tuple, list)) else super().logits(output)

    def describe(self, model: nn.Module) -> dict[str, Any]:
        info = super().describe(model)
        info["trunk"] = model.config.trunk
        return info

    @staticmethod
    def _latent_width(model: nn.Module) -> int:
        width = int(model.classifier_att.in_features)
        return width // 2 if model.config.with_isc else width  # with isc: [mean latent, isc3(exit 1)]

    # ------------------------------------------------------------------ stages
    def start(self, model: nn.Module, images: torch.Tensor) -> DynPerceiverState:
        return model.initial_state(images)  # checks the images (size >= the trunk's stride, RGB, float)

    def run_stage(self, model: nn.Module, k: int, state: Any) -> tuple[Any, torch.Tensor]:
        return _TRUNKS[k](model, state)

    def classifier_input(
        self, model: nn.Module, k: int, feature: torch.Tensor, logits: list[torch.Tensor]
    ) -> torch.Tensor:
        if not model.config.with_isc or k not in (1, 3):
            return feature
        # Forward knowledge transfer: exit 2 reads isc3(exit 1), exit 4 reads isc4(exit 2).
        source, isc = (logits[0], model.isc3) if k == 1 else (logits[1], model.isc4)
        return torch.cat((feature, isc(source.detach() if self.detach_isc else source)), dim=1)

    def shrink_state(self, model: nn.Module, state: Any, keep: torch.Tensor) -> Any:
        return model.shrink(state, keep)

    segments = True

    def state_tensors(self, state: Any) -> tuple[torch.Tensor, ...]:
        return (state.x, state.z)  # the stages read the exits' logits from the driver, not from the state

    def state_from_tensors(self, model: nn.Module, tensors: tuple[torch.Tensor, ...]) -> Any:
        return _state(*tensors)


# ---------------------------------------------------------------------- trunks: the model's stages minus classifiers
def _state(x: torch.Tensor, z: torch.Tensor) -> DynPerceiverState:
    from ..models.dynamic_perceiver import DynPerceiverState

    return DynPerceiverState(x, z)


def _trunk1(m: DynPerceiver, s: DynPerceiverState) -> tuple[DynPerceiverState, torch.Tensor]:
    """Stem, C-stage 1, then CNN stages 1-2 with C-stages 2-3; feature: the mean latent after SA3 [B, C3]."""
    x, z = m._trunk1(s.x, s.z)
    return _state(x, z), z.mean(dim=1)


def _trunk2(m: DynPerceiver, s: DynPerceiverState) -> tuple[DynPerceiverState, torch.Tensor]:
    """CNN stage 3, reshape latent, z2x4, x2z4, SA4; feature: the mean latent [B, C4]."""
    x, z = m._trunk2(s.x, s.z)
    return _state(x, z), z.mean(dim=1)


def _trunk3(m: DynPerceiver, s: DynPerceiverState) -> tuple[DynPerceiverState, torch.Tensor]:
    """CNN stage 4; feature: the pooled map [B, C_out] (with the CNN head's dropout in training mode)."""
    x = m._trunk3(s.x)
    return _state(x, s.z), m._cnn_feature(x)


def _trunk4(m: DynPerceiver, s: DynPerceiverState) -> tuple[DynPerceiverState, torch.Tensor]:
    """Last z2x cross-attention; feature: [pooled final map, mean latent] [B, C_out + C4]."""
    x = m._trunk4(s.x, s.z)
    return _state(x, s.z), m._merge_feature(x, s.z)


_TRUNKS = (_trunk1, _trunk2, _trunk3, _trunk4)

register_spec(DynPerceiverSpec())
