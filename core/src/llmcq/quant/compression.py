"""The ``compression`` block of results.json: how small the quantized model is.

* ``weight_bits_mean``: mean bits per weight on a quantization grid, over every quantized
  linear, each linear at its own width (layer-wise settings, ``quant.mix_bits``) and each
  group at its own (``group_bits``), weighted by the number of weights; float columns are
  not on a grid and are left out. For a uniform W3 run it is exactly 3. Linears kept in
  float (``ignored_layers``, ``do_quant: False``) have no record: like the embeddings and
  the head they are left out of this mean, of ``bits_per_param`` and of
  ``params_quantized``, and counted in ``params_total``. A record whose grid has
  ``levels`` other than ``2^bits`` (ABQ-LLM's bit balance: 5 at 2 bits) counts
  ``log2(levels)`` bits per weight here (2.32), and ``ceil(log2(levels))`` (codes and
  integral zeros) in ``bits_per_param``.
* ``bits_per_param``: storage bits per weight of the quantized linears as a dense packed
  format holds them: codes at their (per-group) width; one scale per group at 16 bits;
  zero points at the weight width when integral, at 16 bits when fractional; float
  columns at 16 bits plus a 32-bit column index; sparse outliers at 16 bits plus two
  16-bit indices; quantized scales at their own width plus 16-bit second-level steps and
  zeros instead of the 16-bit scales. Masks cost nothing here (a dense format stores pruned
  weights as codes): sparsity is reported on its own.
* ``params_quantized``: weights on a grid; ``params_total``: every parameter of the model
  (tied weights once); ``linears_quantized``.
* ``sparsity``: fraction of exact zeros in the weights of the pruned linears, measured on
  the final weights (``None`` without pruning; after quantization it can exceed the masks'
  share, when kept weights round to zero); ``mask_sparsity``: the masks' share of pruned
  weights; ``linears_pruned``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from llmcq.quant.record import QuantizedLinear
from llmcq.quant.spec import PerTensor

__all__ = ["compression_summary", "record_bits", "linear_summary"]

#: bits of a stored float (scales, fractional zeros, float columns, outliers)
FLOAT_BITS = 16
#: bits of a stored index (float columns)
INDEX_BITS = 32


def _group_widths(rec: QuantizedLinear) -> torch.Tensor:
    """Columns of every group ``[G]`` (by ``column_groups``; float columns excluded)."""
    groups = rec.column_groups().cpu()
    keep = torch.ones_like(groups, dtype=torch.bool)
    if rec.float_columns is not None:
        keep[rec.float_columns[0].long().cpu()] = False
    n = 1 if isinstance(rec.weight.granularity, PerTensor) else int(rec.scale.shape[1])
    return torch.bincount(groups[keep], minlength=n).double()


def record_bits(rec: QuantizedLinear, *, zero_integral: bool | None = None
                ) -> dict[str, float]:
    """``{"grid_weights", "code_bits", "storage_bits", "weights"}`` of one record (see the
    module). ``zero_integral`` overrides ``rec.zero_is_integral`` (the bit-budget search
    prices a round-to-nearest record as an algorithm storing fractional zeros would)."""
    out_f = rec.out_features
    widths = _group_widths(rec)  # [G]
    per_tensor = isinstance(rec.weight.granularity, PerTensor)
    if rec.is_float:
        bits = torch.full((1 if per_tensor else out_f, widths.numel()), 8.0,
                          dtype=torch.float64)
    elif rec.group_bits is not None:
        bits = rec.group_bits.double().cpu()
    else:
        width = math.log2(rec.levels) if rec.levels is not None else float(rec.bits)
        bits = torch.full((1 if per_tensor else out_f, widths.numel()), width,
                          dtype=torch.float64)
    rows = float(out_f) if per_tensor else 1.0
    grid_weights = float(widths.sum()) * out_f
    code_bits = float((bits * widths.unsqueeze(0)).sum()) * rows
    n_scales = float(rec.scale.numel())
    if rec.scale_codes is not None:
        sc = rec.scale_codes
        scale_bits = n_scales * sc.bits + FLOAT_BITS * float(sc.step.numel()) + (
            0.0 if sc.zero is None else FLOAT_BITS * float(sc.zero.numel()))
    else:
        scale_bits = FLOAT_BITS * n_scales
    zero_bits = 0.0
    if rec.zero is not None:
        integral = rec.zero_is_integral if zero_integral is None else zero_integral
        stored = rec.bits if rec.levels is None else math.ceil(math.log2(rec.levels))
        zero_bits = float(rec.zero.numel()) * (stored if integral else FLOAT_BITS)
    extra = 0.0
    if rec.levels is not None:  # codes are stored at whole bits: ceil(log2(levels)) each
        extra += (math.ceil(math.log2(rec.levels)) - math.log2(rec.levels)) * grid_weights
    if rec.float_columns is not None:
        k = int(rec.float_columns[0].numel())
        extra += k * out_f * FLOAT_BITS + k * INDEX_BITS
    if rec.outliers is not None:
        extra += int(rec.outliers.values.numel()) * (FLOAT_BITS * 3)
    return {"grid_weights": grid_weights, "code_bits": code_bits,
            "storage_bits": code_bits + scale_bits + zero_bits + extra,
            "weights": float(out_f * rec.in_features)}


def compression_summary(model: nn.Module, records: Mapping[str, QuantizedLinear],
                        pruned: Mapping[str, Any]) -> dict[str, Any]:
    """The ``compression`` block for ``model`` after the run (see the module docstring)."""
    params_total = sum(p.numel() for p in model.parameters())
    grid = code = storage = weights = 0.0
    for rec in records.values():
        b = record_bits(rec)
        grid += b["grid_weights"]
        code += b["code_bits"]
        storage += b["storage_bits"]
        weights += b["weights"]
    zeros = total = masked = 0
    for name, (n_pruned, _n) in pruned.items():
        w = model.get_submodule(name).weight
        zeros += int((w == 0).sum())
        total += int(w.numel())
        masked += int(n_pruned)
    return {
        "weight_bits_mean": round(code / grid, 6) if grid else None,
        "bits_per_param": round(storage / weights, 6) if weights else None,
        "params_quantized": int(grid),
        "params_total": int(params_total),
        "linears_quantized": len(records),
        "sparsity": round(zeros / total, 6) if total else None,
        "mask_sparsity": round(masked / total, 6) if total else None,
        "linears_pruned": len(pruned),
    }


def linear_summary(records: Mapping[str, QuantizedLinear], pruned: Mapping[str, Any]
                   ) -> dict[str, dict[str, Any]]:
    """Per linear (results.json ``linears``): ``weight_bits`` and ``bits_per_param`` as in
    :func:`compression_summary`; ``group_bits``: with per-group widths, the mean width of
    each group column (``[G]``, averaged over output rows); ``sparsity``: the mask's share
    of pruned weights."""
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(set(records) | set(pruned)):
        entry: dict[str, Any] = {}
        rec = records.get(name)
        if rec is not None:
            b = record_bits(rec)
            entry["weight_bits"] = round(b["code_bits"] / b["grid_weights"], 6) \
                if b["grid_weights"] else None
            entry["bits_per_param"] = round(b["storage_bits"] / b["weights"], 6)
            if rec.group_bits is not None:
                entry["group_bits"] = [round(float(v), 4) for v in
                                       rec.group_bits.float().mean(dim=0).tolist()]
        if name in pruned:
            n_pruned, n = pruned[name]
            entry["sparsity"] = round(n_pruned / n, 6) if n else None
        out[name] = entry
    return out
