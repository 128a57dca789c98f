"""Write and reload fake-quantized checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llmcq.model.hf_io import save_hf_folder
from llmcq.quant.fake import FakeQuantLinear, set_module
from llmcq.quant.record import QuantizedLinear
from llmcq.quant.spec import ActQuantSpec

__all__ = ["export", "load_fake_quant", "META_FILE"]

META_FILE = "llmcq_quant.json"


def _scalar(t: torch.Tensor | None) -> float | None:
    return None if t is None else float(t.reshape(-1)[0])


def export(run: Any, model: Any, records: dict[str, QuantizedLinear], out_dir: Path) -> list[Path]:
    """Save the (already fake-quantized) model plus the per-layer quantization settings."""
    save_hf_folder(model, run.tokenizer, out_dir)
    layers = {}
    for name, rec in records.items():
        layers[name] = {
            "weight": {"bits": rec.bits, "symmetric": rec.symmetric,
                       "granularity": str(rec.weight.granularity).split("(")[0],
                       "group_size": rec.group_size,
                       **({"fmt": rec.weight.fmt} if rec.is_float else {})},
            "act": rec.act.to_dict() if rec.act is not None else None,
            "act_scale": _scalar(rec.act_scale),
            "act_zero": _scalar(rec.act_zero),
        }
    meta = {"format": "llmcq-fake-quant", "version": 1, "layers": layers}
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
