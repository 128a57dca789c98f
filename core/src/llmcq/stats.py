"""Calibration statistics that are correct under data-parallel calibration.

Under ``torchrun`` each rank sees a share of the calibration batches (``llmcq.dist.shard``);
a statistic fitted on one share differs from the one a single process computes. Every
observer here accumulates this rank's batches (``update``), then ``reduce()`` combines the
ranks once (sum, max, min, or gather) so every rank holds the statistic over **all**
calibration tokens, exactly what one process computes (up to summation order for sums):

* :class:`SumObserver` / :class:`MeanObserver`: running sum (and count) of a tensor;
* :class:`MaxObserver` / :class:`MinObserver`: element-wise max / min;
* :class:`ChannelAbsMax` / :class:`ChannelRange`: per-channel ``max|x|`` / ``(min, max)``
  over tokens (SmoothQuant, OS+, LET initialization, static activation ranges);
* :class:`HessianObserver`: ``H = 2/n Σ x xᵀ`` over tokens (GPTQ-style);
* :class:`TokenSample`: a strided subsample of tokens gathered from every rank (clip
  searches that need raw inputs).

All are no-ops across ranks in a single process. Call ``reduce()`` once, after the last
``update``; reading ``value`` before that raises, so a forgotten reduction fails loudly.
"""

from __future__ import annotations

import torch

from llmcq import dist

__all__ = ["Observer", "SumObserver", "MeanObserver", "MaxObserver", "MinObserver",
           "ChannelAbsMax", "ChannelRange", "HessianObserver", "TokenSample"]


class Observer:
    """Base: ``update`` per batch, ``reduce`` once, then read ``value``."""

    def __init__(self) -> None:
        self._reduced = False
        self.count = 0

    def _need(self) -> None:
        if not self._reduced:
            raise RuntimeError(f"{type(self).__name__}.value read before reduce()")

    def reduce(self) -> Observer:
        """Combine the ranks (idempotent: a second call does nothing)."""
        if not self._reduced:
            self._combine()
            self._reduced = True
        return self

    def _combine(self) -> None:  # pragma: no cover - overridden
        pass


class SumObserver(Observer):
    """Running sum of same-shaped tensors; ``count`` of summed rows (tokens)."""

    def __init__(self) -> None:
        super().__init__()
        self.total: torch.Tensor | None = None

    def update(self, x: torch.Tensor, *, rows: int = 1) -> None:
        x = x.detach().double()
        self.total = x.clone() if self.total is None else self.total + x
        self.count += rows

    def _combine(self) -> None:
        if self.total is None:
            raise RuntimeError("observer saw no data")
        dist.all_reduce_sum(self.total)
        n = torch.tensor([float(self.count)], dtype=torch.float64, device=self.total.device)
        self.count = int(dist.all_reduce_sum(n).item())

    @property
    def value(self) -> torch.Tensor:
        self._need()
        assert self.total is not None
        return self.total.float()


class MeanObserver(SumObserver):
    """Mean over rows: ``update(x)`` adds ``x.sum(0)`` of a ``[rows, ...]`` tensor."""

    def update(self, x: torch.Tensor, *, rows: int | None = None) -> None:  # type: ignore[override]
        x2 = x.detach().reshape(-1, x.shape[-1])
        super().update(x2.double().sum(0), rows=x2.shape[0])

    @property
    def value(self) -> torch.Tensor:
        self._need()
        assert self.total is not None
        return (self.total / max(self.count, 1)).float()


class _Extreme(Observer):
    _fn = staticmethod(torch.maximum)
    _reduce = staticmethod(dist.all_reduce_max)

    def __init__(self) -> None:
        super().__init__()
        self.best: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        self.best = x.clone() if self.best is None else self._fn(self.best, x)
        self.count += 1

    def _combine(self) -> None:
        if self.best is None:
            raise RuntimeError("observer saw no data")
        type(self)._reduce(self.best)

    @property
    def value(self) -> torch.Tensor:
        self._need()
        assert self.best is not None
        return self.best


class MaxObserver(_Extreme):
    """Element-wise maximum of same-shaped tensors."""


class MinObserver(_Extreme):
    """Element-wise minimum of same-shaped tensors."""

    _fn = staticmethod(torch.minimum)
    _reduce = staticmethod(dist.all_reduce_min)


class ChannelAbsMax(MaxObserver):
    """``max |x|`` per channel (last dim) over every token."""

    def update(self, x: torch.Tensor) -> None:  # type: ignore[override]
        super().update(x.detach().reshape(-1, x.shape[-1]).abs().amax(0))


class ChannelRange(Observer):
    """``(min, max)`` per channel (last dim) over every token; ``per_tensor=True`` keeps one
    pair for the whole tensor (static per-tensor activation ranges).

    A per-tensor range that saw nothing on this rank (an MoE expert no token of this rank's
    share was routed to) still joins the reduction, as ``(+inf, -inf)`` on ``device``, so the
    ranks stay in step; :attr:`empty` tells afterwards whether any rank saw a token."""

    def __init__(self, *, per_tensor: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.per_tensor = per_tensor
        self.device = device
        self.lo, self.hi = MinObserver(), MaxObserver()

    @property
    def empty(self) -> bool:
        """No rank saw a token (read after :meth:`reduce`)."""
        self._need()
        return bool((self.lo.value > self.hi.value).all())

    def update(self, x: torch.Tensor) -> None:
        x2 = x.detach().float().reshape(-1, x.shape[-1])
        if self.per_tensor:
            self.lo.update(x2.amin().reshape(1))
            self.hi.update(x2.amax().reshape(1))
        else:
            self.lo.update(x2.amin(0))
            self.hi.update(x2.amax(0))
        self.count += 1

    def _combine(self) -> None:
        if self.lo.best is None and self.per_tensor:
            self.lo.best = torch.full((1,), float("inf"), device=self.device or "cpu")
            self.hi.best = torch.full((1,), float("-inf"), device=self.device or "cpu")
        self.lo.reduce()
        self.hi.reduce()

    @property
    def value(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._need()
        return self.lo.value, self.hi.value


class HessianObserver(Observer):
    """``H = (2 / n) Σ_t x_t x_tᵀ`` over the ``n`` tokens of every rank (float32)."""

    def __init__(self, width: int, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.sum = torch.zeros(width, width, device=device, dtype=torch.float32)

    def update(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        self.sum.addmm_(x2.T, x2)
        self.count += x2.shape[0]

    def _combine(self) -> None:
        dist.all_reduce_sum(self.sum)
        n = torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum.device)
        self.count = int(dist.all_reduce_sum(n).item())

    @property
    def value(self) -> torch.Tensor:
        self._need()
        return self.sum * (2.0 / max(self.count, 1))


class TokenSample(Observer):
    """Every ``stride``-th token (row of the flattened input) of this rank's batches,
    gathered from all ranks by ``reduce()`` (rank order), at most ``limit`` rows in all.

    With one process and the same stride this keeps exactly the tokens a strided pass over
    all batches keeps; over several ranks it keeps the same number of tokens, drawn evenly
    from every rank's share."""

    def __init__(self, stride: int, limit: int | None = None, *, width: int | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.stride = max(1, int(stride))
        self.limit = limit
        #: row width and device: a rank that saw no token still joins the gather with
        #: ``[0, width]`` rows (without them it cannot, and ``reduce`` raises)
        self.width, self.device = width, device
        self.kept: list[torch.Tensor] = []
        self._seen = 0
        self.rows: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1])
        self.kept.append(x2[(-self._seen) % self.stride::self.stride])
        self._seen += x2.shape[0]
        self.count += 1

    def _combine(self) -> None:
        if not self.kept:
            if self.width is None:
                raise RuntimeError("observer saw no data (give TokenSample a width to let an "
                                   "empty rank join)")
            self.kept = [torch.zeros(0, self.width, device=self.device or "cpu")]
        mine = torch.cat(self.kept)
        self.kept = []
        if dist.active() and self.limit is not None:
            mine = mine[: -(-self.limit // dist.world_size())]
        rows = dist.all_gather_rows(mine.contiguous())
        self.rows = rows[: self.limit] if self.limit is not None else rows

    @property
    def value(self) -> torch.Tensor:
        self._need()
        assert self.rows is not None
        return self.rows
