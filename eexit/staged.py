"""Staged backbones: the model's own exit classifiers become eexit's exits, and early exit skips whole stages.

Some backbones are early-exit networks already. The Dynamic Perceiver (Han et al., ICCV 2023) ends each of
four stages with a classifier of its own, and later exits read earlier exits' logits through its inter-stage
connections. Forward hooks cannot stop such a model between stages, nor let one exit read another's new logits,
so a :class:`StagedSpec` describes the forward as stages and :class:`StagedEarlyExitModel` drives them:

* stage k runs the frozen trunk up to exit k and returns that exit's *feature* (what its classifier reads,
  before any earlier exit's logits are mixed in); ``StagedSpec.classifier_input`` then combines the feature
  with earlier exits' logits, and exit k's classifier maps it to logits;
* the IMs are trainable **copies** of the model's own exit classifiers, the last exit is the model's own
  final classifier (frozen with the backbone). JEI-DNN (Regol et al., ICLR 2024; ``reference/backbones.md``
  §1.9) fine-tuned the first three Dynamic Perceiver exits with everything else frozen; training copies computes
  exactly that, while the backbone's weights stay untouched: ``detach()`` gives back the model bit for bit,
  the adapter holds only the fine-tuned classifier and gate tensors, and its fingerprint still matches the
  original weights, so it loads onto them;
* early exit runs the stages in order, decides after each exit, shrinks the state (every branch of the
  backbone) to the samples that continue, and stops when none remain. The decisions equal those of
  :func:`eexit.inference.decide_exits` on the all-exits outputs, and the FLOPs spent equal the cost table's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .backbones.base import StagedSpec
from .config import ExitConfig
from .errors import EexitValueError
from .gates import ExitHistory
from .inference import ExitPolicy, ExitState
from .model import AllExitsOutput, EarlyExitModel, EarlyExitOutput, _record_exits

# StagedSpec lives with the other spec classes (eexit.backbones.base); re-exported here, where it used to be.
__all__ = ["StagedEarlyExitModel", "StagedSpec"]


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


class StagedEarlyExitModel(EarlyExitModel):
    """An :class:`EarlyExitModel` over a :class:`StagedSpec` backbone. Build it with :func:`eexit.attach`.

    ``heads[k]`` is a trainable copy of the model's exit classifier k (k < E-1); the last exit is the model's own
    final classifier. Everything else works as for hooked backbones: ``ee(images)`` exits early,
    ``ee(images, all_exits=True)`` runs every exit, :func:`eexit.fit`, :func:`eexit.evaluate` and
    ``save_pretrained`` / :func:`eexit.from_pretrained` apply unchanged. The model is in eval mode after attach.

    Training updates the copies, never the backbone's weights: ``detach()`` restores every flag and mode that
    attach changed and gives back the model bit for bit, and the fine-tuned exits live in the adapter. To put
    them into the standalone model, load :meth:`exit_classifier_state_dict` into it after ``detach()``.
    """

    spec: StagedSpec

    def __init__(
        self, backbone: nn.Module, spec: StagedSpec, exit_blocks: list[int], num_classes: int, config: ExitConfig
    ) -> None:
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
        super().__init__(backbone, spec, exit_blocks, num_classes, config)
        self.heads = nn.ModuleList(_trainable_copy(module) for _, module in classifiers[:-1])
        self._final_name = names[-1]
        # Inference-ready, like the model it wraps: a dropout inside a copied head must not fire at inference
        # (fit() switches modes itself). The backbone's modes are attach()'s to record and change.
        self.training = False
        self.heads.eval()
        self.gates.eval()

    # ------------------------------------------------------------------ structure
    @property
    def exit_names(self) -> list[str]:
        return [name for name, _ in self.spec.exit_classifiers(self.backbone)]

    def exit_classifier_state_dict(self) -> dict[str, torch.Tensor]:
        """The IMs' tensors under the backbone's own names (``early_classifier3.weight``, ...).

        After :meth:`detach`, ``model.load_state_dict(sd, strict=False)`` writes the fine-tuned exits into the
        standalone model (e.g. to use its own confidence-threshold policy); eexit itself never does.
        """
        return {
            f"{name}.{key}": value.detach().clone()
            for name, head in zip(self.exit_names, self.heads)
            for key, value in head.state_dict().items()
        }

    # ------------------------------------------------------------------ one exit
    def _exit_logits(
        self, k: int, feature: torch.Tensor, logits: list[torch.Tensor], history: ExitHistory | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Exit k's logits [b, C] (and gate logit [b] but at the last exit) from its feature and earlier logits."""
        head = self.heads[k] if k < self.num_exits - 1 else self.backbone.get_submodule(self._final_name)
        out = head(self.spec.classifier_input(self.backbone, k, feature, logits))  # [b, C]
        return out, (self.gates[k](out, history) if k < self.num_exits - 1 else None)

    def _history_of(self, logits: list[torch.Tensor]) -> ExitHistory | None:
        """The gates' view of the earlier exits, from their logits (``None`` when the gates do not read it)."""
        if not self.uses_history:
            return None
        history = ExitHistory()
        for earlier in logits:
            history = history.after(earlier)
        return history

    def _check_input(self, pixel_values: Any) -> torch.Tensor:
        if self._restore is None and self.cost_table is not None:
            raise EexitValueError("these exits were detached from the backbone; attach again with eexit.attach(model).")
        pixel_values = super()._check_input(pixel_values)
        table = self.cost_table
        if table is not None and table.input_shape and list(pixel_values.shape[1:]) != list(table.input_shape):
            # The costs (CNN FLOPs grow with the pixels) were measured at one size: other sizes would misreport them.
            c, h, w = table.input_shape
            raise EexitValueError(
                f"expected images of shape [B, {c}, {h}, {w}] (the size the cost table was measured at), got "
                f"{tuple(pixel_values.shape)}. Resize the images, or attach again with "
                f"input_size={tuple(pixel_values.shape[1:])} to run at that size."
            )
        return pixel_values

    # ------------------------------------------------------------------ forwards
    def _run_all_exits(self, pixel_values: torch.Tensor, on_exit: Callable[[], None] | None = None) -> AllExitsOutput:
        state = self.spec.start(self.backbone, pixel_values)
        logits: list[torch.Tensor] = []
        gate_logits: list[torch.Tensor] = []
        for k in range(self.num_exits):
            state, feature = self.spec.run_stage(self.backbone, k, state)
            out, gate_logit = self._exit_logits(k, feature, logits, self._history_of(logits))
            logits.append(out)
            if gate_logit is not None:
                gate_logits.append(gate_logit)
                if on_exit is not None:  # the cost table reads the FLOPs spent so far here
                    on_exit()
        return AllExitsOutput(logits=torch.stack(logits), gate_logits=torch.stack(gate_logits), gates=self.config.gates)

    def exit_features(self, pixel_values: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Every exit's feature (final exit included) and ``None``: the last exit's logits depend on the IMs.

        The features come from the frozen trunk only, so :func:`eexit.fit` caches them; the isc links that feed
        earlier exits' logits into later exits are recomputed by :meth:`outputs_from_features` every time.
        """
        state = self.spec.start(self.backbone, self._check_input(pixel_values))
        features = []
        for k in range(self.num_exits):
            state, feature = self.spec.run_stage(self.backbone, k, state)
            features.append(feature)
        return features, None

    def feature_layout(self) -> tuple[list[int], bool]:
        """One feature per exit, the final exit's included, and no head logits (they depend on the IMs)."""
        return [self.spec.exit_width(self.backbone, k) for k in range(self.num_exits)], False

    def outputs_from_features(self, features: list[torch.Tensor], final_logits: torch.Tensor | None) -> AllExitsOutput:
        """All-exit outputs from cached :meth:`exit_features` (``final_logits`` is unused: it is always ``None``)."""
        logits: list[torch.Tensor] = []
        gate_logits: list[torch.Tensor] = []
        for k, feature in enumerate(features):
            out, gate_logit = self._exit_logits(k, feature, logits, self._history_of(logits))
            logits.append(out)
            if gate_logit is not None:
                gate_logits.append(gate_logit)
        return AllExitsOutput(logits=torch.stack(logits), gate_logits=torch.stack(gate_logits), gates=self.config.gates)

    def forward(
        self, pixel_values: torch.Tensor, *, all_exits: bool = False, policy: ExitPolicy | None = None
    ) -> EarlyExitOutput | AllExitsOutput:
        """Run the model stage by stage; see :meth:`EarlyExitModel.forward`.

        In early-exit mode, after stage k the samples that stop at exit k are recorded and the state of the
        others (every branch, and their earlier logits) is shrunk to them; later stages never see the rest.
        """
        pixel_values = self._check_input(pixel_values)
        if all_exits:
            return self._run_all_exits(pixel_values)
        policy = self._check_policy(policy)
        batch, device = pixel_values.shape[0], pixel_values.device
        running = ExitState.start(batch, device, with_history=self.uses_history)
        out_exit = torch.full((batch,), self.num_exits - 1, dtype=torch.long, device=device)
        out_logits: torch.Tensor | None = None
        state = self.spec.start(self.backbone, pixel_values)
        logits: list[torch.Tensor] = []  # earlier exits' logits of the running samples, for the isc links
        for k in range(self.num_exits):
            state, feature = self.spec.run_stage(self.backbone, k, state)
            out, gate_logit = self._exit_logits(k, feature, logits, running.history)  # [b, C], [b]
            if out_logits is None:
                out_logits = out.new_zeros(batch, out.shape[-1])
            last = k == self.num_exits - 1
            stop = torch.ones_like(running.positions, dtype=torch.bool) if last else policy(k, out, gate_logit, running)
            done, keep = _record_exits(out_logits, out_exit, running, k, out, stop)
            if last or done:
                break
            running.advance(gate_logit, out)
            logits.append(out)
            if keep is not None:
                running.keep(keep)
                state = self.spec.shrink_state(self.backbone, state, keep)
                logits = [t.index_select(0, keep) for t in logits]
        return EarlyExitOutput(logits=out_logits, exit_index=out_exit, cost=self._costs_of(out_exit))
