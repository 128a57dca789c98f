"""Pack llmcq's 4-bit records into AutoAWQ's GEMM layout (read by AutoAWQ, transformers,
vLLM/SGLang ``awq``, and MLC-LLM's AWQ loader).

Per linear (``W`` is ``[out, in]``, groups of ``g`` input columns, ``G = in / g``):

* ``qweight`` int32 ``[in, out / 8]``: unsigned codes of ``W^T``; word ``c`` of row ``r`` holds
  output columns ``8c .. 8c+7`` in the interleaved order ``[0, 2, 4, 6, 1, 3, 5, 7]``: nibble
  ``i`` (bits ``4i .. 4i+3``) is column ``8c + ORDER[i]``;
* ``qzeros`` int32 ``[G, out / 8]``: zero points packed the same way (no offset);
* ``scales`` fp16 ``[G, out]``; ``bias`` as in the model.

``W[o, c] = scales[c // g, o] * (q[c, o] - zero[c // g, o])``. Symmetric codes are shifted to
unsigned with zero point 8, so ``zero_point: true`` always holds.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from llmcq.capabilities import describe_features
from llmcq.errors import PluginError
from llmcq.model.hf_io import save_hf_folder
from llmcq.quant.record import QuantizedLinear

from llmcq_autoawq import AUTOAWQ_SPEC

__all__ = ["export", "pack_record", "pack_awq_order", "AWQ_ORDER"]

#: output column of each nibble inside a word (AutoAWQ's GEMM kernel order)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_awq_order(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes ``[rows, cols]`` -> int32 ``[rows, cols / 8]`` in AWQ order."""
    rows, cols = codes.shape
    if cols % 8:
        raise PluginError(f"awq format: {cols} output columns are not a multiple of 8")
    c = codes.to(torch.int64).reshape(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (c << shifts).sum(dim=-1) & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_record(rec: QuantizedLinear) -> dict[str, torch.Tensor]:
    if rec.bits != 4:
        raise PluginError(f"awq format: 4-bit only, got {rec.describe()}")
    extra = set(rec.features()) - AUTOAWQ_SPEC.accepts  # check_records refused these already
    if extra:
        raise PluginError(f"awq format cannot hold {describe_features(extra)} "
                          f"({rec.describe()})")
    n_groups = int(rec.scale.shape[1])
    gs = rec.group_size  # None per channel (one group per row)
    if rec.in_features % n_groups or (gs is not None and rec.in_features != n_groups * gs):
        raise PluginError(f"awq format needs whole groups ({rec.describe()}, in_features "
                          f"{rec.in_features})")
    rec = rec.to("cpu")
    offset = 8 if rec.symmetric else 0
    q = rec.qweight.to(torch.int64) + offset  # unsigned [out, in]
    zero = (torch.full(tuple(rec.scale.shape), offset, dtype=torch.int64) if rec.zero is None
            else rec.zero.round().to(torch.int64))
    return {"qweight": pack_awq_order(q.T.contiguous()),
            "qzeros": pack_awq_order(zero.T.contiguous()),
            "scales": rec.scale.float().T.contiguous().half()}


def export(run: Any, model: Any, records: dict[str, QuantizedLinear], out_dir: Path) -> list[Path]:
    if not records:
        raise PluginError("awq format: the run produced no quantized linears")
    names = sorted(records)
    sizes = {records[n].group_size for n in names}
    if len(sizes) != 1:
        raise PluginError(f"awq format: one group size per checkpoint, got {sizes}")
    state = OrderedDict((k, v.detach().to("cpu")) for k, v in model.state_dict().items())
    for name in names:
        rec = records[name]
        state.pop(f"{name}.weight", None)
        for key, value in pack_record(rec).items():
            state[f"{name}.{key}"] = value
        if rec.bias is not None:
            state[f"{name}.bias"] = rec.bias.detach().to("cpu")
    skipped = sorted(n.rpartition(".")[2] for n, m in model.named_modules()
                     if n and n not in records and isinstance(getattr(m, "weight", None),
                                                              torch.Tensor)
                     and m.weight.dim() == 2 and not isinstance(m, torch.nn.Embedding))
    size = sizes.pop()
    qcfg = {"quant_method": "awq", "bits": 4,
            # AutoAWQ spells per channel -1; records hold None
            "group_size": -1 if size is None else size, "version": "gemm",
            "zero_point": True,
            # AutoAWQ matches these as name substrings: the head, MoE routers ("gate"), ...
            "modules_to_not_convert": sorted(set(skipped)) or None}
    save_hf_folder(model, getattr(run, "tokenizer", None), out_dir, state_dict=state,
                   quantization_config=qcfg)
    (out_dir / "quant_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
    return sorted(out_dir.iterdir())
