"""A block's rounding variables in flat tensors, for the training step.

A TesseraQ step on a small block is bound by kernel launches, not arithmetic: computing each
linear's fake-quantized weight on its own costs about twenty small kernels per linear,
forward and backward, more than half of a Llama block's step. :class:`FlatRounding` keeps
every trained linear's rounding variables ``r`` (and scale variables ``nu``) in one flat
parameter each, so a step computes all the linears' weights with one set of elementwise
kernels and one Adam update; each :class:`~llmcq_tesseraq.algorithm.LinearRounding` holds
views of those parameters, so the hardening, the final rounding and the records read and
write the same storage. The weights are the per-linear ones: the same elementwise
operations on the same numbers (:meth:`LinearRounding.weight` stays the reference); a CPU's
vectorized sigmoid can differ from its scalar tail loop in the last bit, so where an element
lands in the buffer can move a weight by one float32 ulp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llmcq.quant.spec import WeightQuantSpec
from llmcq_tesseraq import solver

if TYPE_CHECKING:
    from llmcq_tesseraq.algorithm import LinearRounding

__all__ = ["FlatRounding"]


def _spread(t: torch.Tensor, spec: WeightQuantSpec, shape: tuple[int, int]) -> torch.Tensor:
    """A per-group tensor ``[out, G]`` over every weight it covers, flattened ``[out * in]``."""
    return solver.per_column(t, spec, shape[1]).expand(shape).reshape(-1)


class FlatRounding:
    """The trained linears of one block (``state``, each on its grid ``grids[name]``) as
    flat learnable tensors :attr:`r` and :attr:`nu`; ``state``'s ``r``/``nu`` become views
    of them."""

    def __init__(self, state: dict[str, LinearRounding], grids: dict[str, WeightQuantSpec]
                 ) -> None:
        self.names = list(state)
        self._lin = [state[n] for n in self.names]
        self._grids = [grids[n] for n in self.names]
        self._shapes = [(int(t.base.shape[0]), int(t.base.shape[1])) for t in self._lin]
        self._sizes = [t.base.numel() for t in self._lin]
        with torch.no_grad():
            self.r = nn.Parameter(torch.cat([t.r.detach().reshape(-1) for t in self._lin]))
            for t, v, shape in zip(self._lin, self.r.data.split(self._sizes), self._shapes,
                                   strict=True):
                t.r = v.view(shape)
            self.nu: nn.Parameter | None = None
            if all(t.nu is not None for t in self._lin):
                nus = [t.nu for t in self._lin]
                self._group_sizes = [n.numel() for n in nus if n is not None]
                self.nu = nn.Parameter(torch.cat([n.detach().reshape(-1) for n in nus
                                                  if n is not None]))
                self._scale = torch.cat([t.scale.reshape(-1) for t in self._lin])
                for t, v in zip(self._lin, self.nu.data.split(self._group_sizes), strict=True):
                    t.nu = v.view(t.scale.shape)
            elif any(t.nu is not None for t in self._lin):
                raise ValueError("optimize_scale applies to every linear of a block or none")
        self._fixed: dict[str, Any] = {}

    def _pieces(self) -> dict[str, Any]:
        """What stays fixed between hardenings, rebuilt when a linear's state changes."""
        states = [t.state for t in self._lin]
        if self._fixed.get("states") is not None and all(
                a is b for a, b in zip(self._fixed["states"], states, strict=True)):
            return self._fixed
        zeros = [None if t.zero is None else _spread(t.zero, g, s)
                 for t, g, s in zip(self._lin, self._grids, self._shapes, strict=True)]
        asym = any(z is not None for z in zeros)
        # a symmetric linear among asymmetric ones: zero 0, and (q - 0) s == q s exactly
        zero = torch.cat([z if z is not None else torch.zeros(n, device=self.r.device)
                          for z, n in zip(zeros, self._sizes, strict=True)]) if asym else None
        base = torch.cat([t.base.reshape(-1) for t in self._lin])
        bounds = [solver.bounds(g) for g in self._grids]
        if len(set(bounds)) == 1:
            lo: Any = bounds[0][0]
            hi: Any = bounds[0][1]
        else:  # linears on grids of different widths in one block (quant.mix_bits)
            lo = torch.cat([torch.full((n,), float(b[0]), device=self.r.device)
                            for b, n in zip(bounds, self._sizes, strict=True)])
            hi = torch.cat([torch.full((n,), float(b[1]), device=self.r.device)
                            for b, n in zip(bounds, self._sizes, strict=True)])
        self._fixed = {
            "states": states, "zero": zero, "lo": lo, "hi": hi,
            "offset": base if zero is None else base + zero,
            "soft": torch.cat([(t.state == solver.SOFT).reshape(-1) for t in self._lin]),
            "hard": torch.cat([t.state.reshape(-1) for t in self._lin]).float(),
            "scale": None if self.nu is not None else torch.cat(
                [_spread(t.scale, g, s) for t, g, s in zip(self._lin, self._grids,
                                                           self._shapes, strict=True)]),
        }
        return self._fixed

    def weights(self) -> dict[str, torch.Tensor]:
        """Every linear's fake-quantized weight with the current rounding and scales (the
        values of :meth:`LinearRounding.weight`), differentiable in :attr:`r` and
        :attr:`nu`."""
        p = self._pieces()
        h = torch.where(p["soft"], solver.rectified_sigmoid(self.r), p["hard"])
        q = torch.clamp(p["offset"] + h, p["lo"], p["hi"])
        if self.nu is None:
            scale = p["scale"]
        else:
            eff = solver.effective_scale(self._scale, self.nu)
            scale = torch.cat([
                _spread(e.view(t.scale.shape), g, s) for e, t, g, s in
                zip(eff.split(self._group_sizes), self._lin, self._grids, self._shapes,
                    strict=True)])
        w = solver.dequantize(q, p["zero"], scale)
        return {n: v.view(s) for n, v, s in zip(self.names, w.split(self._sizes), self._shapes,
                                                strict=True)}
