"""Write a mixpack folder from the quantized-linear records.

Core calls :func:`export` with a fresh temporary ``out_dir`` that it renames into place only
when everything succeeded, so a folder under ``save_path`` is always complete.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

from llmcq.errors import PluginError
from llmcq.model.hf_io import save_hf_folder
from llmcq.quant.compression import record_bits
from llmcq.quant.record import QuantizedLinear

from llmcq_mixpack.format import CODE_LAYOUT, FORMAT_VERSION, QUANT_METHOD
from llmcq_mixpack.layout import pack_record

__all__ = ["export", "file_digest"]


def file_digest(path: Path) -> dict[str, Any]:
    """Size and sha256 of one weight file, as ``quantization_config.weight_files`` holds
    them (the loader refuses a file that differs: truncated or damaged)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def export(run: Any, model: Any, records: dict[str, QuantizedLinear], out_dir: Path) -> list[Path]:
    """The model's float tensors plus, per record, its packed tensors (no dense weight)."""
    if not records:
        raise PluginError("mixpack: the run produced no quantized linears")
    state = OrderedDict((k, v.detach().to("cpu")) for k, v in model.state_dict().items())
    modules: dict[str, Any] = {}
    grid_weights = code_bits = 0.0
    for name in sorted(records):
        try:
            packed = pack_record(records[name])
        except ValueError as exc:
            raise PluginError(f"mixpack: {name} ({records[name].describe()}) cannot be "
                              f"packed: {exc}") from None
        if state.pop(f"{name}.weight", None) is None:
            raise PluginError(f"mixpack: the model has no {name}.weight for this record")
        state.update(packed.tensors(name))
        modules[name] = packed.entry(bias=f"{name}.bias" in state)
        counted = record_bits(records[name])  # results.json's convention: float columns out
        grid_weights += counted["grid_weights"]
        code_bits += counted["code_bits"]
    qcfg: dict[str, Any] = {
        "quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
        "code_layout": CODE_LAYOUT, "bits_mean": code_bits / grid_weights,
        "modules": modules}
    save_hf_folder(model, getattr(run, "tokenizer", None), out_dir, state_dict=state,
                   quantization_config=qcfg)
    weight_files = sorted(out_dir.glob("*.safetensors"))
    if not weight_files:
        raise PluginError(f"mixpack: save_pretrained wrote no safetensors file in {out_dir}")
    qcfg["weight_files"] = {p.name: file_digest(p) for p in weight_files}
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = qcfg
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return sorted(out_dir.iterdir())

