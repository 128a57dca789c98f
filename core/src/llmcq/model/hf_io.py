"""Writing a model as a plain Hugging Face folder that ``from_pretrained`` loads.

Models loaded from GGUF carry a ``quantization_config`` describing the GGUF source; the
weights in memory are already dequantized floats, so that config is dropped before saving.

``load_pretrained`` sets ``config.use_cache = False`` for the calibration and evaluation
forwards; the saved ``config.json`` keeps the checkpoint's own value instead (read back from
``generation_config.use_cache``, which transformers fills from the checkpoint at load and
llmcq never changes), so an exported model generates with its KV cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["save_hf_folder"]


def save_hf_folder(model: Any, tokenizer: Any, out_dir: Path,
                   state_dict: dict[str, Any] | None = None,
                   quantization_config: dict[str, Any] | None = None) -> list[Path]:
    """``save_pretrained`` model (safetensors) and tokenizer into ``out_dir``;
    ``state_dict``: write these tensors instead of the model's (packed exports);
    ``quantization_config``: put this in ``config.json`` (what loaders of packed formats read)."""
    config = model.config
    saved_qc = getattr(config, "quantization_config", None)
    saved_quantizer = getattr(model, "hf_quantizer", None)
    had_attr = hasattr(config, "quantization_config")
    use_cache = _checkpoint_use_cache(model)
    saved_use_cache = getattr(config, "use_cache", None)
    try:
        if had_attr:
            delattr(config, "quantization_config")
        if saved_quantizer is not None:
            model.hf_quantizer = None
        if use_cache is not None:
            config.use_cache = use_cache
        model.save_pretrained(str(out_dir), state_dict=state_dict, safe_serialization=True)
    finally:
        if had_attr:
            config.quantization_config = saved_qc
        if saved_quantizer is not None:
            model.hf_quantizer = saved_quantizer
        if use_cache is not None:
            config.use_cache = saved_use_cache
    if quantization_config is not None:
        cfg_path = out_dir / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["quantization_config"] = quantization_config
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return sorted(p for p in out_dir.iterdir())


def _checkpoint_use_cache(model: Any) -> bool | None:
    """The ``use_cache`` the checkpoint was loaded with, or ``None`` when unknown (then the
    config's current value is saved)."""
    if not hasattr(model.config, "use_cache"):
        return None
    value = getattr(getattr(model, "generation_config", None), "use_cache", None)
    return value if isinstance(value, bool) else None
