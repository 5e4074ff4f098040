"""EarlyExitModel: a backbone with exits attached, and its two forwards.

* Early exit (default): at each exit the IM and gate run on the samples still running, those that stop are
  recorded, and only the rest go on; when none remain, the backbone stops. Outputs come back in input order
  with each sample's exit index and cost.
* All exits (training and analysis): the backbone runs once on the whole batch; every exit's logits and gate
  logits are returned.

One model class serves every backbone. How the backbone is run is its *driver*'s job: :class:`~eexit.hooked.
HookedDriver` (forward hooks on the blocks of a timm or transformers model), :class:`~eexit.staged.StagedDriver`
(the stages of a model that has exits of its own) or :class:`~eexit.graphs.GraphDriver` (a graph transformer's
layers on a batch of graphs, each graph its own sample). What happens at each exit is the job of the sinks in
:mod:`eexit.recorder`, which every driver feeds; so early exit is written once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._checks import all_finite, nonfinite_graph_field
from ._peft import adapter_subtrees
from .adapters import AdapterRecord, AdapterSet
from .backbones.base import BackboneSpec, StagedSpec
from .config import ExitConfig, FitConfig
from .cost import CostTable
from .errors import EexitTypeError, EexitValueError, SegmentsUnavailable
from .gates import ExitHistory, Gate
from .graphs import GraphDriver, graph_sizes, num_graphs
from .hooked import HookedDriver
from .inference import ExitPolicy, GatePolicy
from .outputs import AllExitsOutput, EarlyExitOutput
from .recorder import ExitCollector, ExitRecorder, FeatureSink
from .segments import prepare_segments, run_segments
from .staged import StagedDriver

__all__ = ["AllExitsOutput", "EarlyExitModel", "EarlyExitOutput", "make_driver"]

Driver = HookedDriver | StagedDriver | GraphDriver


def make_driver(backbone: nn.Module, spec: BackboneSpec, exit_blocks: list[int], config: ExitConfig) -> Driver:
    """The driver that runs ``backbone`` as ``spec`` describes it: its stages for a :class:`StagedSpec`, hooks
    otherwise; a graph backbone's layers with the graph driver. Refuses an exit placement or configuration the
    backbone cannot take, before anything is changed."""
    if spec.input_kind == "graphs":
        return GraphDriver(backbone, spec, exit_blocks, config)
    if isinstance(spec, StagedSpec):
        return StagedDriver(backbone, spec, exit_blocks, config)
    return HookedDriver(backbone, spec, exit_blocks)


class EarlyExitModel(nn.Module):
    """A backbone with IMs and gates attached. Build it with :func:`eexit.attach`.

    Calling it runs real early exit and returns an :class:`EarlyExitOutput`; ``all_exits=True`` returns an
    :class:`AllExitsOutput`. The backbone module is used in place, never copied or edited. The model is in eval
    mode after attach (:func:`eexit.fit` switches modes itself).

    For a staged backbone (the Dynamic Perceiver) ``heads[k]`` is a trainable copy of the model's own exit
    classifier k and the last exit is its final classifier; everything else works the same.

    For a PEFT-wrapped backbone, ``backbone`` is the model the ``peft.PeftModel`` wraps (its injected LoRA layers
    run in every exit) and ``peft_model`` the PeftModel itself, which :meth:`detach` hands back.
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
        driver: Driver | None = None,
        peft_model: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        # Kept outside the module tree: it wraps `backbone`, whose parameters would otherwise be listed twice.
        self.__dict__["_peft_model"] = peft_model
        #: Names (in ``backbone``) of the parameters PEFT marked trainable, read before attach froze them.
        self.peft_trainable: list[str] = []
        #: Names (in ``backbone``) of the PEFT-only submodules ``fit(train_backbone="lora")`` puts in train mode.
        self.peft_train_modules: list[str] = []
        self.spec = spec
        self.config = config
        self.num_classes = num_classes
        self.exit_blocks = list(exit_blocks)
        self.driver = driver if driver is not None else make_driver(backbone, spec, self.exit_blocks, config)
        self.has_backbone_head = self.driver.has_head
        self.heads = self.driver.build_heads(num_classes, config)
        self.gates = nn.ModuleList(Gate(config.gate_features) for _ in range(self.num_exits - 1))
        # Only gates that read earlier exits pay for carrying their history through the forward.
        self.uses_history = any(gate.uses_history for gate in self.gates)
        self.cost_table: CostTable | None = None
        self.fit_config: FitConfig | None = None
        self.history: list[dict[str, float]] = []
        self.backbone_trainable = False
        #: Refuse images with NaN or Inf pixels (one reduction and one host sync per call; set False to serve
        #: without it once the input pipeline is trusted).
        self.check_inputs = True
        self.evaluation: dict[str, Any] | None = None
        # BoostedNet's ensemble settings when the IMs were trained as one (saved with the adapter).
        self.boosted: dict[str, Any] | None = None
        # Named adapters: the active one's name and the records of every other one.
        self.adapters = AdapterSet()
        self._restore: Callable[[], None] | None = None
        # The backbone as one segment per exit (eexit.segments), when its spec can run it so and attach checked
        # they reproduce the hooked forward: early exit then runs them (or their compiled versions).
        self._segments: list[nn.Module] | None = None
        self._segments_reason: str | None = "attach has not checked this model's segments"
        self._compiled: list[Callable[..., Any]] | None = None
        # Inference-ready, like the model it wraps: a dropout inside a copied head must not fire at inference.
        # The backbone's modes are install()'s to record and change.
        self.training = False
        self.heads.eval()
        self.gates.eval()

    # ------------------------------------------------------------------ structure
    @property
    def peft_model(self) -> nn.Module | None:
        """The ``peft.PeftModel`` the backbone came wrapped in (``None`` for a plain backbone)."""
        return self.__dict__["_peft_model"]

    @property
    def num_exits(self) -> int:
        """E: the IMs plus the backbone's own head when it has one."""
        return len(self.exit_blocks) + int(self.has_backbone_head)

    @property
    def exit_names(self) -> list[str]:
        """A name per exit: the block (or the model's own classifier) it reads."""
        return self.driver.exit_names()

    def exit_classifier_state_dict(self) -> dict[str, torch.Tensor]:
        """Staged backbones: the IMs' tensors under the backbone's own names (``early_classifier3.weight``, ...).

        After :meth:`detach`, ``model.load_state_dict(sd, strict=False)`` writes the fine-tuned exits into the
        standalone model (e.g. to use its own confidence-threshold policy); eexit itself never does.
        """
        return self.driver.exit_classifier_state_dict(self.heads)

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
    def active_adapter(self) -> str:
        """The name of the adapter live in the heads and gates."""
        return self.adapters.active

    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters this model holds (the active one included)."""
        return self.adapters.names

    def adapter_record(self, name: str | None = None) -> AdapterRecord:
        """The record of the adapter called ``name`` (default: the active one): what saving it writes. For the active
        adapter it is a fresh snapshot of the live heads and gates; a stored adapter's record is returned as kept."""
        if name is None or name == self.adapters.active:
            return AdapterRecord(
                state=self.adapter_state_dict(),
                fit_config=self.fit_config,
                history=list(self.history),
                evaluation=self.evaluation,
                threshold=self.config.threshold,
                boosted=self.boosted,
            )
        return self.adapters.stored(name)

    def add_adapter(self, name: str, record: AdapterRecord | dict[str, Any] | None = None) -> None:
        """Store an adapter under ``name`` without activating it.

        Args:
            name: a new adapter name; it must be usable as a folder name (``save_pretrained`` writes every adapter
                but ``"default"`` to a subfolder of its name), so ``..`` or ``a/b`` are refused here.
            record: an :class:`~eexit.adapters.AdapterRecord` (or its dict form ``{"state": tensors,
                "fit_config": ..., ...}``); default: a copy of the active adapter (so that, e.g., the next
                :func:`eexit.fit` can start from it).
        """
        self.adapters.check_new(name)
        record = AdapterRecord.coerce(record) if record is not None else self.adapter_record()
        own = self.adapter_state_dict()
        self.load_adapter_state_dict(record.state)  # validates names and shapes before storing
        self.load_adapter_state_dict(own)
        self.adapters.store(name, record)

    def set_adapter(self, name: str) -> None:
        """Make the adapter called ``name`` active: its IM and gate tensors go into the heads and gates, and its
        gate threshold (``config.threshold``, which each adapter keeps) becomes the model's."""
        if name == self.adapters.active:
            return
        record = self.adapters.swap(name, self.adapter_record())
        self.activate(record)

    def activate(self, record: AdapterRecord) -> None:
        """Put ``record`` live in the heads and gates (strictly), with its training record and threshold; the
        active adapter's name is unchanged."""
        self.load_adapter_state_dict(record.state)
        self.fit_config, self.history = record.fit_config, list(record.history)
        self.evaluation, self.boosted = record.evaluation, record.boosted
        if record.threshold is not None:
            self.config = dataclasses.replace(self.config, threshold=float(record.threshold))

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
        features the exits learn from. While ``fit(train_backbone="lora")`` trains a PEFT adapter, the base model
        stays in eval mode too and only the PEFT-only modules holding its trainable parameters
        (:attr:`peft_train_modules`: LoRA layers and their dropout, ``modules_to_save`` copies) follow ``mode``.
        """
        self.training = mode
        self.heads.train(mode)
        self.gates.train(mode)
        if self.backbone_trainable == "lora":
            self.backbone.eval()
            for name in self.peft_train_modules:
                self.backbone.get_submodule(name).train(mode)
        else:
            self.backbone.train(mode and bool(self.backbone_trainable))
        return self

    def install(self, on_detach: Callable[[], None] | None = None) -> None:
        """Take the backbone over: freeze it, put it in eval mode and install the driver (its hooks, if any).

        Every flag and mode changed is recorded, and :meth:`detach` puts them back. :func:`eexit.attach` calls
        this once, after the model was built (so a configuration the driver refuses changes nothing). A PeftModel's
        flags and modes are recorded whole (the wrapper included), and the parameters PEFT marked trainable are
        kept in :attr:`peft_trainable` for ``fit(train_backbone="lora")``.

        Args:
            on_detach: called by :meth:`detach` once the backbone is restored.
        """
        if self._restore is not None:
            raise EexitValueError("these exits are installed already.")
        model = self.backbone
        owner = self.peft_model if self.peft_model is not None else model
        if self.peft_model is not None:
            self.peft_trainable = [name for name, p in model.named_parameters() if p.requires_grad]
            self.peft_train_modules = adapter_subtrees(model)
        grad_flags = [(p, p.requires_grad) for p in owner.parameters()]
        modes = [(m, m.training) for m in owner.modules()]
        for p, _ in grad_flags:
            p.requires_grad_(False)
        owner.eval()
        param = next(model.parameters(), None)
        if param is not None:
            self.heads.to(device=param.device, dtype=param.dtype)
            self.gates.to(device=param.device, dtype=param.dtype)
        self.driver.install()

        def restore() -> None:
            self.driver.remove()
            for p, flag in grad_flags:
                p.requires_grad_(flag)
            for m, mode in modes:
                m.training = mode
            if on_detach is not None:
                on_detach()

        self._restore = restore

    def detach(self) -> nn.Module:
        """Remove the exits and restore the backbone exactly as it was; returns the backbone.

        Undoes what :func:`eexit.attach` recorded (hooks, ``requires_grad`` flags, training modes); the same as
        :func:`eexit.detach`. A backbone attached as a ``peft.PeftModel`` is returned as that PeftModel.
        """
        if self._restore is None:
            raise EexitValueError("these exits are already detached.")
        self._restore()
        self._restore = None
        return self.peft_model if self.peft_model is not None else self.backbone

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

    # ------------------------------------------------------------------ one exit
    def exit_output(
        self, k: int, feature: torch.Tensor, earlier: list[torch.Tensor], history: ExitHistory | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Exit k's logits ``[b, C]`` and, at an intermediate exit, its gate logit ``[b]`` (else ``None``).

        Args:
            k: the exit.
            feature: its features ``[b, D_k]`` (what :meth:`exit_features` returns for it).
            earlier: exits 0..k-1's logits of the same samples (read only by staged backbones' classifiers).
            history: the gates' view of the earlier exits (``None`` when the gates do not read it).
        """
        logits = self.driver.classify(self.heads, k, feature, earlier)  # [b, C]
        gate_logit = self.gates[k](logits, history) if k < self.num_exits - 1 else None  # [b]
        return logits, gate_logit

    def _costs_of(self, exit_index: torch.Tensor, inputs: Any = None) -> torch.Tensor:
        """FLOPs each sample spent, from the cost table, ``[B]`` float64 (graphs: each graph's own cost)."""
        device = exit_index.device
        if self.cost_table is None:
            return torch.zeros(exit_index.shape, dtype=torch.float64, device=device)
        if self.cost_table.per_sample and inputs is not None:
            flops = self.sample_costs(inputs)[0].to(device)
            return flops[torch.arange(exit_index.shape[0], device=device), exit_index]
        return torch.tensor(self.cost_table.exit_flops, dtype=torch.float64, device=device)[exit_index]

    @property
    def reads_graphs(self) -> bool:
        """Whether the backbone reads batches of graphs (GRIT) instead of images."""
        return self.spec.input_kind == "graphs"

    def sample_costs(self, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's FLOPs at every exit ``[B, E]`` and of the bare backbone ``[B]`` (float64).

        Image backbones charge every sample the cost table; graph backbones charge each graph by its size.
        """
        table = self.cost_table
        if table is None:
            raise EexitValueError("this model has no cost table; attach measures it.")
        if table.per_sample:
            nodes, edges = graph_sizes(inputs)
            return table.graph_flops(nodes, edges)
        batch = inputs.shape[0]
        exits = torch.tensor(table.exit_flops, dtype=torch.float64).expand(batch, -1)
        return exits, torch.full((batch,), table.backbone_flops, dtype=torch.float64)

    def batch_size(self, inputs: Any) -> int:
        """Samples in a batch: images along dim 0, or graphs in a torch_geometric batch."""
        return num_graphs(inputs) if self.reads_graphs else int(inputs.shape[0])

    # ------------------------------------------------------------------ forwards
    def _check_graphs(self, batch: Any) -> Any:
        if not (hasattr(batch, "x") and hasattr(batch, "edge_index")):
            raise EexitTypeError(
                f"{type(self.backbone).__name__} reads graphs: expected a torch_geometric Batch (or Data) with x, "
                f"edge_index and edge_attr, got {type(batch).__name__}. Batch graphs with "
                "torch_geometric.loader.DataLoader (eexit.superpixels builds them from images)."
            )
        bad = nonfinite_graph_field(batch) if self.check_inputs else None
        if bad is not None:
            raise EexitValueError(
                f"some {'node' if bad == 'x' else 'edge'} features ({bad}) are NaN or Inf: every exit would answer "
                "with garbage. Clean the graphs; set ee.check_inputs = False to skip this check."
            )
        return batch

    def _check_input(self, pixel_values: Any) -> torch.Tensor:
        if self._restore is None and self.cost_table is not None:
            raise EexitValueError("these exits were detached from the backbone; attach again with eexit.attach(model).")
        if self.reads_graphs:
            return self._check_graphs(pixel_values)
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
        self.driver.check_input(pixel_values, self.cost_table.input_shape if self.cost_table is not None else None)
        if self.check_inputs and not all_finite(pixel_values):
            bad = (~torch.isfinite(pixel_values)).flatten(1).any(1).nonzero().flatten().tolist()
            raise EexitValueError(
                f"images {bad[:8]}{' ...' if len(bad) > 8 else ''} of the batch contain NaN or Inf pixels: every exit "
                "would answer with garbage. Clean or re-normalise the input; set ee.check_inputs = False to skip "
                "this check when serving a trusted pipeline."
            )
        return pixel_values

    def run_all_exits(self, pixel_values: torch.Tensor, on_exit: Callable[[], None] | None = None) -> AllExitsOutput:
        """Every exit's outputs on the whole batch (what ``ee(x, all_exits=True)`` returns, without its checks).

        Args:
            pixel_values: images ``[B, C, H, W]``.
            on_exit: called after each exit (the cost table reads its FLOP counter there).
        """
        collector = ExitCollector(
            self.exit_output,
            self.num_exits,
            self.batch_size(pixel_values),
            self.config.gates,
            self.uses_history,
            on_exit,
        )
        final = self.driver.run(pixel_values, collector)
        return collector.output(final if self.has_backbone_head else None)

    def exit_features(self, pixel_values: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Pooled features at every exit the IMs read, and the backbone head's logits (``None`` without a head,
        and for staged backbones, whose last exit reads a feature too).

        With a frozen backbone these are all the heads and gates need, so :func:`eexit.fit` caches them.
        """
        pixel_values = self._check_input(pixel_values)
        widths = self.driver.feature_widths()
        # Without a head the backbone can stop after the last IM; with one, it must run to its end.
        sink = FeatureSink(self.batch_size(pixel_values), None if self.has_backbone_head else len(widths) - 1)
        final = self.driver.run(pixel_values, sink)
        return sink.features, final

    def feature_layout(self) -> tuple[list[int], bool]:
        """What :meth:`exit_features` returns per sample: the width of each feature, and whether head logits come too.

        A feature cache fits this model only if it has this layout (checked before training on one).
        """
        widths = self.driver.feature_widths()
        return widths, self.has_backbone_head and len(widths) < self.num_exits

    def outputs_from_features(self, features: list[torch.Tensor], final_logits: torch.Tensor | None) -> AllExitsOutput:
        """All-exit outputs computed from cached :meth:`exit_features` (same result as ``all_exits=True``)."""
        collector = ExitCollector(self.exit_output, self.num_exits, 0, self.config.gates, self.uses_history)
        param = next(self.heads.parameters(), None)
        dtype = param.dtype if param is not None else torch.float32
        for k, feature in enumerate(features):
            collector.add(k, feature.to(dtype))  # a disk cache stores fp16 features; the heads compute in theirs
        return collector.output(final_logits.to(dtype) if final_logits is not None else None)

    def forward(
        self, pixel_values: torch.Tensor, *, all_exits: bool = False, policy: ExitPolicy | None = None
    ) -> EarlyExitOutput | AllExitsOutput:
        """Run the model.

        Args:
            pixel_values: images ``[B, C, H, W]``, prepared as the backbone expects; for a graph backbone (GRIT), a
                torch_geometric ``Batch`` of B graphs.
            all_exits: return every exit's output (:class:`AllExitsOutput`) instead of exiting early.
            policy: how samples exit (default: the gates with ``config.threshold``).
        """
        pixel_values = self._check_input(pixel_values)
        if all_exits:
            return self.run_all_exits(pixel_values)
        # Compiled segments serve inference only; an empty batch has nothing to cut (the hooks return [0, C]).
        segments = (self._compiled if not self.training else None) or self._segments
        batch = self.batch_size(pixel_values)
        if batch == 0:
            segments = None
        # Segments carry the gates' history and the earlier exits' logits themselves; the hooks need the recorder to.
        recorder = ExitRecorder(
            self.exit_output,
            self.num_exits,
            batch,
            self._input_device(pixel_values),
            self._check_policy(policy),
            with_history=self.uses_history and segments is None,
            keep_earlier=self.driver.reads_earlier_exits and segments is None,
        )
        if segments is not None:
            # Eager segments skip the gates for a policy that never reads them (confidence thresholds, fixed exits).
            reads_gates = bool(getattr(recorder.policy, "reads_gates", True))
            run_segments(segments, pixel_values, recorder, gates=reads_gates)
            logits, exit_index = recorder.finish()
        else:
            logits, exit_index = recorder.finish(self.driver.run(pixel_values, recorder))
        return EarlyExitOutput(logits=logits, exit_index=exit_index, cost=self._costs_of(exit_index, pixel_values))

    def _input_device(self, inputs: Any) -> torch.device:
        return inputs.x.device if self.reads_graphs else inputs.device

    # ------------------------------------------------------------------ segments: compile and export
    def prepare_segments(self, input_shape: tuple[int, ...]) -> None:
        """Build the segments and check them on a probe batch of ``input_shape`` (attach calls this)."""
        self._segments, self._segments_reason = prepare_segments(self, input_shape)
        self._compiled = None

    @property
    def segments(self) -> list[nn.Module]:
        """The backbone as one segment per exit (see :mod:`eexit.segments`): eager modules, in exit order.

        Raises:
            SegmentsUnavailable: the backbone's spec cannot run it as segments; the message says why.
        """
        if self._restore is None:
            raise SegmentsUnavailable("these exits were detached from the backbone; attach again with eexit.attach.")
        if self._segments is None:
            raise SegmentsUnavailable(f"{self._segments_reason}.")
        return list(self._segments)

    def compile(
        self, backend: str = "inductor", *, mode: str | None = None, fullgraph: bool = False, **options: Any
    ) -> EarlyExitModel:
        """Compile every segment with ``torch.compile`` for early-exit inference; returns the model itself.

        The batch dimension is compiled as a dynamic size that is never specialised (batch 1 included), so the
        batch shrinking from segment to segment does not recompile: one compilation per segment, at its first call.
        Outputs equal the eager forward's within float tolerance (so a sample right at the gate threshold may
        leave one exit apart). Only early exit in eval mode runs compiled: training mode and ``all_exits=True`` stay
        eager. Undo with :meth:`uncompile`. Unlike ``nn.Module.compile``, this compiles the segments, not
        ``forward`` (a whole-forward graph cannot change its batch size midway).

        Args:
            backend: the ``torch.compile`` backend (``"inductor"``; ``"aot_eager"`` or ``"eager"`` to debug).
            mode: the inductor mode (``"reduce-overhead"``, ``"max-autotune"``, ...).
            fullgraph: refuse graph breaks inside a segment.
            options: inductor options (``torch.compile(options=...)``).

        Raises:
            SegmentsUnavailable: the backbone cannot be run as segments, or the exits were detached.
            EexitValueError: ``mode`` or ``options`` with another backend than inductor, or both together.
        """
        from .compiling import compile_segments

        self._compiled = compile_segments(
            self.segments, backend=backend, mode=mode, fullgraph=fullgraph, options=options
        )
        return self

    def uncompile(self) -> EarlyExitModel:
        """Go back to the eager segments (drops the compiled ones)."""
        self._compiled = None
        return self

    @property
    def is_compiled(self) -> bool:
        """Whether early exit runs compiled segments (:meth:`compile`)."""
        return self._compiled is not None

    def export(self, folder: str | Any, format: str = "onnx", **kwargs: Any) -> Any:
        """Export the segments as graphs with a dynamic batch axis plus a manifest (see :func:`eexit.export.export`)."""
        from .export import export

        return export(self, folder, format=format, **kwargs)

    def extra_repr(self) -> str:
        return f"num_exits={self.num_exits}, exit_blocks={self.exit_blocks}, num_classes={self.num_classes}"
