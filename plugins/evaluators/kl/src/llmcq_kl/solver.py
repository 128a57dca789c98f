"""The maths of ``eval.type: kl``: pure functions of tensors.

For one token position with float next-token distribution ``P`` and compressed ``Q`` over the
vocabulary ``V``::

    KL(P ‖ Q) = Σ_v P(v) (log P(v) − log Q(v))          (nats)
    top-1     = [argmax_v P(v) == argmax_v Q(v)]

Both sides go through :func:`stored_log_probs` (log-softmax, rounded to float16 as the
reference is stored on disk, renormalized in float32) so that the float model compared with
itself gives exactly 0 and 1, and the stored reference and the live side differ by the model
only.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["stored_log_probs", "token_kl", "token_top1", "summarize", "histogram",
           "HIST_EDGES"]

#: fixed histogram bins of per-token KL (nats): [0, 1e-6), then 8 log-spaced bins per decade
#: from 1e-6 to 1e2; values at or above 1e2 fall into the last bin
HIST_EDGES: list[float] = [0.0] + [float(f"{10 ** (e / 8):.6g}") for e in range(-48, 17)]


def stored_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probs ``[..., V]`` as stored: float16 on disk (half the bytes of float32)."""
    return torch.log_softmax(logits.float(), dim=-1).to(torch.float16)


def _renorm(stored: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(stored.float(), dim=-1)


def token_kl(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per-position ``KL(ref ‖ other)`` (float32, shape ``[...]``) of two stored
    log-prob tensors ``[..., V]`` (:func:`stored_log_probs`)."""
    lp, lq = _renorm(ref), _renorm(other)
    kl = (lp.exp() * (lp - lq)).sum(dim=-1)
    return kl.clamp_min(0.0)  # rounding can leave -1e-9 where the distributions agree


def token_top1(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per-position agreement (bool) of the most likely next token."""
    return ref.argmax(dim=-1) == other.argmax(dim=-1)


def summarize(kl: np.ndarray, top1: np.ndarray) -> dict[str, float]:
    """``kl_mean``, ``kl_median``, ``kl_p99`` of per-token KLs and ``top1`` (share agreeing)."""
    kl = np.asarray(kl, dtype=np.float64)
    return {"kl_mean": float(kl.mean()), "kl_median": float(np.median(kl)),
            "kl_p99": float(np.percentile(kl, 99)), "top1": float(np.mean(top1))}


def histogram(kl: np.ndarray) -> dict[str, list]:
    """Counts of per-token KLs in :data:`HIST_EDGES` (the last bin is open above)."""
    kl = np.asarray(kl, dtype=np.float64)
    edges = np.asarray(HIST_EDGES)
    idx = np.clip(np.searchsorted(edges, kl, side="right") - 1, 0, len(edges) - 2)
    counts = np.bincount(idx, minlength=len(edges) - 1)
    assert math.isclose(counts.sum(), kl.size)
    return {"edges": list(HIST_EDGES), "counts": [int(c) for c in counts]}
