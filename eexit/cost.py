"""The cost table: FLOPs to reach each exit, measured by torch.

One forward of a single sample runs under :class:`torch.utils.flop_counter.FlopCounterMode` with every IM and
gate computed; the running total is read right after exit l's IM and gate, so cost_l covers the backbone up to
that block *plus* every IM and gate on the way (a sample that reaches exit l has paid for all of them). The
last exit pays the whole backbone and every intermediate IM and gate. IC_l = cost_l / cost_last is the
normalised cost JEI-DNN prices with λ.

Counting convention: FlopCounterMode counts matrix products, convolutions and attention as 2·M·N·K FLOPs per
sample (MACs = FLOPs / 2); element-wise ops, norms and softmax count as 0. The JEI-DNN authors' counter charged
Linear layers once per sample instead of once per token and skipped attention (``reference/jei-dnn.md`` §4);
this table has neither bug.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .errors import EexitValueError

if TYPE_CHECKING:
    from .model import EarlyExitModel

__all__ = ["CostTable", "flop_counter"]


def _cpu_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_formulas() -> dict[Any, Any]:
    # PyTorch registers FLOP formulas for the CUDA attention kernels only; on the CPU, scaled_dot_product_
    # attention dispatches to this op, which would otherwise count as 0 and drop attention from the table.
    ops: dict[Any, Any] = {}
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None:
        ops[cpu_flash] = _cpu_sdpa_flops
    return ops


class _FlopCounter(FlopCounterMode):
    """FlopCounterMode that also sees through torch's fused transformer fast path.

    In eval mode without grad, ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` run one fused kernel
    that FlopCounterMode has no formula for, so such models would look almost free. While counting, the fast
    path is switched off (a process-wide torch flag, restored on exit): the plain path does the same arithmetic
    and every matmul is counted.
    """

    def __enter__(self) -> _FlopCounter:
        self._fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        super().__enter__()
        return self

    def __exit__(self, *args: Any) -> None:
        try:
            super().__exit__(*args)
        finally:
            torch.backends.mha.set_fastpath_enabled(self._fastpath)


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode that also counts CPU fused attention and torch's fused transformer layers."""
    return _FlopCounter(display=False, custom_mapping=_extra_formulas())


@dataclass
class CostTable:
    """Measured cost of each exit, per sample.

    Attributes:
        exit_flops: cumulative FLOPs to reach and evaluate exit l (IMs and gates on the way included).
        backbone_flops: FLOPs of the bare backbone forward (no exits), the reference for "fraction of full cost".
        input_shape: the (C, H, W) the table was measured at; for graph backbones the reference graph size
            (nodes, edges) at which ``exit_flops`` and ``backbone_flops`` are given.
        size_terms: graph backbones only: per exit, the coefficients ``(a, b, c, d)`` of its exact cost for a graph
            of n nodes and m edges, ``a + b·n + c·n² + d·m`` FLOPs (fitted to FlopCounterMode readings on graphs of
            several sizes, checked on one more); ``None`` for image backbones, whose cost does not vary per sample.
        backbone_terms: the same coefficients for the bare backbone forward.
    """

    exit_flops: list[float]
    backbone_flops: float
    input_shape: list[int] = field(default_factory=list)
    size_terms: list[list[float]] | None = None
    backbone_terms: list[float] | None = None

    def __post_init__(self) -> None:
        if not self.exit_flops or any(b < a for a, b in zip(self.exit_flops, self.exit_flops[1:])):
            raise EexitValueError(f"exit_flops must be non-empty and non-decreasing, got {self.exit_flops}.")
        if self.exit_flops[-1] <= 0:
            raise EexitValueError("the last exit costs 0 FLOPs: the counter saw no computation.")
        if (self.size_terms is None) != (self.backbone_terms is None):
            raise EexitValueError("size_terms and backbone_terms come together (graph backbones) or not at all.")
        if self.size_terms is not None and (
            len(self.size_terms) != len(self.exit_flops)
            or any(len(t) != 4 for t in [*self.size_terms, self.backbone_terms])
        ):
            raise EexitValueError(
                f"size_terms must hold 4 terms (a, b, c, d) per exit ({len(self.exit_flops)} exits) and backbone_terms "
                f"4, got {self.size_terms} and {self.backbone_terms}."
            )

    @property
    def num_exits(self) -> int:
        return len(self.exit_flops)

    @property
    def ic(self) -> torch.Tensor:
        """IC_l = cost_l / cost_last, ``[E]`` (float32)."""
        flops = torch.tensor(self.exit_flops, dtype=torch.float64)
        return (flops / flops[-1]).float()

    @property
    def exit_macs(self) -> list[float]:
        return [f / 2 for f in self.exit_flops]

    def fraction_of_backbone(self) -> list[float]:
        """Cost of each exit as a fraction of the bare backbone (the last one is slightly above 1)."""
        return [f / self.backbone_flops for f in self.exit_flops]

    @property
    def per_sample(self) -> bool:
        """Whether each sample's cost depends on its size (graph backbones: :meth:`graph_flops`)."""
        return self.size_terms is not None

    def graph_flops(self, nodes: torch.Tensor, edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each graph's FLOPs at every exit ``[G, E]`` and of the bare backbone ``[G]`` (float64).

        Args:
            nodes: nodes per graph ``[G]``.
            edges: input edges per graph ``[G]``.
        """
        if self.size_terms is None or self.backbone_terms is None:
            raise EexitValueError("this cost table has no per-graph terms (it was measured for an image backbone).")
        return _apply_terms(self.size_terms, nodes, edges), _apply_terms([self.backbone_terms], nodes, edges)[:, 0]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "exit_flops": list(self.exit_flops),
            "exit_macs": self.exit_macs,
            "backbone_flops": self.backbone_flops,
            "input_shape": list(self.input_shape),
            "unit": "FLOPs per sample (2 per multiply-add), torch.utils.flop_counter",
        }
        if self.size_terms is not None:
            out["size_terms"] = [list(t) for t in self.size_terms]
            out["backbone_terms"] = list(self.backbone_terms)  # type: ignore[arg-type]
            out["size_terms_unit"] = "FLOPs of one graph = a + b*nodes + c*nodes^2 + d*edges, terms (a, b, c, d)"
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostTable:
        terms = data.get("size_terms")
        return cls(
            exit_flops=[float(x) for x in data["exit_flops"]],
            backbone_flops=float(data["backbone_flops"]),
            input_shape=[int(x) for x in data.get("input_shape", [])],
            size_terms=[[float(v) for v in t] for t in terms] if terms is not None else None,
            backbone_terms=[float(v) for v in data["backbone_terms"]]
            if data.get("backbone_terms") is not None
            else None,
        )


def _apply_terms(terms: list[list[float]], nodes: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """``a + b·n + c·n² + d·m`` for every graph and every row of terms: ``[G, len(terms)]`` float64."""
    n = nodes.to(torch.float64)
    sizes = torch.stack((torch.ones_like(n), n, n * n, edges.to(torch.float64)), dim=1)  # [G, 4]
    coefficients = torch.tensor(terms, dtype=torch.float64, device=n.device)  # [T, 4]
    # Element-wise products, not a matmul: a FlopCounterMode around the forward must not count the bookkeeping.
    return (sizes.unsqueeze(1) * coefficients).sum(-1)


def _readings(ee: EarlyExitModel, example: Any) -> tuple[list[float], float]:
    """(cumulative FLOPs after each exit, bare backbone FLOPs) of one all-exits forward of ``example``."""
    with torch.no_grad():
        with flop_counter() as bare:
            ee.spec.call(ee.backbone, example)
        readings: list[float] = []
        with flop_counter() as counter:
            ee.run_all_exits(example, on_exit=lambda: readings.append(float(counter.get_total_flops())))
            total = float(counter.get_total_flops())
    exit_flops = [*readings[: ee.num_exits - 1], total] if ee.has_backbone_head else readings
    return exit_flops, float(bare.get_total_flops())


def measure_cost_table(ee: EarlyExitModel, input_shape: tuple[int, ...]) -> CostTable:
    """Measure the cost table of an attached model on one zero image of ``input_shape`` (C, H, W).

    Graph backbones (``spec.input_kind == "graphs"``) take ``input_shape = (nodes, edges)``, the reference graph
    size: see :func:`measure_graph_cost_table`.
    """
    if ee.spec.input_kind == "graphs":
        return measure_graph_cost_table(ee, input_shape)
    param = next(ee.parameters())
    example = torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device)
    was_training = ee.training
    ee.eval()
    try:
        exit_flops, backbone = _readings(ee, example)
    finally:
        ee.train(was_training)
    return CostTable(exit_flops=exit_flops, backbone_flops=backbone, input_shape=list(input_shape))


#: (nodes, edges) of the graphs the per-graph cost terms are fitted on; the last one checks the fit.
_FIT_SIZES = ((1, 0), (3, 4), (6, 5), (9, 20), (12, 15), (17, 60))


def measure_graph_cost_table(ee: EarlyExitModel, reference: tuple[int, ...]) -> CostTable:
    """The cost table of a graph backbone: exact per-graph cost terms, and the table at the reference size.

    The cost of a graph at an exit is ``a + b·n + c·n² + d·m`` FLOPs for n nodes and m edges: node-wise layers grow
    with n, the attention over all n² ordered pairs with n², the edge encoder with m, the exits' heads and gates
    are constant. The four terms of every exit are solved from FlopCounterMode readings on five random graphs and
    checked on a sixth (the measurement is refused if any reading is off by more than one FLOP in 10⁶). The random
    walks' powers are a data transform (``add_rrwp``), not part of the forward, so they are not counted.
    """
    if len(reference) != 2 or any(not isinstance(v, int) or v < 0 for v in reference) or reference[0] < 1:
        raise EexitValueError(
            f"a graph backbone's cost table is given at a reference graph size (nodes, edges), e.g. (71, 565); "
            f"got {tuple(reference)}."
        )
    if reference[1] > reference[0] * (reference[0] - 1):
        raise EexitValueError(
            f"a graph of {reference[0]} nodes has at most {reference[0] * (reference[0] - 1)} edges without "
            f"parallel ones; the reference size {tuple(reference)} (nodes, edges) cannot exist."
        )
    was_training = ee.training
    ee.eval()
    try:
        rows, exits, bare = [], [], []
        for i, (n, m) in enumerate(_FIT_SIZES):
            flops, backbone = _readings(ee, ee.spec.example_graph(ee.backbone, n, m, seed=i))
            rows.append([1.0, float(n), float(n * n), float(m)])
            exits.append(flops)
            bare.append(backbone)
    finally:
        ee.train(was_training)
    sizes = torch.tensor(rows, dtype=torch.float64)
    readings = torch.tensor([[*e, b] for e, b in zip(exits, bare)], dtype=torch.float64)  # [6, E + 1]
    terms = torch.linalg.lstsq(sizes[:-1], readings[:-1]).solution  # [4, E + 1]
    predicted = sizes @ terms
    if bool(((predicted - readings).abs() > 1e-6 * readings.abs().clamp(min=1.0) + 1.0).any()):
        raise EexitValueError(
            f"{ee.spec.name}: the measured FLOPs are not of the form a + b·n + c·n² + d·m in the graph size "
            f"(readings {readings.tolist()}, fit {predicted.tolist()}); the spec's cost model does not fit this model."
        )
    terms = terms.round()  # FLOP counts are integers; the solve only adds rounding noise
    if getattr(ee.spec, "costs", "flops") == "uniform":
        # The JEI-DNN authors' convention: exit after layer l costs (l + 1) / L of the whole model, per graph.
        layers = len(ee.spec.blocks(ee.backbone))
        fractions = [(b + 1) / layers for b in ee.exit_blocks] + ([1.0] if ee.has_backbone_head else [])
        terms[:, :-1] = terms[:, ee.num_exits - 1 : ee.num_exits] * torch.tensor(fractions, dtype=torch.float64)
    size_terms = terms[:, :-1].t().tolist()
    backbone_terms = terms[:, -1].tolist()
    n_ref, m_ref = torch.tensor([reference[0]]), torch.tensor([reference[1]])
    return CostTable(
        exit_flops=_apply_terms(size_terms, n_ref, m_ref)[0].tolist(),
        backbone_flops=float(_apply_terms([backbone_terms], n_ref, m_ref)[0, 0]),
        input_shape=[int(v) for v in reference],
        size_terms=size_terms,
        backbone_terms=backbone_terms,
    )
