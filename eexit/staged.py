"""Staged backbones: the model's own exit classifiers become eexit's exits, and early exit skips whole stages.

Some backbones are early-exit networks already. The Dynamic Perceiver (Han et al., ICCV 2023) ends each of
four stages with a classifier of its own, and later exits read earlier exits' logits through its inter-stage
connections. Forward hooks cannot stop such a model between stages, nor let one exit read another's new logits,
so a :class:`StagedSpec` describes the forward as stages and :class:`StagedDriver` runs them (the
:class:`~eexit.EarlyExitModel` of such a backbone holds this driver instead of the hooked one):

* stage k runs the frozen trunk up to exit k and returns that exit's *feature* (what its classifier reads,
  before any earlier exit's logits are mixed in); ``StagedSpec.classifier_input`` then combines the feature
  with earlier exits' logits, and exit k's classifier maps it to logits;
* the IMs are trainable **copies** of the model's own exit classifiers, the last exit is the model's own
  final classifier (frozen with the backbone). JEI-DNN (Regol et al., ICLR 2024; ``reference/backbones.md``
  §1.9) fine-tuned the first three Dynamic Perceiver exits with everything else frozen; training copies computes
  exactly that, while the backbone's weights stay untouched: ``detach()`` gives back the model bit for bit,
  the adapter holds only the fine-tuned classifier and gate tensors, and its fingerprint still matches the
  original weights, so it loads onto them;
* early exit runs the stages in order, hands each exit's feature to the call's sink (:mod:`eexit.recorder`,
  shared with the hooked driver), shrinks the state (every branch of the backbone) to the samples that continue,
  and stops when none remain. The decisions equal those of :func:`eexit.inference.decide_exits` on the all-exits
  outputs, and the FLOPs spent equal the cost table's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .backbones.base import StagedSpec
from .config import ExitConfig
from .errors import EexitValueError
from .recorder import STOP, ExitSink

# StagedSpec lives with the other spec classes (eexit.backbones.base); re-exported here, where it used to be.
__all__ = ["StagedDriver", "StagedSpec"]


def _trainable_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that owns its parameters, all trainable, in eval mode, without hooks."""
    clone = copy.deepcopy(module)
    for sub in clone.modules():
        # deepcopy copies the hook tables too; hooks the user put on the model's classifiers stay on the model.
        for name, table in vars(sub).items():
            if "hooks" in name and isinstance(table, dict):
                table.clear()
    for p in clone.parameters():
        p.requires_grad_(True)
    return clone.eval()


class StagedDriver:
    """Runs a :class:`StagedSpec` backbone stage by stage; its exits are the model's own classifiers.

    The IMs (``ee.heads[k]``, k < E-1) are trainable copies of the model's exit classifiers; the last exit is the
    model's own final classifier. Training updates the copies, never the backbone's weights: ``detach()`` gives
    back the model bit for bit, and the fine-tuned exits live in the adapter. To put them into the standalone
    model, load ``ee.exit_classifier_state_dict()`` into it after ``detach()``.

    Args:
        backbone: the user's model (used in place).
        spec: its stages.
        exit_blocks: must be every exit but the last (later exits read earlier exits' logits).
        config: the exit configuration; ``head`` and ``head_hidden`` do not apply (the IMs are copies).
    """

    #: Exit k's classifier reads exits 0..k-1's logits (the Dynamic Perceiver's isc links).
    reads_earlier_exits = True
    #: The last exit is the model's own final classifier.
    has_head = True

    def __init__(self, backbone: nn.Module, spec: StagedSpec, exit_blocks: list[int], config: ExitConfig) -> None:
        classifiers = spec.exit_classifiers(backbone)
        names = [name for name, _ in classifiers]
        if list(exit_blocks) != list(range(len(classifiers) - 1)):
            # Later exits read earlier exits' logits, so every exit of the model is needed; fewer is future work.
            raise EexitValueError(
                f"{type(backbone).__name__}'s exits are its own classifiers {names}; eexit puts a gate on each "
                f"but the last, so exit_blocks must be {tuple(range(len(classifiers) - 1))} (or None), got "
                f"{tuple(exit_blocks)}. Drop exit_blocks."
            )
        if config.head != "linear" or config.head_hidden is not None:
            raise EexitValueError(
                f"{type(backbone).__name__}'s IMs are copies of its own classifiers {names[:-1]}, so head and "
                f"head_hidden do not apply; got head={config.head!r}, head_hidden={config.head_hidden!r}. Drop them."
            )
        self.backbone = backbone
        self.spec = spec
        self.names = names
        self.exit_blocks = list(exit_blocks)

    # ------------------------------------------------------------------ structure
    def build_heads(self, num_classes: int, config: ExitConfig) -> nn.ModuleList:
        """Trainable copies of the model's exit classifiers, all but the final one."""
        return nn.ModuleList(_trainable_copy(module) for _, module in self.spec.exit_classifiers(self.backbone)[:-1])

    def exit_names(self) -> list[str]:
        return list(self.names)

    def feature_widths(self) -> list[int]:
        """One feature per exit, the final exit's included (no head logits: they depend on the IMs)."""
        return [self.spec.exit_width(self.backbone, k) for k in range(len(self.names))]

    def classify(
        self, heads: nn.ModuleList, k: int, feature: torch.Tensor, earlier: list[torch.Tensor]
    ) -> torch.Tensor:
        """Exit k's logits ``[b, C]`` from its feature and the earlier exits' logits of the same samples."""
        head = heads[k] if k < len(heads) else self.backbone.get_submodule(self.names[-1])
        return head(self.spec.classifier_input(self.backbone, k, feature, earlier))

    def check_input(self, images: torch.Tensor, input_shape: list[int] | None) -> None:
        if input_shape and list(images.shape[1:]) != list(input_shape):
            # The costs (CNN FLOPs grow with the pixels) were measured at one size: other sizes would misreport them.
            c, h, w = input_shape
            raise EexitValueError(
                f"expected images of shape [B, {c}, {h}, {w}] (the size the cost table was measured at), got "
                f"{tuple(images.shape)}. Resize the images, or attach again with "
                f"input_size={tuple(images.shape[1:])} to run at that size."
            )

    def exit_classifier_state_dict(self, heads: nn.ModuleList) -> dict[str, torch.Tensor]:
        """The IMs' tensors under the backbone's own names (``early_classifier3.weight``, ...)."""
        return {
            f"{name}.{key}": value.detach().clone()
            for name, head in zip(self.names, heads)
            for key, value in head.state_dict().items()
        }

    def install(self) -> None:
        """Nothing to install: the stages are called by :meth:`run`."""

    def remove(self) -> None:
        pass

    # ------------------------------------------------------------------ running
    def run(self, images: torch.Tensor, sink: ExitSink) -> None:
        """Run the stages in order, each exit's feature to ``sink``, shrinking the state as the sink says.

        Returns ``None``: the final exit is one of the model's classifiers and goes through the sink too.
        """
        state = self.spec.start(self.backbone, images)
        for k in range(len(self.names)):
            state, feature = self.spec.run_stage(self.backbone, k, state)
            step = sink.add(k, feature)
            if step is STOP:
                break
            if step is not None:
                state = self.spec.shrink_state(self.backbone, state, step)
        return None
