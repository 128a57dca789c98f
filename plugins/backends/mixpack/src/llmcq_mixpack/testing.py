"""Test-only mixed-precision records (until SliM-LLM lands): groups with their own bit
widths on real weights, so the mixpack round trips see what SliM-LLM makes.

* :func:`hand_record`: one record of each kind the format holds (:data:`KINDS`), and
  :func:`fake_quantized`: a tiny model whose linears carry them (one kind per linear);
* ``quant.method: mixed_rtn`` (:data:`SPEC`, registered by the tests), a quantizer with a
  simple allocation, for runs through the pipeline.

Part of the installed package (not of its tests folder) so mixpack's tests, the kernels
package's tests and bench/mixpack_size.py import one copy: under the repo's
``--import-mode=importlib`` test folders are not importable from each other.

Allocation (``mixed_rtn``): per linear, the quarter of groups with the largest round-to-
nearest error at ``N`` bits get ``N + 1`` bits and the quarter with the smallest get
``N - 1``, so the mean is exactly ``N``; each group is then rounded to nearest on a min-max
grid of its own width.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from llmcq.algorithm import Algorithm
from llmcq.api import AlgorithmSpec, StepSettings
from llmcq.capabilities import Feature
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.quant.fake import FakeQuantLinear, set_module
from llmcq.quant.qparams import QParams, group_view, ungroup
from llmcq.quant.record import QuantizedLinear, QuantizedScales, make_record
from llmcq.quant.spec import PerChannel, PerGroup, PerTensor, WeightQuantSpec

MODULE = "llmcq_mixpack.testing"
NAME = "mixed_rtn"


def grid_codes(wg: torch.Tensor, bits: torch.Tensor, symmetric: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest codes of groups ``wg`` ``[R, G, g]`` on min-max grids of per-group
    widths ``bits`` ``[R, G]`` (llmc's conventions): ``(codes, scale, zero)``."""
    b = bits.unsqueeze(-1).to(torch.float32)
    wg = wg.float()
    if symmetric:
        qmax = 2 ** (b - 1) - 1
        scale = (wg.abs().amax(-1, keepdim=True) / qmax).clamp(min=1e-8)
        q = torch.maximum(torch.minimum(torch.round(wg / scale), qmax), -qmax - 1)
        return q, scale.squeeze(-1), None
    qmax = 2**b - 1
    hi, lo = wg.amax(-1, keepdim=True), wg.amin(-1, keepdim=True)
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    zero = torch.minimum((-lo / scale).round(), qmax).clamp(min=0)
    q = torch.minimum(torch.round(wg / scale + zero), qmax).clamp(min=0)
    return q, scale.squeeze(-1), zero.squeeze(-1)


def mixed_record(w: torch.Tensor, spec: WeightQuantSpec, group_bits: torch.Tensor,
                 bias: torch.Tensor | None = None) -> QuantizedLinear:
    """The record of ``w`` with each group on a grid of its own width."""
    wg = group_view(w, spec.granularity)
    q, scale, zero = grid_codes(wg, group_bits, spec.symmetric)
    return make_record(ungroup(q, w.shape), QParams(scale, zero), spec, bias=bias,
                       group_bits=group_bits.to(torch.int64))


def allocate(w: torch.Tensor, spec: WeightQuantSpec) -> torch.Tensor:
    """Per-group widths ``[R, G]`` with mean exactly ``spec.bits`` (see the module doc)."""
    wg = group_view(w, spec.granularity)
    n = torch.full(wg.shape[:2], spec.bits)
    q, scale, zero = grid_codes(wg, n, spec.symmetric)
    deq = (q - (0 if zero is None else zero.unsqueeze(-1))) * scale.unsqueeze(-1)
    err = (deq - wg.float()).pow(2).sum(-1).reshape(-1)
    k = err.numel() // 4
    order = torch.argsort(err, stable=True)
    bits = n.reshape(-1).clone()
    bits[order[err.numel() - k:]] += 1
    bits[order[:k]] -= 1
    return bits.reshape(n.shape)


class MixedRTN(Algorithm):
    """``quant.method: mixed_rtn``: :func:`allocate` then :func:`mixed_record`."""

    def quantize(self, block: Any, inputs: Any) -> dict[str, QuantizedLinear]:
        out = {}
        with torch.no_grad():
            for name, lin in block.linears().items():
                w = lin.weight.data.float()
                out[name] = mixed_record(w, self.weight, allocate(w, self.weight),
                                         bias=lin.bias)
        return out


class MixedRTNSpec(AlgorithmSpec):
    def produces(self, step: StepSettings) -> list[Feature]:
        return [Feature("group_bits", step.method_path, NAME, source=NAME,
                        hint="use a uniform-grid algorithm")]


SPEC = MixedRTNSpec(name=NAME, impl=f"{MODULE}:MixedRTN",
                    summary="test-only: RTN with per-group widths N-1/N/N+1, mean N")


# --------------------------------------------------------------------- hand-made records

def rand_bits(shape: tuple[int, int], lo: int, hi: int, gen: torch.Generator) -> torch.Tensor:
    """Random widths in ``lo..hi``, both ends present."""
    bits = torch.randint(lo, hi + 1, shape, generator=gen)
    bits.view(-1)[:2] = torch.tensor([lo, hi])  # both ends present
    return bits


def hand_record(kind: str, w: torch.Tensor, bias: torch.Tensor | None,
                gen: torch.Generator) -> QuantizedLinear:
    """A record of ``w`` of one of :data:`KINDS` (widths random, codes rounded to nearest)."""
    out, n_in = w.shape
    if kind == "mixed_sym_g48":  # partial last group (64 = 48 + 16, 160 = 3 * 48 + 16)
        spec = WeightQuantSpec(bits=3, symmetric=True, granularity=PerGroup(48))
        return mixed_record(w, spec, rand_bits((out, -(-n_in // 48)), 2, 4, gen), bias)
    if kind == "mixed_asym_1to8":
        spec = WeightQuantSpec(bits=4, symmetric=False, granularity=PerGroup(16))
        return mixed_record(w, spec, rand_bits((out, n_in // 16), 1, 8, gen), bias)
    if kind == "uniform_asym_g64":
        spec = WeightQuantSpec(bits=4, symmetric=False, granularity=PerGroup(64))
        rec = mixed_record(w, spec, torch.full((out, -(-n_in // 64)), 4), bias)
        rec.group_bits = None
        return rec
    if kind == "per_channel_mixed":  # one width per row
        spec = WeightQuantSpec(bits=4, symmetric=True, granularity=PerChannel())
        return mixed_record(w, spec, rand_bits((out, 1), 2, 8, gen), bias)
    if kind == "per_tensor":
        spec = WeightQuantSpec(bits=8, symmetric=True, granularity=PerTensor())
        return mixed_record(w, spec, torch.tensor([[8]]), bias)
    if kind == "g_idx":  # GPTQ act-order: columns quantized in a permuted order
        spec = WeightQuantSpec(bits=3, symmetric=False, granularity=PerGroup(16))
        perm = torch.randperm(n_in, generator=gen)
        g_idx = torch.empty(n_in, dtype=torch.int32)
        g_idx[perm] = (torch.arange(n_in) // 16).to(torch.int32)
        rec = mixed_record(w[:, perm], spec, rand_bits((out, n_in // 16), 2, 4, gen), bias)
        rec.qweight = rec.qweight[:, torch.argsort(perm)].contiguous()
        rec.g_idx = g_idx
        return rec
    if kind == "float_columns":  # their codes are off the grid: stored as placeholders
        spec = WeightQuantSpec(bits=3, symmetric=True, granularity=PerGroup(32))
        rec = mixed_record(w, spec, rand_bits((out, n_in // 32), 2, 4, gen), bias)
        cols = torch.tensor([0, 33, n_in - 1])
        rec.qweight[:, cols] = 100
        rec.float_columns = (cols, w[:, cols].clone())
        return rec
    if kind == "fractional_zero":
        spec = WeightQuantSpec(bits=3, symmetric=False, granularity=PerGroup(32),
                               round_zp=False)
        rec = mixed_record(w, spec, rand_bits((out, n_in // 32), 2, 4, gen), bias)
        assert rec.zero is not None
        rec.zero = rec.zero + torch.rand(rec.zero.shape, generator=gen) * 0.5
        return rec
    if kind == "quantized_scales":
        spec = WeightQuantSpec(bits=4, symmetric=True, granularity=PerGroup(32))
        rec = mixed_record(w, spec, rand_bits((out, n_in // 32), 3, 5, gen), bias)
        codes = torch.randint(1, 16, rec.scale.shape, generator=gen)
        rec.scale_codes = QuantizedScales(codes=codes, step=torch.full((1, n_in // 32), 2e-3),
                                          zero=None, bits=4, group_rows=out)
        rec.scale = rec.scale_codes.values()
        return rec
    raise AssertionError(kind)


KINDS = ("mixed_sym_g48", "mixed_asym_1to8", "uniform_asym_g64", "per_channel_mixed",
         "per_tensor", "g_idx", "float_columns", "fractional_zero", "quantized_scales")
#: the linear kept in float (no record), as ignored_layers makes
FLOAT_LINEAR = "model.layers.1.mlp.down_proj"


def fake_quantized(folder: Path) -> tuple[Any, Any, dict[str, QuantizedLinear]]:
    """The model in ``folder`` with every block linear but :data:`FLOAT_LINEAR` replaced by
    the fake-quant linear of a hand-made record, the kinds in turn; and the records."""
    model, tok = load_pretrained(ModelSource(folder))
    gen = torch.Generator().manual_seed(0)
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    records = {}
    for i, name in enumerate(n for n in names if n != FLOAT_LINEAR):
        lin = model.get_submodule(name)
        rec = hand_record(KINDS[i % len(KINDS)], lin.weight.data.float(), lin.bias, gen)
        assert rec.problems() == [], (name, rec.problems())
        records[name] = rec
        set_module(model, name, FakeQuantLinear.from_record(rec, dtype=torch.float32))
    return model, tok, records
