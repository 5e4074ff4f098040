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
        input_shape: the (C, H, W) the table was measured at.
    """

    exit_flops: list[float]
    backbone_flops: float
    input_shape: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.exit_flops or any(b < a for a, b in zip(self.exit_flops, self.exit_flops[1:])):
            raise EexitValueError(f"exit_flops must be non-empty and non-decreasing, got {self.exit_flops}.")
        if self.exit_flops[-1] <= 0:
            raise EexitValueError("the last exit costs 0 FLOPs: the counter saw no computation.")

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "exit_flops": list(self.exit_flops),
            "exit_macs": self.exit_macs,
            "backbone_flops": self.backbone_flops,
            "input_shape": list(self.input_shape),
            "unit": "FLOPs per sample (2 per multiply-add), torch.utils.flop_counter",
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostTable:
        return cls(
            exit_flops=[float(x) for x in data["exit_flops"]],
            backbone_flops=float(data["backbone_flops"]),
            input_shape=[int(x) for x in data.get("input_shape", [])],
        )


def measure_cost_table(ee: EarlyExitModel, input_shape: tuple[int, int, int]) -> CostTable:
    """Measure the cost table of an attached model on one zero image of ``input_shape`` (C, H, W)."""
    param = next(ee.parameters())
    example = torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device)
    was_training = ee.training
    ee.eval()
    try:
        with torch.no_grad():
            with flop_counter() as bare:
                ee.spec.call(ee.backbone, example)
            readings: list[float] = []
            with flop_counter() as counter:
                ee.run_all_exits(example, on_exit=lambda: readings.append(float(counter.get_total_flops())))
                total = float(counter.get_total_flops())
    finally:
        ee.train(was_training)
    exit_flops = [*readings[: ee.num_exits - 1], total] if ee.has_backbone_head else readings
    return CostTable(exit_flops=exit_flops, backbone_flops=float(bare.get_total_flops()), input_shape=list(input_shape))
