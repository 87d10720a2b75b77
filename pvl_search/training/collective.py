"""What data-parallel training needs from its workers, in one place: gather a batch's
embeddings from every worker (with gradients), average gradients, agree, and say who writes.

`Solo` is the one-process case (every call a no-op). `TorchCollective` works on an
initialised `torch.distributed` process group (gloo on CPU, NCCL on GPU; Ray Train sets it up,
see ray_train.py).

Why gathering makes N workers of batch B train like one worker of batch N*B: every worker
computes the contrastive losses over the full N*B x N*B matrix. The gather's backward sums
each worker's gradient for its own rows, so every worker's rows get N times the one-process
gradient; averaging the parameter gradients over the N workers divides that back. Losses
that are a mean over a worker's own samples need no gather: the average of N equal-sized
means is the mean over all N*B.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


class Solo:
    """One process: nothing to gather, average or wait for."""

    rank = 0
    world = 1

    @property
    def is_writer(self) -> bool:
        return True

    def gather(self, tensor: Tensor) -> Tensor:
        return tensor

    def average_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        return None

    def barrier(self) -> None:
        return None

    def broadcast(self, value: Any) -> Any:
        return value


class TorchCollective(Solo):
    """Every worker of an initialised torch.distributed group. `gather=False` leaves the
    contrastive losses per worker (what data parallelism without the gather would do; the
    equivalence test shows the difference)."""

    def __init__(self, *, gather: bool = True) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("TorchCollective needs an initialised torch.distributed process group")
        self._dist = dist
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self._gather = gather

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def gather(self, tensor: Tensor) -> Tensor:
        if not self._gather or self.world == 1:
            return tensor
        from torch.distributed.nn.functional import all_gather  # differentiable: its backward sums gradients

        return torch.cat(all_gather(tensor.contiguous()), dim=0)

    def average_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Mean gradient over workers, in one flat all-reduce. A parameter no loss reached on any
        worker this step (e.g. a layer LayerDrop skipped everywhere) keeps grad None, so AdamW
        skips it as it would in one process; one reached on some workers only counts as zeros
        on the others."""
        if self.world == 1:
            return
        candidates = [p for p in params if p.requires_grad]
        reached = torch.tensor([p.grad is not None for p in candidates], dtype=torch.int32)
        self._dist.all_reduce(reached)  # the same layout on every worker
        trained = [p for p, n in zip(candidates, reached.tolist()) if n]
        if not trained:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in trained])
        self._dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in trained:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def barrier(self) -> None:
        self._dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every worker (any picklable object)."""
        box = [value]
        self._dist.broadcast_object_list(box, src=0)
        return box[0]
