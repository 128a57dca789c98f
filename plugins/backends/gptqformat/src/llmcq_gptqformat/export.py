"""Pack llmcq's records into the GPTQ checkpoint layout AutoGPTQ defined and GPTQModel,
transformers and vLLM read.

Per linear (``W`` is ``[out, in]``, ``b`` bits, ``k = 32 / b`` codes per int32 word):

* ``qweight`` int32 ``[in * b / 32, out]``: every 32 input rows of ``W^T`` form one bit stream
  of ``b`` words, row ``r`` at stream bit ``b * (r % 32)`` (2/4/8 bits: ``32 / b`` whole codes
  per word; 3 bits: AutoGPTQ's layout with two codes split across words); codes unsigned,
  symmetric codes shifted by ``2^(b-1)``;
* ``qzeros`` int32 ``[G, out * b / 32]``: zero points packed the same way along the output axis.
  Checkpoint format ``gptq`` (v1) stores ``zero - 1`` (the historic AutoGPTQ convention; readers
  add the one back); a model with an asymmetric zero point of 0, which v1 cannot hold (it would
  be stored as -1), is written as ``gptq_v2`` (zeros as they are, read by GPTQModel);
* ``scales`` fp16 ``[G, out]``; ``g_idx`` int32 ``[in]``, the group of every input column
  (GPTQ act-order: ``desc_act: true``); ``bias`` as in the model.

``W[o, c] = scales[g_idx[c], o] * (q[c, o] - zero[g_idx[c], o])``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from llmcq.capabilities import describe_features
from llmcq.errors import PluginError
from llmcq.model.hf_io import save_hf_folder
from llmcq.quant.record import QuantizedLinear
from llmcq.quant.spec import PerGroup

from llmcq_gptqformat import SPEC

__all__ = ["export", "pack_record", "pack_along_rows", "GPTQTensors"]

GPTQTensors = dict[str, torch.Tensor]


def pack_along_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes ``[rows, cols]`` into int32 ``[rows * bits / 32, cols]``: each block
    of 32 rows is one little-endian bit stream of ``bits`` words, code ``k`` at stream bit
    ``bits * k``. For 2/4/8 bits that is ``32 / bits`` whole codes per word; for 3 bits it is
    AutoGPTQ's layout where codes 10 and 21 of a block straddle two words."""
    rows, cols = codes.shape
    if rows % 32:
        raise PluginError(f"gptq format: {rows} rows are not a multiple of 32")
    c = codes.astype(np.uint64).reshape(rows // 32, 32, cols)
    words = np.zeros((rows // 32, bits, cols), dtype=np.uint64)
    for k in range(32):
        offset = bits * k
        w, shift = divmod(offset, 32)
        words[:, w] |= (c[:, k] << np.uint64(shift)) & np.uint64(0xFFFFFFFF)
        if shift + bits > 32:  # the code's high bits continue in the next word
            words[:, w + 1] |= c[:, k] >> np.uint64(32 - shift)
    return words.reshape(rows // 32 * bits, cols).astype(np.uint32).view(np.int32)


def pack_record(rec: QuantizedLinear, *, v1: bool = True) -> tuple[GPTQTensors, bool]:
    """GPTQ tensors of one record and whether its asymmetric zeros include 0."""
    bits = rec.bits
    extra = set(rec.features()) - SPEC.accepts  # core's check_records refused these already
    if extra:
        raise PluginError(f"gptq format: {describe_features(extra)} cannot be held "
                          f"({rec.describe()})")
    out, n_in = rec.out_features, rec.in_features
    offset = 2 ** (bits - 1) if rec.symmetric else 0
    q = (rec.qweight.to("cpu", torch.int32) + offset).numpy()  # unsigned [out, in]
    n_groups = int(rec.scale.shape[1])
    if rec.zero is None:
        zero = np.full((out, n_groups), offset, dtype=np.int64)
    else:
        zero = rec.zero.to("cpu").round().to(torch.int64).numpy()
    has_zero_zero = bool((zero == 0).any())
    if v1 and has_zero_zero:
        raise PluginError("gptq format v1 cannot hold a zero point of 0 (stored as zero - 1)")
    qweight = pack_along_rows(q.T, bits)
    stored = zero - 1 if v1 else zero  # v1: the historic "zero - 1"
    packed_z = pack_along_rows(stored, bits)  # [out, G] packed along out -> [out*b/32, G]
    qzeros = packed_z.view(np.uint32).T.copy()  # [G, out * b / 32]
    g_idx = rec.column_groups().to("cpu", torch.int32)
    if not isinstance(rec.weight.granularity, PerGroup):
        g_idx = torch.zeros(n_in, dtype=torch.int32)
    tensors: GPTQTensors = {
        "qweight": torch.from_numpy(qweight.copy()),
        "qzeros": torch.from_numpy(qzeros.view(np.int32).copy()),
        "scales": rec.scale.to("cpu").float().T.contiguous().half(),
        "g_idx": g_idx.contiguous(),
    }
    return tensors, has_zero_zero


def quantize_config(recs: list[QuantizedLinear], *, desc_act: bool, v1: bool) -> dict[str, Any]:
    """``quantize_config.json``: what GPTQ readers need to unpack the tensors. Per channel is
    spelled ``group_size: -1`` here (the format's convention; records hold ``None``).
    ``damp_percent`` is a solver setting, not a property of the tensors: it is not written
    (readers do not use it to load), so no exporter reads another plugin's settings."""
    first = recs[0]
    group_size = first.group_size if first.group_size is not None else -1
    return {"quant_method": "gptq", "bits": first.bits, "group_size": group_size,
            "desc_act": desc_act, "sym": first.symmetric, "static_groups": False,
            "true_sequential": True, "lm_head": False,
            "checkpoint_format": "gptq" if v1 else "gptq_v2", "pack_dtype": "int32",
            "meta": {"quantizer": ["llmcq:0.1"]}}


def export(run: Any, model: Any, records: dict[str, QuantizedLinear], out_dir: Path) -> list[Path]:
    if not records:
        raise PluginError("gptq format: the run produced no quantized linears")
    recs = [records[n].to("cpu") for n in sorted(records)]
    kinds = {(r.bits, r.symmetric, r.group_size) for r in recs}
    if len(kinds) != 1:
        raise PluginError(f"gptq format: one bits/sym/group_size per checkpoint, got {kinds}")
    v1 = not any(r.zero is not None and bool((r.zero.round() == 0).any()) for r in recs)
    state = OrderedDict((k, v.detach().to("cpu")) for k, v in model.state_dict().items())
    desc_act = False
    for name, rec in zip(sorted(records), recs, strict=True):
        tensors, _ = pack_record(rec, v1=v1)
        desc_act |= rec.g_idx is not None
        state.pop(f"{name}.weight", None)
        for key, value in tensors.items():
            state[f"{name}.{key}"] = value
        if rec.bias is not None:
            state[f"{name}.bias"] = rec.bias.detach().to("cpu")
    qcfg = quantize_config(recs, desc_act=desc_act, v1=v1)
    save_hf_folder(model, getattr(run, "tokenizer", None), out_dir, state_dict=state,
                   quantization_config=qcfg)
    (out_dir / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
    return sorted(out_dir.iterdir())
