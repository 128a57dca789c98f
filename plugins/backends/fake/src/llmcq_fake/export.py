"""Write and reload fake-quantized checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llmcq.capabilities import RECORD_FEATURES
from llmcq.errors import PluginError
from llmcq.model.hf_io import save_hf_folder
from llmcq.quant.fake import FakeQuantLinear, set_module
from llmcq.quant.record import QuantizedLinear
from llmcq.quant.spec import ActQuantSpec

from llmcq_fake import SPEC

__all__ = ["export", "load_fake_quant", "META_FILE"]

META_FILE = "llmcq_quant.json"


def _scalar(t: torch.Tensor | None) -> float | None:
    return None if t is None else float(t.reshape(-1)[0])


def _layer_meta(rec: QuantizedLinear) -> dict[str, Any]:
    """One linear's entry of ``llmcq_quant.json``: its grid, its activation settings (what
    :func:`load_fake_quant` re-applies) and the record features its dequantized weight holds
    (recorded so the file says how the weights were made; the weights themselves need
    nothing at load time)."""
    meta: dict[str, Any] = {
        "weight": {"bits": rec.bits, "symmetric": rec.symmetric,
                   "granularity": str(rec.weight.granularity).split("(")[0],
                   "group_size": rec.group_size,  # null when not per group
                   **({"fmt": rec.weight.fmt} if rec.is_float else {})},
        "act": rec.act.to_dict() if rec.act is not None else None,
        "act_scale": _scalar(rec.act_scale),
        "act_zero": _scalar(rec.act_zero),
        "features": rec.features(),
    }
    if rec.g_idx is not None:
        meta["g_idx"] = True
    if rec.group_bits is not None:
        bits, counts = torch.unique(rec.group_bits.to("cpu", torch.int64), return_counts=True)
        meta["group_bits"] = {str(int(b)): int(c) for b, c in zip(bits, counts, strict=True)}
    if rec.float_columns is not None:
        meta["float_columns"] = sorted(int(i) for i in rec.float_columns[0].reshape(-1).tolist())
    if rec.outliers is not None:
        meta["sparse_outliers"] = int(rec.outliers.values.numel())
    if rec.mask is not None:
        kept = int(rec.mask.sum())
        meta["sparsity_mask"] = {
            "structure": None if rec.mask_structure is None else str(rec.mask_structure),
            "kept": kept, "total": int(rec.mask.numel())}
    if rec.scale_codes is not None:
        meta["quantized_scales"] = {"bits": rec.scale_codes.bits,
                                    "group_rows": rec.scale_codes.group_rows}
    return meta


def export(run: Any, model: Any, records: dict[str, QuantizedLinear], out_dir: Path) -> list[Path]:
    """Save the (already fake-quantized) model plus the per-layer quantization settings."""
    extra = {n: set(r.features()) - SPEC.accepts for n, r in records.items()}
    bad = {n: e for n, e in extra.items() if e}
    if bad:  # core's check_records refused these already; repeated for direct callers
        name, feats = next(iter(bad.items()))
        why = "; ".join(f"{f} ({RECORD_FEATURES[f]}): {SPEC.refusals.get(f, 'not written')}"
                        for f in sorted(feats))
        raise PluginError(f"fake: {name} holds what a plain checkpoint of dequantized "
                          f"weights cannot reproduce: {why}")
    save_hf_folder(model, run.tokenizer, out_dir)
    layers = {name: _layer_meta(rec) for name, rec in records.items()}
    meta = {"format": "llmcq-fake-quant", "version": 2, "layers": layers}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return sorted(out_dir.iterdir())


def load_fake_quant(path: str | Path, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained(path)`` plus the activation quantization."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    meta = json.loads((path / META_FILE).read_text())
    for name, layer in meta["layers"].items():
        if layer["act"] is None:
            continue
        linear = model.get_submodule(name)
        act = ActQuantSpec.from_dict(layer["act"])

        def t(v: float | None) -> torch.Tensor | None:
            return None if v is None else torch.tensor(v, dtype=torch.float32)

        fq = FakeQuantLinear(linear.weight.data, None if linear.bias is None else
                             linear.bias.data, act=act, act_scale=t(layer["act_scale"]),
                             act_zero=t(layer["act_zero"]), label=act.describe())
        set_module(model, name, fq)
    return model.eval()
