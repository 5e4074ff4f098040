"""The few collective operations :func:`eexit.fit` and the disk feature cache need, one process or many.

eexit runs under ``accelerate launch`` (or ``torchrun``): when the launcher's ``WORLD_SIZE`` is above 1, Hugging
Face Accelerate's :class:`~accelerate.PartialState` sets up ``torch.distributed`` (gloo on CPU, NCCL on GPU) and
:func:`current` returns a :class:`Dist` for this rank; in one process every operation is a no-op.

Why not wrap the exits in ``DistributedDataParallel``: a JEI-DNN phase trains only the gates or only the IMs, so
half the wrapped parameters get no gradient in every step, and DDP then needs ``find_unused_parameters`` (an
extra graph walk per step) or stops with "Expected to have finished reduction". The exits are small, so
:meth:`Dist.sync_grads` sums exactly the gradients that exist, in one flat all-reduce per step (what DDP does
in buckets), and the frozen backbone is never wrapped at all.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Dist", "current"]


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank ``rank`` of ``world`` processes."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes files (adapters, checkpoints, cache metadata) and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def _device(self) -> torch.device:
        # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
        if torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def _reduce(self, values: torch.Tensor, op: str) -> torch.Tensor:
        if not self.active:
            return values
        buffer = values.detach().to(self._device(), copy=True)
        torch.distributed.all_reduce(buffer, op=getattr(torch.distributed.ReduceOp, op))
        return buffer.to(values.device)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over every rank (a new tensor on ``values``' device; the input is left as it is)."""
        return self._reduce(values, "SUM")

    def max(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum over every rank."""
        return self._reduce(values, "MAX")

    def sync_grads(self, params: Sequence[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
        """Sum every parameter's gradient over the ranks, and the loss with them; returns the summed loss.

        Each rank's loss is its part of the global batch's loss (the sum of its samples' terms divided by the
        global batch size), so the sums are the global batch's gradient and loss. A parameter keeps ``grad=None``
        only if it has none on every rank, so the optimiser skips exactly what one process would skip.
        """
        if not self.active:
            return loss.detach()
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
        has = self.max(has).bool().tolist()
        used = [p for p, h in zip(params, has) if h]
        for p in used:
            if p.grad is None:  # this rank's rows did not reach it (e.g. it had no rows in a short last batch)
                p.grad = torch.zeros_like(p)
        device = self._device()
        flat = torch.cat(
            [
                *(p.grad.detach().reshape(-1).to(device, torch.float32) for p in used),
                loss.detach().reshape(1).to(device, torch.float32),
            ]
        )
        torch.distributed.all_reduce(flat)
        offset = 0
        for p in used:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n
        return flat[-1].to(loss.device)

    def broadcast_text(self, text: str) -> str:
        """Rank 0's ``text`` on every rank (as bytes in a tensor: nothing is pickled)."""
        if not self.active:
            return text
        device = self._device()
        data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=device)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
        torch.distributed.broadcast(size, src=0)
        if self.rank != 0:
            data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
        torch.distributed.broadcast(data, src=0)
        return bytes(data.cpu().tolist()).decode()

    def agree(self, error: BaseException | None, what: str) -> None:
        """Raise on every rank when any rank failed at ``what`` (so no rank waits forever in a collective).

        Each rank passes the exception its own part raised (or ``None``); the failing rank re-raises its own,
        the others raise a :class:`~eexit.errors.EexitError` pointing at it.
        """
        if not self.active:
            if error is not None:
                raise error
            return
        failed = self.max(torch.tensor([0.0 if error is None else 1.0 + self.rank]))
        if error is not None:
            raise error
        if failed.item() > 0:
            from .errors import TrainingError

            raise TrainingError(f"rank {int(failed.item()) - 1} failed while {what}; see its error above.")

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite ``tensors`` in place with rank 0's values."""
        if not self.active:
            return
        device = self._device()
        for tensor in tensors:
            buffer = tensor.detach().to(device, copy=True)
            torch.distributed.broadcast(buffer, src=0)
            tensor.data.copy_(buffer.to(tensor.device))


def current() -> Dist:
    """The running job: initialises ``torch.distributed`` through Accelerate under a multi-process launcher."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState  # imported only under a launcher: it is slow to import

        state = PartialState()
        if torch.distributed.is_initialized():  # Accelerate's own counts say 1 process on CPU under --multi_gpu
            return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size())
        return Dist(state.process_index, state.num_processes)
    return Dist()
