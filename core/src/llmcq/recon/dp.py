"""Data-parallel rules for training algorithms (under ``torchrun``).

Each rank holds every block and a share of the calibration batches. A method that trains
per block is correct under several ranks only if every rank takes the same optimizer step
and so ends with the same parameters (and the same records). :func:`average_gradients` does
that: after each backward pass, every learnable tensor's gradient is replaced by the mean
over the ranks that computed one (one all-reduce of a flat buffer per step). The harness
(:func:`llmcq.recon.reconstruct`) calls it; a method with its own loop calls it between
``backward()`` and ``step()``.

What this gives against one process: every rank agrees bit for bit, and each step is the
step one process takes on the union of the ranks' batches (a loss that is a mean over
equal-sized batches has the mean of their gradients as its gradient). The engine gives rank
``r`` the global batches ``r, r + W, ...``, so under ``W`` ranks with ``calib.bs`` b an epoch
takes ``ceil(n / W)`` steps, exactly those of one process with ``calib.bs`` ``W * b`` (its
batch ``i`` = global batches ``W i ... W i + W - 1``), up to float rounding (measured on the
tiny Llama, OmniQuant: all codes equal, weights within 1e-6 relative; tests/test_distributed.py
through the CLI). Against one process with the same ``calib.bs`` the schedule differs (``W``
times fewer, larger steps). With sampled iterations each step averages ``W * batch_size``
samples.

A method whose training cannot be made to agree across ranks (state that depends on which
samples a rank holds, a sequential sampler over all samples) refuses with
:func:`refuse_data_parallel` at the start of the run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llmcq import dist
from llmcq.errors import ConfigError

__all__ = ["average_gradients", "global_count", "steps_per_epoch", "refuse_data_parallel"]


def global_count(n: int | float, *, device: torch.device | str = "cpu") -> float:
    """``n`` summed over ranks (``n`` itself in a single process): token or batch counts
    that size a statistic (e.g. the stride of a token sample)."""
    if not dist.active():
        return n
    t = torch.tensor([float(n)], dtype=torch.float64, device=device)
    return float(dist.all_reduce_sum(t).item())


def steps_per_epoch(n_local: int, *, device: torch.device | str = "cpu") -> int:
    """Steps every rank takes per epoch: the largest share (ranks with fewer batches
    contribute no gradient to the last steps)."""
    if not dist.active():
        return n_local
    t = torch.tensor([float(n_local)], dtype=torch.float64, device=device)
    return int(dist.all_reduce_max(t).item())


def average_gradients(params: Sequence[torch.Tensor], *, contributed: bool = True) -> None:
    """Replace each tensor's ``.grad`` by its mean over the ranks that computed one.

    ``contributed=False``: this rank computed no gradient this step (it has no batch left)
    and only takes part in the reduction. A tensor no rank has a gradient for keeps
    ``grad = None`` (the optimizer skips it, as in one process). A no-op in a single
    process."""
    if not dist.active() or not params:
        return
    device = params[0].device
    parts, flags = [], []
    for p in params:
        g = p.grad if (contributed and p.grad is not None) else None
        parts.append((g if g is not None else torch.zeros_like(p)).detach().float().reshape(-1)
                     .to(device))
        flags.append(1.0 if g is not None else 0.0)
    buf = torch.cat([*parts, torch.tensor(flags, dtype=torch.float32, device=device)])
    dist.all_reduce_sum(buf)
    counts = buf[-len(params):]
    offset = 0
    for i, p in enumerate(params):
        n = p.numel()
        c = float(counts[i])
        if c == 0:
            p.grad = None
        else:
            p.grad = (buf[offset:offset + n] / c).view_as(p).to(p.dtype)
        offset += n


def refuse_data_parallel(method: str, reason: str, *, key: str = "torchrun") -> None:
    """Raise a :class:`~llmcq.errors.ConfigError` when more than one rank takes part:
    ``method`` cannot be made to agree across ranks, for ``reason``."""
    if dist.active():
        raise ConfigError(key, f"{dist.world_size()} ranks", reason=f"{method} cannot run "
                          f"data-parallel: {reason}; run it in one process (without torchrun)")
