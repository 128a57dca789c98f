"""An independent reader of TensorRT-LLM checkpoints, written from the published TensorRT-LLM
and ModelOpt source (files and commits in test_trtllm_format.py), not from the exporter; and a
spy keeping the records a run hands to the exporter."""

from __future__ import annotations

from typing import Any

import llmcq
import torch


class RecordSpy:
    """Keeps the records the run hands to the trtllm exporter."""

    def __init__(self) -> None:
        self.records: dict[str, Any] = {}

    @llmcq.hookimpl
    def llmcq_export(self, backend: str, records: dict) -> list:
        if backend == "trtllm":
            self.records = {k: v.to("cpu") for k, v in records.items()}
        return []


# --------------------------------------------------------------------------- the reader
# Written from the published TensorRT-LLM / ModelOpt source, not from the exporter.

def unpack_int4_pairs(packed: torch.Tensor) -> torch.Tensor:
    """int8 ``[out/2, in]`` -> signed codes ``[out, in]``: low nibble = even row (ModelOpt's
    ``to_quantized_weight``: ``(t[..., 0] & 0x0F) | (t[..., 1] << 4)`` over output pairs)."""
    b = packed.to(torch.int16) & 0xFF
    lo, hi = b & 0xF, (b >> 4) & 0xF
    lo = torch.where(lo >= 8, lo - 16, lo)
    hi = torch.where(hi >= 8, hi - 16, hi)
    out = torch.empty(packed.shape[0] * 2, packed.shape[1], dtype=torch.int16)
    out[0::2], out[1::2] = lo, hi
    return out


def dequant(t: dict[str, torch.Tensor], prefix: str, algo: str, group: int) -> torch.Tensor:
    """``W [out, in]`` float32 of one TensorRT-LLM linear, by the formulas of its layers."""
    w = t[f"{prefix}.weight"]
    if algo == "W4A16_AWQ":
        q = unpack_int4_pairs(w).float()
        s = t[f"{prefix}.weights_scaling_factor"].float()  # [out, G]
        deq = q * s.repeat_interleave(group, dim=1)
        if f"{prefix}.zero" in t:  # [G, out], added after scaling
            deq = deq + t[f"{prefix}.zero"].float().T.repeat_interleave(group, dim=1)
        return deq
    if algo == "W8A16":  # [in, out] int8, dequantize(axis=1) then x @ W
        return (w.float() * t[f"{prefix}.per_channel_scale"].float()[None, :]).T
    if algo.startswith("W8A8_SQ"):  # [out, in] int8, per_channel_scale [1, out]
        return w.float() * t[f"{prefix}.per_channel_scale"].float().reshape(-1, 1)
    raise AssertionError(algo)


def to_hf_state(t: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Inverse of the name mapping (tp 1, pp 1): TensorRT-LLM names -> HF Llama/Qwen2 names."""
    algo = cfg["quantization"]["quant_algo"]
    group = cfg["quantization"]["group_size"]
    hd, h, kv = cfg["head_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    sd: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": t["transformer.vocab_embedding.weight"].float(),
        "model.norm.weight": t["transformer.ln_f.weight"].float(),
        "lm_head.weight": t["lm_head.weight"][: cfg["vocab_size"]].float()}
    for i in range(cfg["num_hidden_layers"]):
        p, hp = f"transformer.layers.{i}.", f"model.layers.{i}."
        qkv = dequant(t, p + "attention.qkv", algo, group)
        parts = torch.split(qkv, [h * hd, kv * hd, kv * hd])
        for name, w in zip(("q_proj", "k_proj", "v_proj"), parts, strict=True):
            sd[f"{hp}self_attn.{name}.weight"] = w
        if p + "attention.qkv.bias" in t:
            for name, b in zip(("q_proj", "k_proj", "v_proj"),
                               torch.split(t[p + "attention.qkv.bias"].float(),
                                           [h * hd, kv * hd, kv * hd]), strict=True):
                sd[f"{hp}self_attn.{name}.bias"] = b
        sd[hp + "self_attn.o_proj.weight"] = dequant(t, p + "attention.dense", algo, group)
        sd[hp + "mlp.gate_proj.weight"] = dequant(t, p + "mlp.fc", algo, group)
        sd[hp + "mlp.up_proj.weight"] = dequant(t, p + "mlp.gate", algo, group)
        sd[hp + "mlp.down_proj.weight"] = dequant(t, p + "mlp.proj", algo, group)
        sd[hp + "input_layernorm.weight"] = t[p + "input_layernorm.weight"].float()
        sd[hp + "post_attention_layernorm.weight"] = t[p + "post_layernorm.weight"].float()
    return sd


def per_token_int8(x: torch.Tensor) -> torch.Tensor:
    """TensorRT-LLM's dynamic per-token int8 (quantize_per_token): scale = max|x| / 127."""
    s = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127.0
    return (x / s).round().clamp(-128, 127) * s


def reader_model(template: Any, sd: dict[str, torch.Tensor], *, act_int8: bool = False) -> Any:
    """A fresh HF model of ``template``'s config holding ``sd``; with ``act_int8`` every
    decoder linear quantizes its input per token, as the SmoothQuant engine does."""
    import copy

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(copy.deepcopy(template.config)).float().eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in m or m == "lm_head.weight" for m in missing), missing
    if act_int8:
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and ".layers." in name:
                m.register_forward_pre_hook(lambda mod, args: (per_token_int8(args[0]),))
    return model
