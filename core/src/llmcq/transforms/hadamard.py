"""Hadamard matrices of sizes that are not powers of two, applied in O(n log n).

Rotation methods (QuaRot, SpinQuant's start) multiply activations and weights by a
normalized Hadamard matrix ``H / sqrt(n)``: orthogonal, with every entry of the same size,
so one outlier channel is spread over all of them. Sylvester's construction gives only
powers of two, while model widths are often not (SmolLM2: hidden 576 = 36 * 16, MLP 1536 =
12 * 128). Every Hadamard order is 1, 2 or a multiple of 4; this module builds one as the
Kronecker product ``H_m (x) H_p`` of a small "core" ``H_m`` and Sylvester's ``H_p``
(``p = 2^k``), with ``H_m`` from Paley's constructions over a prime field:

* Paley I, ``q`` prime with ``q = 3 (mod 4)``: order ``q + 1``. ``Q`` is the Jacobsthal
  matrix ``Q[i, j] = chi(j - i)`` (``chi`` the quadratic character mod ``q``), which is
  skew-symmetric; ``H = I + [[0, 1^T], [-1, Q]]``.
* Paley II, ``q`` prime with ``q = 1 (mod 4)``: order ``2 (q + 1)``. ``Q`` is symmetric;
  ``C = [[0, 1^T], [1, Q]]`` and every entry of ``C`` becomes the 2 x 2 block
  ``[[1, -1], [-1, -1]]`` where ``C`` is 0, ``+-[[1, 1], [1, -1]]`` where it is ``+-1``.

:func:`hadamard_order` picks the decomposition with the smallest core (the dense part of
the apply); :func:`hadamard_matrix` builds the ``n x n`` matrix; :class:`Hadamard` applies
``x -> x (H_m (x) H_p)^T / sqrt(n)`` as a butterfly over the ``p`` part and one ``m x m``
matmul, ``O(n (log p + m))`` with ``m <= MAX_CORE``. Sizes with no such decomposition (an odd
number of heads, 11008 = 2^8 * 43, whose only one has a core of 5504) get ``None`` from :func:`hadamard_order`: a caller falls back to a random
orthogonal matrix (:func:`random_orthogonal`) and says so.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import torch

from llmcq.quant.transform import OnlineTransform, fwht

__all__ = ["is_prime", "paley_order", "paley_matrix", "sylvester", "hadamard_order",
           "hadamard_matrix", "random_orthogonal", "Hadamard"]


def is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    return all(q % d for d in range(3, math.isqrt(q) + 1, 2))


def _chi(q: int) -> list[int]:
    """The quadratic character mod ``q``: ``chi[a]`` is 0, 1 (a nonzero square) or -1."""
    squares = {(x * x) % q for x in range(1, q)}
    return [0] + [1 if a in squares else -1 for a in range(1, q)]


def paley_order(m: int) -> str | None:
    """Which Paley construction gives order ``m`` from a prime (``"I"``, ``"II"``), or
    None; order 1 and 2 are ``"trivial"``."""
    if m in (1, 2):
        return "trivial"
    if is_prime(m - 1) and (m - 1) % 4 == 3:
        return "I"
    if m % 2 == 0 and is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "II"
    return None


@lru_cache(maxsize=64)
def _paley(m: int) -> tuple[tuple[int, ...], ...]:
    kind = paley_order(m)
    if kind == "trivial":
        return ((1,),) if m == 1 else ((1, 1), (1, -1))
    if kind is None:
        raise ValueError(f"no Paley construction of order {m} over a prime field")
    q = m - 1 if kind == "I" else m // 2 - 1
    chi = _chi(q)
    jac = [[chi[(j - i) % q] for j in range(q)] for i in range(q)]
    if kind == "I":  # S = [[0, 1..1], [-1.., Q]] is skew; H = I + S
        s = [[0] + [1] * q] + [[-1] + row for row in jac]
        return tuple(tuple(s[i][j] + (1 if i == j else 0) for j in range(m)) for i in range(m))
    c = [[0] + [1] * q] + [[1] + row for row in jac]  # symmetric conference matrix
    zero, one = ((1, -1), (-1, -1)), ((1, 1), (1, -1))
    rows = []
    for i in range(q + 1):
        for r in range(2):
            row: list[int] = []
            for j in range(q + 1):
                e = c[i][j]
                blk = zero if e == 0 else one
                row += [e * v if e else v for v in blk[r]]
            rows.append(tuple(row))
    return tuple(rows)


def paley_matrix(m: int) -> torch.Tensor:
    """The (unnormalized, +-1) Paley Hadamard matrix of order ``m``."""
    return torch.tensor(_paley(m), dtype=torch.float64)


def sylvester(p: int) -> torch.Tensor:
    """Sylvester's (unnormalized) Hadamard matrix of order ``p``, a power of two."""
    if p < 1 or p & (p - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, got {p}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


#: the largest core the decomposition takes: the apply's dense part costs ``m`` per channel,
#: so a larger core is no longer a fast transform (11008 = 2 x 5504 would be one)
MAX_CORE = 256


def hadamard_order(n: int, max_core: int = MAX_CORE) -> tuple[int, int] | None:
    """``(m, p)`` with ``n = m * p``, ``p`` a power of two and ``m <= max_core`` a Paley
    (or trivial) order, the smallest ``m`` first; None when there is none (the caller falls
    back)."""
    if n < 1:
        raise ValueError(f"a Hadamard size is positive, got {n}")
    p = n & -n  # the largest power of two dividing n
    while p >= 1:
        m = n // p
        if m > max_core:
            break
        if paley_order(m) is not None:
            return m, p
        p //= 2
    return None


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalized ``n x n`` Hadamard matrix ``(H_m (x) H_p) / sqrt(n)`` (orthogonal)."""
    order = hadamard_order(n)
    if order is None:
        raise ValueError(f"no Hadamard matrix of order {n} from Sylvester x Paley (prime "
                         "fields); use random_orthogonal")
    m, p = order
    return (torch.kron(paley_matrix(m), sylvester(p)) / math.sqrt(n)).to(dtype)


def random_orthogonal(n: int, seed: int = 0, dtype: torch.dtype = torch.float32
                      ) -> torch.Tensor:
    """A Haar-random orthogonal ``n x n`` matrix (QR of a Gaussian with the signs of R's
    diagonal folded in), reproducible from ``seed``."""
    g = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


class Hadamard(OnlineTransform):
    """The normalized Hadamard transform of any size :func:`hadamard_order` decomposes:
    ``T(x) = x @ H^T`` with ``H = (H_m (x) H_p) / sqrt(n)``, computed as a butterfly over
    the last ``p`` channels of each of ``m`` chunks and one ``m x m`` matmul, in float32
    (``fp32``, cast back) or in the input's dtype (llmc's ``fp32_had: False``)."""

    kind = "hadamard"

    def __init__(self, size: int, fp32: bool = True) -> None:
        order = hadamard_order(size)
        if order is None:
            raise ValueError(f"no Hadamard matrix of order {size} from Sylvester x Paley; "
                             "use a random orthogonal MatrixTransform")
        self.size, self.fp32 = int(size), bool(fp32)
        self.m, self.p = order
        self._core = paley_matrix(self.m).float()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size:
            raise ValueError(f"input width {x.shape[-1]} != transform size {self.size}")
        y = fwht((x.float() if self.fp32 else x).reshape(*x.shape[:-1], self.m, self.p))
        if self.m > 1:  # (H_m (x) H_p) x = vec(H_m X H_p^T) with X = x as [m, p]
            y = torch.matmul(self._core.to(device=y.device, dtype=y.dtype), y)
        return (y.reshape(x.shape) / math.sqrt(self.size)).to(x.dtype)

    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.apply(torch.eye(self.size)).T.contiguous().to(dtype)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "size": self.size, "core": self.m}
        if not self.fp32:
            d["fp32"] = False
        return d

    def describe(self) -> str:
        return f"hadamard({self.size} = {self.m} x {self.p})"
