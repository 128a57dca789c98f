"""Data-parallel calibration over ``torch.distributed`` ranks (started with ``torchrun``).

Each rank keeps every block of the model and a share of the calibration batches
(``batches[rank::world]``); statistics that are sums over calibration tokens (GPTQ's
Hessians, AWQ's channel means and candidate losses) are summed over ranks, so every rank
solves the same problem and produces the same records. Every function here is a no-op when
``torch.distributed`` is not initialised or has a single rank, so single-process runs are
unchanged.

Start one process per GPU with ``torchrun --nproc-per-node N --no-python llmcq run cfg.yml``:
the command joins the process group torchrun describes (:func:`init_from_env`; NCCL with
GPUs, gloo on CPUs), each rank computes on ``cuda:<LOCAL_RANK>``, and only rank 0 evaluates,
exports and writes ``results.json``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeVar

import torch

__all__ = ["active", "rank", "local_rank", "world_size", "is_main", "init_from_env", "shutdown",
           "shard", "all_reduce_sum", "all_reduce_max", "all_reduce_min", "all_gather_rows",
           "weighted_mean", "broadcast_"]

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


def local_rank() -> int:
    """This process's GPU index on its host (torchrun's ``LOCAL_RANK``)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0, or the only process: the one that evaluates and writes outputs."""
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group that torchrun's environment describes (``WORLD_SIZE`` > 1):
    NCCL on ``cuda:<LOCAL_RANK>`` when CUDA is present, gloo otherwise. Returns whether
    more than one rank takes part; does nothing without torchrun or when already joined."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return active()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return active()


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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


def _all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    if active():
        import torch.distributed as dist

        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks **in place** and return the same tensor (so
    ``total = all_reduce_sum(t)`` and ``all_reduce_sum(t)`` both work). A no-op returning
    ``t`` unchanged in a single process."""
    return _all_reduce(t, "SUM")


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks, in place; returns ``t``."""
    return _all_reduce(t, "MAX")


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    """Element-wise minimum over ranks, in place; returns ``t``."""
    return _all_reduce(t, "MIN")


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``t`` on every rank with rank ``src``'s values, in place; returns ``t``."""
    if active():
        import torch.distributed as dist

        dist.broadcast(t, src=src)
    return t


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (``[n_r, ...]``, ``n_r`` may differ between ranks) concatenated
    along dim 0 in rank order, on every rank. Returns ``t`` itself in a single process."""
    if not active():
        return t
    import torch.distributed as dist

    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    top = int(max(int(s) for s in sizes))
    pad = t.new_zeros((top, *t.shape[1:]))
    pad[: t.shape[0]] = t
    parts = [torch.zeros_like(pad) for _ in range(world_size())]
    dist.all_gather(parts, pad.contiguous())
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes, strict=True)])


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
