"""SparseGPT's sweep on synthetic layers: exact structure, OBS beats mask-only pruning, the
joint sweep is GPTQ's when nothing is pruned and beats pruning then quantizing."""

from __future__ import annotations

import pytest
import torch

from llmcq.quant.qparams import fake_quantize_weight
from llmcq.quant.spec import PerChannel, PerGroup, WeightQuantSpec
from llmcq.sparsity import NM, SparsitySpec, Unstructured
from llmcq.sparsity.masks import mask_from_scores, structure_violations
from llmcq_gptq.solver import gptq_quantize
from llmcq_sparsegpt.solver import block_prune_count, sparsegpt_prune

W4G64 = WeightQuantSpec(bits=4, symmetric=False, granularity=PerGroup(64))


def _layer(rows: int = 48, cols: int = 256, seed: int = 0
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Correlated inputs with a few loud channels (as in LLMs), a weight, the Hessian."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(1024, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.2
    X[:, :6] *= 8
    W = torch.randn(rows, cols, generator=g)
    return X, W, 2 * X.T @ X / X.shape[0]


def _err(W: torch.Tensor, w: torch.Tensor, X: torch.Tensor) -> float:
    return float(((W - w) @ X.T).square().sum())


@pytest.mark.parametrize("sparsity,cols,blocksize", [(0.5, 256, 128), (0.3, 250, 64),
                                                     (0.7, 130, 100)])
def test_unstructured_prunes_exactly_per_row(sparsity: float, cols: int,
                                             blocksize: int) -> None:
    X, W, H = _layer(cols=cols)
    res = sparsegpt_prune(W, H, Unstructured(), sparsity, blocksize=blocksize)
    pruned = (~res.mask).sum(1)
    assert (pruned == round(sparsity * cols)).all()
    assert (res.w[~res.mask] == 0).all() and (res.w[res.mask] != 0).all()
    # the block shares add up to the row's count whatever the block boundaries
    assert sum(block_prune_count(sparsity, b, min(b + blocksize, cols))
               for b in range(0, cols, blocksize)) == round(sparsity * cols)


@pytest.mark.parametrize("n,m,cols", [(2, 4, 256), (4, 8, 256), (1, 4, 130), (3, 5, 64)])
def test_nm_keeps_n_of_every_m(n: int, m: int, cols: int) -> None:
    X, W, H = _layer(cols=cols)
    res = sparsegpt_prune(W, H, NM(n, m), 0.0, blocksize=30)  # rounded up to a multiple of m
    assert structure_violations(res.mask, NM(n, m)) == 0
    full = cols - cols % m
    assert (res.mask[:, :full].reshape(W.shape[0], -1, m).sum(-1) == n).all()
    assert (res.w[~res.mask] == 0).all()


def test_an_earlier_mask_stays_pruned() -> None:
    X, W, H = _layer()
    keep = mask_from_scores(W.abs(), SparsitySpec(0.25))  # an earlier step pruned 25 %
    res = sparsegpt_prune(W, H, Unstructured(), 0.5, keep=keep)
    assert not (res.mask & ~keep).any()  # a subset of the earlier mask
    assert ((~res.mask).sum(1) == 128).all()  # the earlier zeros count towards the 50 %
    res = sparsegpt_prune(W, H, NM(2, 4), 0.0, keep=keep)
    assert not (res.mask & ~keep).any() and structure_violations(res.mask, NM(2, 4)) == 0


@pytest.mark.parametrize("structure", [Unstructured(), NM(2, 4), NM(4, 8)])
def test_obs_updates_beat_pruning_by_scores_alone(structure: Unstructured | NM) -> None:
    """Same sparsity: SparseGPT's output error below Wanda's and magnitude's masks (no
    updates), on inputs with loud channels."""
    X, W, H = _layer()
    spec = SparsitySpec(0.5, structure)
    res = sparsegpt_prune(W, H, structure, 0.5)
    wanda = W * mask_from_scores(W.abs() * X.square().sum(0).sqrt(), spec)
    magnitude = W * mask_from_scores(W.abs(), spec)
    e = _err(W, res.w, X)
    assert e < 0.8 * _err(W, wanda, X) and e < 0.8 * _err(W, magnitude, X)
    # undamped, the loss the sweep reports (sum E^2 / 2) is that error times 1/n (H = 2/n
    # X X^T): the OBS bookkeeping of every pruned weight and update is consistent
    exact = sparsegpt_prune(W.double(), H.double(), structure, 0.5, percdamp=0.0)
    assert float(exact.loss) == pytest.approx(_err(W.double(), exact.w, X.double())
                                              / X.shape[0], rel=1e-6)


@pytest.mark.parametrize("spec", [W4G64, WeightQuantSpec(bits=3, symmetric=True,
                                                         granularity=PerChannel())])
def test_joint_sweep_without_pruning_is_gptq(spec: WeightQuantSpec) -> None:
    X, W, H = _layer()
    res = sparsegpt_prune(W, H, Unstructured(), 0.0, spec=spec, blocksize=128)
    ref = gptq_quantize(W, H, spec, blocksize=128, return_dequant=True)
    assert res.q is not None and torch.equal(res.q, ref.q)
    assert torch.equal(res.scale, ref.scale.to(res.scale.dtype))
    assert ref.w_hat is not None and torch.allclose(res.w, ref.w_hat)


@pytest.mark.parametrize("structure", [Unstructured(), NM(2, 4), NM(4, 8)])
def test_joint_sweep_beats_pruning_then_quantizing(structure: Unstructured | NM) -> None:
    """50 % + W4 g64 in one sweep: lower error than SparseGPT then RTN, and than SparseGPT
    then GPTQ's mask-aware sweep; the codes dequantize to the weights it returns."""
    from llmcq.quant.qparams import QParams
    from llmcq.quant.record import make_record

    X, W, H = _layer()
    joint = sparsegpt_prune(W, H, structure, 0.5, spec=W4G64)
    pruned = sparsegpt_prune(W, H, structure, 0.5)
    rtn = fake_quantize_weight(pruned.w, W4G64) * pruned.mask
    gptq = gptq_quantize(pruned.w, H, W4G64, mask=pruned.mask, return_dequant=True).w_hat
    e = _err(W, joint.w, X)
    assert e < _err(W, rtn, X) and e < _err(W, gptq, X)
    assert joint.q is not None
    rec = make_record(joint.q, QParams(joint.scale, joint.zero), W4G64, mask=joint.mask,
                      mask_structure=structure)
    assert rec.problems() == []
    assert torch.allclose(rec.dequantize(), joint.w.float(), atol=1e-6)
    assert (rec.dequantize()[~joint.mask] == 0).all()


def test_a_singular_hessian_degrades_to_magnitude_without_nan() -> None:
    X, W, H = _layer(cols=64)
    H = torch.full_like(H, float("nan"))
    res = sparsegpt_prune(W, H, NM(2, 4), 0.0, retries=1)
    assert res.fallback and torch.isfinite(res.w).all()
    assert torch.equal(res.mask, mask_from_scores(W.abs(), SparsitySpec(0.5, NM(2, 4))))
