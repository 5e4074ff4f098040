"""EarlyExitModel: a backbone with exits hooked on, and its two forwards.

* Early exit (default): at each exit point the hook runs the IM and gate on the samples still running, records
  those that stop, and hands the next block only the rest; when none remain, the backbone stops. Outputs come
  back in input order with each sample's exit index and cost.
* All exits (training and analysis): the backbone runs once on the whole batch; every exit's logits and gate
  logits are returned.

Per-call state lives in a ContextVar set for the duration of one call, never on the modules: the hooks do
nothing for a call that is not an eexit call (the backbone then behaves exactly as before), and two threads
never see each other's features.
"""

from __future__ import annotations

import contextvars
import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .backbones.base import BackboneSpec
from .config import ExitConfig, FitConfig
from .cost import CostTable
from .errors import BackboneError, EexitTypeError, EexitValueError
from .gates import ExitHistory, Gate, exit_probabilities
from .heads import ExitHead
from .inference import ExitPolicy, ExitState, GatePolicy

__all__ = ["AllExitsOutput", "EarlyExitModel", "EarlyExitOutput"]


@dataclass
class EarlyExitOutput:
    """Result of an early-exit forward, in input order.

    Attributes:
        logits: the prediction of the exit each sample took, ``[B, C]``.
        exit_index: 0-based exit each sample took, ``[B]`` (E-1 is the last exit).
        cost: FLOPs each sample used, from the cost table, ``[B]`` (float64).
    """

    logits: torch.Tensor
    exit_index: torch.Tensor
    cost: torch.Tensor

    @property
    def gflops(self) -> torch.Tensor:
        return self.cost / 1e9


@dataclass
class AllExitsOutput:
    """Every exit's output on every sample.

    Attributes:
        logits: ``[E, B, C]``, the last row from the backbone's own head when it has one.
        gate_logits: pre-sigmoid gate outputs of the E-1 intermediate exits, ``[E-1, B]``.
        gates: the gate kind (``ExitConfig.gates``), which says how gate values make exit probabilities.
    """

    logits: torch.Tensor
    gate_logits: torch.Tensor
    gates: str = "hazard"

    @property
    def gate_values(self) -> torch.Tensor:
        return torch.sigmoid(self.gate_logits)  # [E-1, B]

    @property
    def exit_probs(self) -> torch.Tensor:
        """P(G=l|x) under the gates' exit-probability model, ``[E, B]``."""
        return exit_probabilities(self.gate_values, self.gates)


class _AllExited(Exception):
    """Raised inside a hook to stop the backbone once no sample is left running."""


class RunMode(enum.Enum):
    """What one call of the backbone is for: real early exit, every exit's outputs, or the exits' features."""

    EARLY = "early"
    ALL = "all"
    FEATURES = "features"


@dataclass
class _Run:
    """State of one eexit call, visible to the hooks through ``_RUN``."""

    owner: EarlyExitModel
    mode: RunMode
    batch: int = 0  # input batch size (in early mode the running batch is state.positions)
    state: ExitState | None = None
    policy: ExitPolicy | None = None
    logits: list[torch.Tensor] = field(default_factory=list)
    gate_logits: list[torch.Tensor] = field(default_factory=list)
    history: ExitHistory | None = None  # all-exits mode, for gates that read earlier exits
    features: list[torch.Tensor] = field(default_factory=list)
    out_logits: torch.Tensor | None = None
    out_exit: torch.Tensor | None = None
    on_exit: Callable[[], None] | None = None


def _record_exits(
    out_logits: torch.Tensor, out_exit: torch.Tensor, state: ExitState, k: int, logits: torch.Tensor, stop: torch.Tensor
) -> tuple[bool, torch.Tensor | None]:
    """Write the stopping samples' logits and exit index ``k`` into the input-ordered outputs.

    Shared by the hooked and the staged early-exit forwards; reads the device once per exit.

    Returns:
        ``(all_stopped, keep)``: ``keep`` holds the running-batch positions of the samples that go on, or is
        ``None`` when none stopped here (the batch needs no shrinking).
    """
    rows = state.positions[stop]
    out_logits[rows] = logits[stop].to(out_logits.dtype)
    out_exit[rows] = k
    stopped = int(stop.sum())
    if stopped == stop.numel():
        return True, None
    return False, ((~stop).nonzero().squeeze(1) if stopped else None)


_RUN: contextvars.ContextVar[_Run | None] = contextvars.ContextVar("eexit_run", default=None)


class EarlyExitModel(nn.Module):
    """A backbone with IMs and gates attached through forward hooks. Build it with :func:`eexit.attach`.

    Calling it runs real early exit and returns an :class:`EarlyExitOutput`; ``all_exits=True`` returns an
    :class:`AllExitsOutput`. The backbone module is used in place, never copied or edited.
    """

    #: Marks models whose ``.backbone`` is the user's model (read by the fingerprint, which cannot import this).
    wraps_backbone = True

    def __init__(
        self,
        backbone: nn.Module,
        spec: BackboneSpec,
        exit_blocks: list[int],
        num_classes: int,
        config: ExitConfig,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.config = config
        self.num_classes = num_classes
        self.exit_blocks = list(exit_blocks)
        self.has_backbone_head = spec.num_classes(backbone) is not None
        # Per-exit widths: hierarchical backbones (Swin) widen from stage to stage.
        self.heads = nn.ModuleList(
            ExitHead(spec.exit_width(backbone, b), num_classes, config.head, config.head_hidden)
            for b in self.exit_blocks
        )
        self.gates = nn.ModuleList(Gate(config.gate_features) for _ in range(self.num_exits - 1))
        # Only gates that read earlier exits pay for carrying their history through the forward.
        self.uses_history = any(gate.uses_history for gate in self.gates)
        self.cost_table: CostTable | None = None
        self.fit_config: FitConfig | None = None
        self.history: list[dict[str, float]] = []
        self.backbone_trainable = False
        self.evaluation: dict[str, Any] | None = None
        # Named adapters: the tensors and training record of every adapter but the active one.
        self.active_adapter = "default"
        self._stored_adapters: dict[str, dict[str, Any]] = {}
        self._handles: list[Any] = []
        self._restore: Callable[[], None] | None = None

    # ------------------------------------------------------------------ structure
    @property
    def num_exits(self) -> int:
        """E: the IMs plus the backbone's own head when it has one."""
        return len(self.exit_blocks) + int(self.has_backbone_head)

    @property
    def exit_names(self) -> list[str]:
        names = [self.spec.blocks(self.backbone)[b][0] for b in self.exit_blocks]
        return names + (["<backbone head>"] if self.has_backbone_head else [])

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors only (IMs and gates), under stable names ``heads.{l}.*`` / ``gates.{l}.*``."""
        state = {f"heads.{k}": v for k, v in self.heads.state_dict().items()}
        state.update({f"gates.{k}": v for k, v in self.gates.state_dict().items()})
        return {k: v.detach().clone() for k, v in state.items()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load IM and gate tensors strictly: missing, unexpected or mis-shaped keys are named in the error."""
        own = self.adapter_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
        if missing or unexpected or wrong:
            details = [
                f"missing keys {missing}" if missing else "",
                f"unexpected keys {unexpected}" if unexpected else "",
            ]
            details += [f"{k}: expected shape {tuple(own[k].shape)}, got {tuple(state[k].shape)}" for k in wrong]
            raise EexitValueError(
                "adapter tensors do not fit this model: "
                + "; ".join(d for d in details if d)
                + ". Was the adapter saved for another backbone, exit placement or class count?"
            )
        with torch.no_grad():
            for name, module in (("heads", self.heads), ("gates", self.gates)):
                prefix = f"{name}."
                module.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})

    # ------------------------------------------------------------------ named adapters
    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters this model holds (the active one included)."""
        return sorted({self.active_adapter, *self._stored_adapters})

    def _adapter_record(self) -> dict[str, Any]:
        return {
            "state": self.adapter_state_dict(),
            "fit_config": self.fit_config,
            "history": list(self.history),
            "evaluation": self.evaluation,
            "threshold": self.config.threshold,
        }

    def add_adapter(self, name: str, record: dict[str, Any] | None = None) -> None:
        """Store an adapter under ``name`` without activating it.

        Args:
            name: a new adapter name.
            record: ``{"state": tensors, "fit_config": ..., "history": ..., "evaluation": ...}``; default: a
                copy of the active adapter (so that, e.g., the next :func:`eexit.fit` can start from it).
        """
        if not isinstance(name, str) or not name:
            raise EexitValueError(f"an adapter name must be a non-empty string, got {name!r}.")
        if name in self.adapter_names:
            raise EexitValueError(f"an adapter named {name!r} exists already; names here: {self.adapter_names}.")
        record = record if record is not None else self._adapter_record()
        own = self.adapter_state_dict()
        self.load_adapter_state_dict(record["state"])  # validates names and shapes before storing
        self.load_adapter_state_dict(own)
        self._stored_adapters[name] = record

    def set_adapter(self, name: str) -> None:
        """Make the adapter called ``name`` active: its IM and gate tensors go into the heads and gates, and its
        gate threshold (``config.threshold``, which each adapter keeps) becomes the model's."""
        if name == self.active_adapter:
            return
        if name not in self._stored_adapters:
            raise EexitValueError(f"no adapter named {name!r}; this model holds {self.adapter_names}.")
        record = self._stored_adapters.pop(name)
        self._stored_adapters[self.active_adapter] = self._adapter_record()
        self.load_adapter_state_dict(record["state"])
        self.fit_config, self.history = record.get("fit_config"), list(record.get("history") or [])
        self.evaluation = record.get("evaluation")
        if record.get("threshold") is not None:
            self.config = dataclasses.replace(self.config, threshold=float(record["threshold"]))
        self.active_adapter = name

    # ------------------------------------------------------------------ files and the Hub
    def save_pretrained(self, save_directory: str | Any, **kwargs: Any) -> Any:
        """Write the active adapter to a folder (see :func:`eexit.hub.save_pretrained`)."""
        from .hub import save_pretrained

        return save_pretrained(self, save_directory, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload the active adapter to the Hugging Face Hub in one commit (see :func:`eexit.hub.push_to_hub`)."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    def load_adapter(self, path_or_repo_id: str | Any, adapter_name: str, **kwargs: Any) -> None:
        """Load a saved adapter as ``adapter_name`` next to the active one (see :func:`eexit.hub.load_adapter`)."""
        from .hub import load_adapter

        load_adapter(self, path_or_repo_id, adapter_name, **kwargs)

    def train(self, mode: bool = True) -> EarlyExitModel:
        """Set heads and gates to ``mode``; the backbone follows only while it is being trained.

        A frozen backbone stays in eval mode, so dropout, drop-path and BatchNorm statistics never change the
        features the exits learn from.
        """
        self.training = mode
        self.heads.train(mode)
        self.gates.train(mode)
        self.backbone.train(mode and self.backbone_trainable)
        return self

    def detach(self) -> nn.Module:
        """Remove the exits and restore the backbone exactly as it was; returns the backbone.

        Undoes what :func:`eexit.attach` recorded (hooks, ``requires_grad`` flags, training modes); the same as
        :func:`eexit.detach`.
        """
        if self._restore is None:
            raise EexitValueError("these exits are already detached.")
        self._restore()
        self._restore = None
        return self.backbone

    def default_policy(self, threshold: float | None = None) -> GatePolicy:
        """The gates' deterministic rule for this model's gate kind, at ``threshold`` (default ``config.threshold``)."""
        return GatePolicy(self.config.threshold if threshold is None else threshold, self.config.gates)

    def _check_policy(self, policy: ExitPolicy | None) -> ExitPolicy:
        if policy is None:
            return self.default_policy()
        if isinstance(policy, GatePolicy) and policy.gates != self.config.gates:
            raise EexitValueError(
                f"{policy!r} reads {policy.gates!r} gates, but this model's gates are {self.config.gates!r}; the "
                f"exit probabilities would be misread. Use ee.default_policy({policy.threshold:g})."
            )
        return policy

    # ------------------------------------------------------------------ hooks
    def _exit_step(
        self, k: int, features: torch.Tensor, history: ExitHistory | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """IM k and, for an intermediate exit, gate k on pooled features ``[b, D]`` (and the earlier exits)."""
        logits = self.heads[k](features)  # [b, C]
        gate_logit = self.gates[k](logits, history) if k < self.num_exits - 1 else None  # [b]
        return logits, gate_logit

    def _make_hook(self, k: int) -> Callable[..., Any]:
        is_final_im = not self.has_backbone_head and k == len(self.exit_blocks) - 1
        block = self.exit_blocks[k]

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            run = _RUN.get()
            if run is None or run.owner is not self:
                return None  # not an eexit call: leave the backbone untouched
            features = self.spec.pool_at(self.backbone, self.spec.hidden(output), block)  # [b, D_k]
            batch = run.state.positions.shape[0] if run.state is not None else run.batch
            self._check_features(k, features, batch)
            if run.mode is RunMode.FEATURES:
                run.features.append(features)
                if is_final_im:
                    raise _AllExited
                return None
            history = run.state.history if run.state is not None else run.history
            logits, gate_logit = self._exit_step(k, features, history)
            if run.mode is RunMode.ALL:
                if run.history is not None:
                    run.history = run.history.after(logits)
                run.logits.append(logits)
                if gate_logit is not None:
                    run.gate_logits.append(gate_logit)
                if run.on_exit is not None:
                    run.on_exit()
                if is_final_im:
                    raise _AllExited
                return None
            return self._early_step(run, k, output, logits, gate_logit, is_final_im)

        return hook

    def _check_features(self, k: int, features: torch.Tensor, batch: int) -> None:
        # Cheap, and it runs during attach's cost measurement: a spec that pools wrongly, or a block that does not
        # keep the batch on dim 0 (so the batch cannot shrink there), fails here with a message, not in a matmul.
        width = self.heads[k].width
        if features.dim() != 2 or features.shape[0] != batch or features.shape[1] != width:
            raise BackboneError(
                f"exit {k} ({self.exit_names[k]}): spec {self.spec.name!r} pooled features of shape "
                f"{tuple(features.shape)}, expected [{batch}, {width}] (batch, width). Either its blocks do not keep "
                "the batch on dim 0 (eexit shrinks the batch there, so it cannot exit early inside such a model), "
                "or the spec pools this backbone wrongly; describe it with eexit.GenericSpec(..., pool=callable)."
            )

    def _early_step(
        self, run: _Run, k: int, output: Any, logits: torch.Tensor, gate_logit: torch.Tensor | None, final: bool
    ) -> Any:
        state = run.state
        assert state is not None and run.policy is not None  # set by forward()
        if final:
            stop = torch.ones_like(state.positions, dtype=torch.bool)
        else:
            stop = run.policy(k, logits, gate_logit, state)  # [b]
        if run.out_logits is None:
            run.out_logits = logits.new_zeros(run.out_exit.shape[0], logits.shape[-1])  # type: ignore[union-attr]
        done, keep = _record_exits(run.out_logits, run.out_exit, state, k, logits, stop)  # type: ignore[arg-type]
        if done:
            raise _AllExited
        state.advance(gate_logit, logits)
        if keep is None:
            return None  # nobody stopped here: hand the block's output on unchanged
        state.keep(keep)
        return self.spec.shrink(output, keep)

    def _costs_of(self, exit_index: torch.Tensor) -> torch.Tensor:
        """FLOPs each sample spent, from the cost table, ``[B]`` float64."""
        device = exit_index.device
        if self.cost_table is None:
            return torch.zeros(exit_index.shape, dtype=torch.float64, device=device)
        return torch.tensor(self.cost_table.exit_flops, dtype=torch.float64, device=device)[exit_index]

    # ------------------------------------------------------------------ forwards
    def _check_input(self, pixel_values: Any) -> torch.Tensor:
        if not isinstance(pixel_values, torch.Tensor):
            raise EexitTypeError(f"expected images as a torch.Tensor [B, C, H, W], got {type(pixel_values).__name__}.")
        if pixel_values.dim() != 4:
            raise EexitValueError(
                f"expected images of shape [B, C, H, W], got shape {tuple(pixel_values.shape)}; "
                "add the batch dimension with x.unsqueeze(0) for a single image."
            )
        if not pixel_values.is_floating_point():
            raise EexitTypeError(
                f"expected floating-point images, got dtype {pixel_values.dtype}; convert with x.float() "
                "(and normalise as the backbone expects)."
            )
        param = next(self.backbone.parameters(), None)
        if param is not None and pixel_values.dtype != param.dtype and not torch.is_autocast_enabled():
            raise EexitTypeError(
                f"images are {pixel_values.dtype} but the backbone is {param.dtype}; use x.to({param.dtype})."
            )
        expected = self.spec.input_shape(self.backbone)
        got = tuple(pixel_values.shape[1:])
        if any(e is not None and e != g for e, g in zip(expected, got)):
            shown = tuple("any" if e is None else e for e in expected)
            raise EexitValueError(
                f"expected images of shape [B, {', '.join(map(str, shown))}], got {tuple(pixel_values.shape)}; "
                "resize or crop them to the backbone's input size."
            )
        return pixel_values

    def _call_backbone(self, run: _Run, pixel_values: torch.Tensor) -> torch.Tensor | None:
        token = _RUN.set(run)
        try:
            return self.spec.logits(self.spec.call(self.backbone, pixel_values))
        except _AllExited:
            return None
        finally:
            _RUN.reset(token)

    def _run_all_exits(self, pixel_values: torch.Tensor, on_exit: Callable[[], None] | None = None) -> AllExitsOutput:
        run = _Run(owner=self, mode=RunMode.ALL, batch=pixel_values.shape[0], on_exit=on_exit)
        run.history = ExitHistory() if self.uses_history else None
        final = self._call_backbone(run, pixel_values)
        logits = run.logits + ([final] if self.has_backbone_head and final is not None else [])
        gate_logits = torch.stack(run.gate_logits) if run.gate_logits else logits[0].new_zeros(0, logits[0].shape[0])
        return AllExitsOutput(logits=torch.stack(logits), gate_logits=gate_logits, gates=self.config.gates)

    def exit_features(self, pixel_values: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Pooled features at every IM exit and the backbone head's logits (``None`` without a head).

        With a frozen backbone these are all the heads and gates need, so :func:`eexit.fit` caches them.
        """
        pixel_values = self._check_input(pixel_values)
        run = _Run(owner=self, mode=RunMode.FEATURES, batch=pixel_values.shape[0])
        final = self._call_backbone(run, pixel_values)
        return run.features, (final if self.has_backbone_head else None)

    def feature_layout(self) -> tuple[list[int], bool]:
        """What :meth:`exit_features` returns per sample: the width of each feature, and whether head logits come too.

        A feature cache fits this model only if it has this layout (checked before training on one).
        """
        return [head.width for head in self.heads], self.has_backbone_head

    def outputs_from_features(self, features: list[torch.Tensor], final_logits: torch.Tensor | None) -> AllExitsOutput:
        """All-exit outputs computed from cached :meth:`exit_features` (same result as ``all_exits=True``)."""
        logits, gate_logits = [], []
        history = ExitHistory() if self.uses_history else None
        for k, feats in enumerate(features):
            im_logits, gate_logit = self._exit_step(k, feats, history)
            if history is not None:
                history = history.after(im_logits)
            logits.append(im_logits)
            if gate_logit is not None:
                gate_logits.append(gate_logit)
        if final_logits is not None:
            logits.append(final_logits)
        gates = torch.stack(gate_logits) if gate_logits else logits[0].new_zeros(0, logits[0].shape[0])
        return AllExitsOutput(logits=torch.stack(logits), gate_logits=gates, gates=self.config.gates)

    def forward(
        self, pixel_values: torch.Tensor, *, all_exits: bool = False, policy: ExitPolicy | None = None
    ) -> EarlyExitOutput | AllExitsOutput:
        """Run the model.

        Args:
            pixel_values: images ``[B, C, H, W]``, prepared as the backbone expects.
            all_exits: return every exit's output (:class:`AllExitsOutput`) instead of exiting early.
            policy: how samples exit (default: the gates with ``config.threshold``).
        """
        pixel_values = self._check_input(pixel_values)
        if all_exits:
            return self._run_all_exits(pixel_values)
        batch, device = pixel_values.shape[0], pixel_values.device
        run = _Run(
            owner=self,
            mode=RunMode.EARLY,
            state=ExitState.start(batch, device, with_history=self.uses_history),
            policy=self._check_policy(policy),
        )
        run.out_exit = torch.full((batch,), self.num_exits - 1, dtype=torch.long, device=device)
        final = self._call_backbone(run, pixel_values)
        if final is not None:
            if run.out_logits is None:
                run.out_logits = final.new_zeros(batch, final.shape[-1])
            run.out_logits[run.state.positions] = final.to(run.out_logits.dtype)  # type: ignore[union-attr]
        return EarlyExitOutput(logits=run.out_logits, exit_index=run.out_exit, cost=self._costs_of(run.out_exit))

    def extra_repr(self) -> str:
        return f"num_exits={self.num_exits}, exit_blocks={self.exit_blocks}, num_classes={self.num_classes}"
