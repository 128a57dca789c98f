"""Load a compressed-tensors checkpoint dequantized, each linear by its own scheme.

transformers' ``CompressedTensorsConfig(dequantize=True)`` path (5.x) decodes every dense
linear with one config group's scheme (``get_dense_scheme``), so a checkpoint with several
``config_groups`` (layer-wise mixed precision) comes back wrong or not at all. Here each
linear's scheme is the group whose targets match it (compressed-tensors' own ``is_match``,
the matching vLLM does), its tensors are decoded by that scheme's compressor, and the dense
weights are loaded into the transformers model built from the checkpoint's config. Linears in
``ignore`` (and every other tensor) are read as stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from llmcq.errors import PluginError

__all__ = ["load_dequantized"]

#: tensor names a compressed linear stores besides (or instead of) ``weight``
_COMPRESSED = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape",
               "weight_g_idx", "input_scale", "input_zero_point")


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    if not state:
        raise PluginError(f"{folder}: no .safetensors files")
    return state


def load_dequantized(folder: str | Path, *, dtype: torch.dtype = torch.float32) -> Any:
    """The model in ``folder`` (written by ``save_vllm``/``save_sgl``) with every quantized
    linear dequantized by its own config group's scheme, in ``dtype``, in eval mode."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import is_match
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    config = AutoConfig.from_pretrained(str(folder))
    raw = getattr(config, "quantization_config", None)
    if raw is None:
        raise PluginError(f"{folder}: config.json has no quantization_config")
    qc = QuantizationConfig.model_validate(raw if isinstance(raw, dict) else raw.to_dict())
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = _state(folder)
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        schemes = [s for s in qc.config_groups.values()
                   if is_match(name, module, s.targets, qc.ignore or ())]
        if not schemes:
            continue
        if len(schemes) > 1:
            raise PluginError(f"{folder}: {name} matches {len(schemes)} config groups")
        scheme = schemes[0]
        local = {k[len(name) + 1:]: state.pop(k) for k in list(state)
                 if k.startswith(name + ".") and k[len(name) + 1:] in (*_COMPRESSED, "weight")}
        compressor = BaseCompressor.get_value_from_registry(scheme.format or qc.format)
        state[f"{name}.weight"] = compressor.decompress(local, scheme)["weight"].to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} \
        if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise PluginError(f"{folder}: tensors missing {sorted(set(missing) - tied)}, "
                          f"unexpected {sorted(unexpected)}")
    if tied:
        model.tie_weights()
    return model.to(dtype).eval()
