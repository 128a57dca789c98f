"""Data-parallel calibration over ``torch.distributed`` ranks (started with ``torchrun``).

Each rank keeps every block of the model and a share of the calibration batches
(``batches[rank::world]``); statistics that are sums over calibration tokens (GPTQ's
Hessians, AWQ's channel means and candidate losses) are summed over ranks, so every rank
solves the same problem and produces the same records. Every function here is a no-op when
``torch.distributed`` is not initialised or has a single rank, so single-process runs are
unchanged.

Start one process per GPU, e.g. ``torchrun --nproc-per-node 2 -m llmcq.cli run cfg.yml``
after ``torch.distributed.init_process_group("nccl")`` (``"gloo"`` on CPUs); each rank uses
``cuda:<LOCAL_RANK>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch

__all__ = ["active", "rank", "world_size", "shard", "all_reduce_sum", "weighted_mean"]

T = TypeVar("T")


def active() -> bool:
    """True when more than one rank takes part."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items`` (every ``world``-th from ``rank``); all of them when
    not distributed. Every rank must receive at least one item."""
    items = list(items)
    if not active():
        return items
    if len(items) < world_size():
        raise ValueError(f"{len(items)} calibration batches cannot be split over "
                         f"{world_size()} ranks; use more samples or a smaller calib.bs")
    return items[rank()::world_size()]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (and return it)."""
    if active():
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def weighted_mean(mean: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """Combine each rank's running ``mean`` over ``count`` items into the mean over every
    rank's items, in place; returns it and the total count."""
    if not active():
        return mean, count
    n = torch.tensor([float(count)], dtype=torch.float64, device=mean.device)
    all_reduce_sum(n)
    total = int(n.item())
    mean.mul_(count)
    all_reduce_sum(mean)
    if total:
        mean.div_(total)
    return mean, total
