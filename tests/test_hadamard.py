"""Hadamard matrices beyond powers of two (llmcq.transforms.hadamard): every order the
Sylvester x Paley decomposition gives is orthogonal with entries +-1/sqrt(n), the fast apply
equals the dense matrix, the serialized transform reads back; sizes of real models."""

from __future__ import annotations

import math

import pytest
import torch

from llmcq.quant.transform import transform_from_dict
from llmcq.transforms.hadamard import (
    Hadamard,
    hadamard_matrix,
    hadamard_order,
    is_prime,
    paley_matrix,
    paley_order,
    random_orthogonal,
    sylvester,
)


def test_primes() -> None:
    assert [q for q in range(30) if is_prime(q)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]


@pytest.mark.parametrize("m", [4, 8, 12, 20, 24, 28, 32, 36, 44, 48, 60, 68, 72, 84, 108])
def test_paley_matrices_are_hadamard(m: int) -> None:
    assert paley_order(m) in ("I", "II")
    h = paley_matrix(m)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(h @ h.T, m * torch.eye(m, dtype=torch.float64), rtol=0, atol=0)


def test_orders_without_a_prime_paley_construction() -> None:
    assert paley_order(16) is None  # 15 and 7 are not primes of the right residue
    assert paley_order(92) is None
    assert paley_order(9) is None  # not a Hadamard order at all


def test_every_multiple_of_four_up_to_512_that_decomposes_is_orthogonal() -> None:
    seen = 0
    for n in range(4, 513, 4):
        if hadamard_order(n) is None:
            continue
        h = hadamard_matrix(n, torch.float64)
        torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0,
                                   atol=1e-12)
        assert torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(n)))
        seen += 1
    # orders up to 256 with no prime-field Paley core times a power of two (Paley over prime
    # powers, Williamson or Kronecker products of two cores would fill some)
    missing = [n for n in range(4, 257, 4) if hadamard_order(n) is None]
    assert missing == [52, 92, 100, 116, 156, 172, 184, 188, 232, 236, 244]
    assert seen == 78


@pytest.mark.parametrize(("n", "m", "p"), [(576, 36, 16), (1536, 12, 128), (64, 1, 64),
                                           (4096, 1, 4096), (960, 60, 16), (2560, 20, 128),
                                           (3072, 12, 256), (5120, 20, 256), (3584, 28, 128),
                                           (8960, 140, 64), (14336, 28, 512),
                                           (18944, 148, 128)])
def test_model_widths(n: int, m: int, p: int) -> None:
    """SmolLM2-135M (576, 1536) and -360M (960), head dims, Llama/Qwen widths (Qwen2-7B
    3584 and 18944, Llama-3-8B 14336): the smallest core."""
    assert hadamard_order(n) == (m, p)


def test_sizes_without_a_decomposition() -> None:
    assert hadamard_order(11008) is None  # 2^8 x 43 (QuaRot ships a hand-made H_172)
    assert hadamard_order(11008, max_core=6000) == (5504, 2)  # Paley I, q = 5503: not fast
    assert hadamard_order(9) is None  # nine heads: no cross-head Hadamard
    with pytest.raises(ValueError, match="random_orthogonal"):
        hadamard_matrix(9)


@pytest.mark.parametrize("n", [576, 1536, 64, 12, 40])
def test_fast_apply_equals_the_dense_matrix(n: int) -> None:
    t = Hadamard(n)
    x = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    dense = hadamard_matrix(n, torch.float64)
    torch.testing.assert_close(t.apply(x.float()).double(), x @ dense.T, rtol=0, atol=1e-5)
    torch.testing.assert_close(t.matrix(torch.float64), dense, rtol=0, atol=1e-6)
    # orthogonal: applying the transpose undoes it, norms kept
    y = t.apply(x.float())
    torch.testing.assert_close(y.norm(dim=-1), x.float().norm(dim=-1), rtol=1e-5, atol=1e-5)
    back = transform_from_dict(t.to_dict())
    assert isinstance(back, Hadamard) and back.m == t.m and back.p == t.p
    torch.testing.assert_close(back.apply(x.float()), y)


def test_apply_keeps_dtype_and_refuses_other_widths() -> None:
    t = Hadamard(576)
    x = torch.randn(2, 576).to(torch.bfloat16)
    assert t.apply(x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="input width 575"):
        t.apply(torch.zeros(1, 575))
    with pytest.raises(ValueError, match="core order 12 written"):
        transform_from_dict({"kind": "hadamard", "size": 576, "core": 12})


def test_sylvester_and_random_orthogonal() -> None:
    h = sylvester(8)
    torch.testing.assert_close(h @ h.T, 8 * torch.eye(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="power of two"):
        sylvester(12)
    q = random_orthogonal(9, seed=3, dtype=torch.float64)
    torch.testing.assert_close(q @ q.T, torch.eye(9, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(q, random_orthogonal(9, seed=3, dtype=torch.float64))
    assert not torch.equal(q, random_orthogonal(9, seed=4, dtype=torch.float64))


def test_block_hadamard_is_the_block_diagonal_sylvester_matrix() -> None:
    """core's BlockHadamard and Hadamard share the butterfly (``fwht``): blocks of 8 over 24
    channels equal ``I_3 (x) H_8 / sqrt(8)``; the full transform of 64 equals Sylvester's."""
    from llmcq.quant.transform import BlockHadamard, fwht

    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dense = torch.kron(torch.eye(3, dtype=torch.float64), sylvester(8)) / math.sqrt(8)
    torch.testing.assert_close(BlockHadamard(24, 8).apply(x.float()).double(), x @ dense.T,
                               rtol=0, atol=1e-6)
    y = torch.randn(2, 64, dtype=torch.float64)
    torch.testing.assert_close(fwht(y), y @ sylvester(64).T, rtol=0, atol=1e-12)
