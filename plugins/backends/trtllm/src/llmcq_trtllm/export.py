"""Write llmcq's quantized-linear records as a TensorRT-LLM checkpoint.

Names (Llama layout, shared by Mistral and Qwen2; tensorrt_llm/models/llama/convert.py and
tensorrt_llm/models/qwen/utils.py): ``transformer.vocab_embedding``, per layer
``attention.qkv`` (q, k, v rows fused), ``attention.dense`` (o_proj), ``mlp.fc`` (gate_proj,
the activated branch), ``mlp.gate`` (up_proj), ``mlp.proj`` (down_proj), ``input_layernorm``,
``post_layernorm``; ``transformer.ln_f``, ``lm_head``. Layer indices are local to a pipeline
stage.

Quantized linears (``q`` signed codes, ``s`` scales, ``z`` zero points, ``g`` group size):

* ``W4A16_AWQ``: ``weight`` int8 ``[out/2, in]``, two int4 codes per byte along the output
  axis (row ``2j`` in the low nibble, ``2j+1`` in the high one; the packed layout of ModelOpt's
  export, which trtllm-build transposes and interleaves for the GPU it builds on);
  ``weights_scaling_factor`` ``[out, in/g]``; with zero points, ``zero`` ``[in/g, out]`` holding
  ``(8 - z) * s`` so that ``W = q_signed * s + zero`` (the kernel's scale-and-zero form).
* ``W8A16``: ``weight`` int8 ``[in, out]``, ``per_channel_scale`` ``[out]``; config
  ``disable_weight_only_quant_plugin: true`` so trtllm-build dequantizes these codes as they are
  (with the plugin it would expect codes already interleaved for one GPU architecture).
* ``W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN``: ``weight`` int8 ``[out, in]``, ``per_channel_scale``
  float32 ``[1, out]``; ``smoother`` float32 ones ``[1, in]`` on dense and proj (llmcq folds
  SmoothQuant's scales into the weights and the previous op); ``scale_to_int`` float32 ``[1]``
  ones on both norms (per-token dynamic activations).

Tensor parallelism follows TensorRT-LLM's converter: q/k/v split by heads (key/value heads
repeated when there are fewer than ranks), dense and proj split by input columns, fc and gate
by output rows; norms and the embedding replicated; ``lm_head`` split by vocabulary rows,
padded to a multiple of tp. Rank ``r`` = ``pp_rank * tp_size + tp_rank``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from llmcq.capabilities import describe_features
from llmcq.errors import PluginError
from llmcq.quant.record import QuantizedLinear
from llmcq.quant.spec import PerChannel, PerGroup
from safetensors.torch import save_file

from llmcq_trtllm import (FAMILIES, SPEC, W4A16_AWQ, W8A8_SQ, W8A16, TRTLLMOptions,
                          quant_algo_for)

__all__ = ["export", "pack_int4_pairs", "Lin", "to_lin", "linear_tensors", "build_ranks",
           "trtllm_config", "HF_TO_TRT"]

#: HF module suffix -> TensorRT-LLM module inside a layer (q/k/v fuse into attention.qkv)
HF_TO_TRT = {"self_attn.o_proj": "attention.dense", "mlp.gate_proj": "mlp.fc",
             "mlp.up_proj": "mlp.gate", "mlp.down_proj": "mlp.proj"}
_ROW_PARALLEL = ("attention.dense", "mlp.proj")


def pack_int4_pairs(codes: torch.Tensor) -> torch.Tensor:
    """Signed int4 codes ``[out, in]`` (-8..7) -> int8 ``[out/2, in]``: byte ``(j, i)`` holds
    ``codes[2j, i]`` in bits 0-3 and ``codes[2j+1, i]`` in bits 4-7 (two's complement)."""
    out, n_in = codes.shape
    if out % 2:
        raise PluginError(f"trtllm: {out} output rows cannot be packed two per byte")
    c = codes.to(torch.int16)
    if bool((c < -8).any() or (c > 7).any()):
        raise PluginError("trtllm: int4 codes outside -8..7")
    pairs = (c & 0xF).reshape(out // 2, 2, n_in)
    byte = pairs[:, 0] | (pairs[:, 1] << 4)  # 0..255
    return torch.where(byte >= 128, byte - 256, byte).to(torch.int8)


@dataclass
class Lin:
    """A quantized linear in TensorRT-LLM's algebra: ``W = q * s (+ zero)`` with signed codes
    ``q [out, in]``, scales ``s [out, G]`` (G = 1 per channel) and an additive zero term
    ``zero [out, G]`` (or None)."""

    q: torch.Tensor
    s: torch.Tensor
    zero: torch.Tensor | None
    bias: torch.Tensor | None
    group: int  # input columns per scale (in_features when per channel)

    def rows(self, a: int, b: int) -> Lin:
        return Lin(self.q[a:b], self.s[a:b], None if self.zero is None else self.zero[a:b],
                   None if self.bias is None else self.bias[a:b], self.group)

    def cols(self, a: int, b: int) -> Lin:
        if self.s.shape[1] == 1:  # per channel: the scale covers every column
            return Lin(self.q[:, a:b], self.s, self.zero, self.bias, b - a)
        if a % self.group or b % self.group:
            raise PluginError(f"trtllm: column split {a}:{b} cuts a group of {self.group}")
        ga, gb = a // self.group, b // self.group
        return Lin(self.q[:, a:b], self.s[:, ga:gb],
                   None if self.zero is None else self.zero[:, ga:gb], self.bias, self.group)

    @staticmethod
    def cat_rows(parts: list[Lin]) -> Lin:
        zeros = [p.zero for p in parts]
        biases = [p.bias for p in parts]
        if any(z is not None for z in zeros):
            zeros = [torch.zeros_like(p.s) if p.zero is None else p.zero for p in parts]
        if any(b is not None for b in biases):
            biases = [torch.zeros(p.q.shape[0]) if p.bias is None else p.bias for p in parts]
        return Lin(torch.cat([p.q for p in parts]), torch.cat([p.s for p in parts]),
                   None if zeros[0] is None else torch.cat(zeros),  # type: ignore[arg-type]
                   None if biases[0] is None else torch.cat(biases),  # type: ignore[arg-type]
                   parts[0].group)


def to_lin(rec: QuantizedLinear, algo: str) -> Lin:
    """One record in the signed-code form TensorRT-LLM's kernels read."""
    extra = set(rec.features()) - SPEC.accepts  # core's check_records refused these already
    if extra:
        raise PluginError(f"trtllm cannot hold {describe_features(extra)} ({rec.describe()})")
    rec = rec.to("cpu")
    bits = 4 if algo == W4A16_AWQ else 8
    if rec.bits != bits:
        raise PluginError(f"trtllm {algo}: {bits}-bit records only, got {rec.describe()}")
    gran = rec.weight.granularity
    scale = rec.scale.float()
    if algo == W4A16_AWQ:
        if not isinstance(gran, PerGroup) or rec.in_features % gran.size:
            raise PluginError(f"trtllm {algo}: whole groups only ({rec.describe()}, in "
                              f"{rec.in_features})")
        group = gran.size
    else:
        if not isinstance(gran, PerChannel) or not rec.symmetric:
            raise PluginError(f"trtllm {algo}: symmetric per-channel records only "
                              f"({rec.describe()})")
        group = rec.in_features
    if rec.symmetric:
        return Lin(rec.qweight.to(torch.int16), scale, None,
                   None if rec.bias is None else rec.bias.float(), group)
    # unsigned codes u in 0..15 with zero point z: (u - z) s = (u - 8) s + (8 - z) s
    assert rec.zero is not None
    offset = 2 ** (bits - 1)
    return Lin(rec.qweight.to(torch.int16) - offset, scale, (offset - rec.zero.float()) * scale,
               None if rec.bias is None else rec.bias.float(), group)


def linear_tensors(lin: Lin, algo: str, dtype: torch.dtype, *, row_parallel: bool,
                   has_zero: bool, with_bias: bool) -> dict[str, torch.Tensor]:
    """The tensors of one TensorRT-LLM linear (names relative to the module)."""
    t: dict[str, torch.Tensor] = {}
    out, n_in = lin.q.shape
    if algo == W4A16_AWQ:
        t["weight"] = pack_int4_pairs(lin.q)
        t["weights_scaling_factor"] = lin.s.to(dtype).contiguous()
        if has_zero:
            zero = torch.zeros_like(lin.s) if lin.zero is None else lin.zero
            t["zero"] = zero.T.to(dtype).contiguous()
    elif algo == W8A16:
        t["weight"] = lin.q.T.to(torch.int8).contiguous()
        t["per_channel_scale"] = lin.s[:, 0].to(dtype).contiguous()
    elif algo == W8A8_SQ:
        t["weight"] = lin.q.to(torch.int8).contiguous()
        t["per_channel_scale"] = lin.s[:, 0].float().reshape(1, out).contiguous()
        if row_parallel:
            t["smoother"] = torch.ones(1, n_in, dtype=torch.float32)
    else:  # pragma: no cover - quant_algo_for refuses the rest
        raise PluginError(f"trtllm: {algo} is not written")
    if with_bias:
        bias = torch.zeros(out) if lin.bias is None else lin.bias
        t["bias"] = bias.to(dtype).contiguous()
    return t


def _split(n: int, tp: int, r: int) -> tuple[int, int]:
    return n * r // tp, n * (r + 1) // tp


def _kv_rows(kv_heads: int, head_dim: int, tp: int, r: int) -> tuple[int, int]:
    if kv_heads >= tp:
        a, b = _split(kv_heads, tp, r)
    else:  # fewer key/value heads than ranks: each rank gets a copy of one head
        a = r * kv_heads // tp
        b = a + 1
    return a * head_dim, b * head_dim


def _state_get(state: dict[str, torch.Tensor], *names: str) -> torch.Tensor:
    for n in names:
        if n in state:
            return state[n]
    raise PluginError(f"trtllm: the model has none of {names}")


def _rope(cfg: Any) -> tuple[float, dict[str, Any] | None]:
    params = getattr(cfg, "rope_parameters", None) or {}
    theta = getattr(cfg, "rope_theta", None) or params.get("rope_theta") or 10000.0
    scaling = getattr(cfg, "rope_scaling", None)
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if isinstance(scaling, dict):
        scaling = dict(scaling)
        if "type" not in scaling and "rope_type" in scaling:
            scaling["type"] = scaling["rope_type"]
        if scaling.get("type") == "default":
            scaling = None
    return float(theta), scaling


def trtllm_config(hf_cfg: Any, family: str, algo: str, opts: TRTLLMOptions, dtype: str, *,
                  group_size: int | None, has_zero: bool, attn_bias: bool, mlp_bias: bool,
                  vocab: int) -> dict[str, Any]:
    """``config.json`` as TensorRT-LLM's ``PretrainedConfig.from_dict`` (LLaMAConfig /
    QWenConfig) reads it. ``group_size``: the records' (``None`` per channel); TensorRT-LLM
    reads it for W4A16_AWQ only and its QuantConfig default 128 is written otherwise."""
    heads = int(hf_cfg.num_attention_heads)
    hidden = int(hf_cfg.hidden_size)
    theta, scaling = _rope(hf_cfg)
    quantization: dict[str, Any] = {
        "quant_algo": algo, "kv_cache_quant_algo": None,
        "group_size": group_size if algo == W4A16_AWQ else 128,
        "has_zero_point": bool(has_zero), "pre_quant_scale": False,
        "exclude_modules": ["lm_head"]}
    cfg: dict[str, Any] = {
        "architecture": FAMILIES[family], "dtype": dtype, "logits_dtype": "float32",
        "vocab_size": vocab, "max_position_embeddings": int(hf_cfg.max_position_embeddings),
        "hidden_size": hidden, "num_hidden_layers": int(hf_cfg.num_hidden_layers),
        "num_attention_heads": heads,
        "num_key_value_heads": int(getattr(hf_cfg, "num_key_value_heads", None) or heads),
        "head_size": int(getattr(hf_cfg, "head_dim", None) or hidden // heads),
        "hidden_act": str(getattr(hf_cfg, "hidden_act", "silu")),
        "intermediate_size": int(hf_cfg.intermediate_size),
        "norm_epsilon": float(f"{float(hf_cfg.rms_norm_eps):.7g}"),  # float32 noise off
        "position_embedding_type": "rope_gpt_neox", "rotary_base": theta,
        "rotary_scaling": scaling,
        "mapping": {"world_size": opts.world_size, "tp_size": opts.tp_size,
                    "pp_size": opts.pp_size},
        "quantization": quantization, "use_parallel_embedding": False,
        "embedding_sharding_dim": 0, "tie_word_embeddings": bool(
            getattr(hf_cfg, "tie_word_embeddings", False)),
        "attn_bias": attn_bias, "mlp_bias": mlp_bias,
        "disable_weight_only_quant_plugin": algo == W8A16,
    }
    if family == "qwen2":
        cfg.update({"qwen_type": "qwen2", "seq_length": int(hf_cfg.max_position_embeddings),
                    "use_logn_attn": False, "moe_intermediate_size": 0,
                    "moe_shared_expert_intermediate_size": 0})
    return cfg


def _family(run: Any, model: Any) -> str:
    model_type = str(getattr(model.config, "model_type", "")).lower()
    if model_type in FAMILIES:
        return model_type
    raise PluginError(f"trtllm: model family {model_type!r} has no Llama-layout TensorRT-LLM "
                      f"architecture here (supported: {', '.join(FAMILIES)})")


def _dtype(opts: TRTLLMOptions, model: Any) -> str:
    if opts.dtype != "auto":
        return opts.dtype
    p = next(model.parameters())
    return "bfloat16" if p.dtype == torch.bfloat16 else "float16"


def build_ranks(model: Any, records: dict[str, QuantizedLinear], algo: str,
                opts: TRTLLMOptions, dtype: torch.dtype, family: str,
                ) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """Per-rank tensors and the facts config.json needs."""
    cfg = model.config
    n_layers = int(cfg.num_hidden_layers)
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    hd = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    vocab = int(cfg.vocab_size)
    tp, pp = opts.tp_size, opts.pp_size
    if n_layers % pp or heads % tp or (kv % tp and tp % kv):
        raise PluginError(f"trtllm: cannot map {n_layers} layers / {heads} heads / {kv} kv "
                          f"heads onto tp {tp} x pp {pp}")
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    _check_nothing_dropped(state)
    lins = {name: to_lin(rec, algo) for name, rec in records.items()}
    has_zero = any(lin.zero is not None for lin in lins.values())

    def layer_lin(i: int, suffix: str) -> Lin:
        name = f"model.layers.{i}.{suffix}"
        if name not in lins:
            raise PluginError(f"trtllm: no quantized record for {name} (every linear of a "
                              "layer must be quantized)")
        return lins[name]

    attn_names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    qkv_bias = any(layer_lin(i, s).bias is not None for i in range(n_layers) for s in attn_names)
    dense_bias = any(layer_lin(i, "self_attn.o_proj").bias is not None for i in range(n_layers))
    mlp_bias = any(layer_lin(i, s).bias is not None for i in range(n_layers)
                   for s in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    if family == "qwen2":
        if dense_bias:
            raise PluginError("trtllm: TensorRT-LLM's Qwen2 attention has no dense bias")
        attn_bias = True  # QWenConfig: qkv always has a bias
    else:
        attn_bias = qkv_bias or dense_bias
    per_stage = n_layers // pp
    ranks: list[dict[str, torch.Tensor]] = []
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            t: dict[str, torch.Tensor] = {}
            for i in range(pp_rank * per_stage, (pp_rank + 1) * per_stage):
                pre = f"transformer.layers.{i - pp_rank * per_stage}."
                q, k, v = (layer_lin(i, s) for s in attn_names)
                qa, qb = _split(heads, tp, tp_rank)
                ka, kb = _kv_rows(kv, hd, tp, tp_rank)
                qkv = Lin.cat_rows([q.rows(qa * hd, qb * hd), k.rows(ka, kb), v.rows(ka, kb)])
                mods = {"attention.qkv": (qkv, attn_bias, False)}
                o = layer_lin(i, "self_attn.o_proj")
                mods["attention.dense"] = (o.cols(qa * hd, qb * hd),
                                           attn_bias and family != "qwen2", True)
                for suffix, trt in (("mlp.gate_proj", "mlp.fc"), ("mlp.up_proj", "mlp.gate")):
                    lin = layer_lin(i, suffix)
                    a, b = _split(lin.q.shape[0], tp, tp_rank)
                    mods[trt] = (lin.rows(a, b), mlp_bias, False)
                down = layer_lin(i, "mlp.down_proj")
                a, b = _split(down.q.shape[1], tp, tp_rank)
                mods["mlp.proj"] = (down.cols(a, b), mlp_bias, True)
                for trt, (lin, bias, row) in mods.items():
                    # row-parallel biases: every rank holds the whole bias (TensorRT-LLM adds
                    # it once, after the all-reduce; for W4A16_AWQ trtllm-build zeroes it on
                    # ranks > 0 itself)
                    for key, value in linear_tensors(lin, algo, dtype, row_parallel=row,
                                                     has_zero=has_zero,
                                                     with_bias=bias).items():
                        t[f"{pre}{trt}.{key}"] = value
                t[f"{pre}input_layernorm.weight"] = _state_get(
                    state, f"model.layers.{i}.input_layernorm.weight").to(dtype)
                t[f"{pre}post_layernorm.weight"] = _state_get(
                    state, f"model.layers.{i}.post_attention_layernorm.weight").to(dtype)
                if algo == W8A8_SQ:
                    one = torch.ones(1, dtype=torch.float32)
                    t[f"{pre}input_layernorm.scale_to_int"] = one.clone()
                    t[f"{pre}post_layernorm.scale_to_int"] = one.clone()
            embed = _state_get(state, "model.embed_tokens.weight")
            if pp_rank == 0:
                t["transformer.vocab_embedding.weight"] = embed.to(dtype).clone()
            if pp_rank == pp - 1:
                t["transformer.ln_f.weight"] = _state_get(state, "model.norm.weight").to(dtype)
                head = state.get("lm_head.weight", embed)
                padded = -(-vocab // tp) * tp
                if padded != head.shape[0]:
                    head = torch.nn.functional.pad(head, (0, 0, 0, padded - head.shape[0]))
                a, b = _split(padded, tp, tp_rank)
                t["lm_head.weight"] = head[a:b].to(dtype).clone()
            ranks.append({k: v.contiguous() for k, v in t.items()})
    facts = {"has_zero": has_zero, "attn_bias": attn_bias, "mlp_bias": mlp_bias,
             "vocab": vocab}
    return ranks, facts


_LAYER_KEYS = {f"{m}.{p}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                    "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                    "mlp.down_proj") for p in ("weight", "bias")} | {
    "input_layernorm.weight", "post_attention_layernorm.weight"}


def _check_nothing_dropped(state: dict[str, torch.Tensor]) -> None:
    """Refuse models holding tensors the Llama layout has no place for (a norm bias from a
    transform, an extra module): exporting without them would change the function."""
    extra = []
    for key in state:
        if key.startswith("model.layers."):
            rest = key.split(".", 3)[3]
            if rest not in _LAYER_KEYS and not rest.endswith("inv_freq"):
                extra.append(key)
        elif key.startswith("model.norm.") and key != "model.norm.weight":
            extra.append(key)
    if extra:
        raise PluginError("trtllm: the model holds tensors TensorRT-LLM's Llama layout has no "
                          f"place for: {', '.join(extra[:6])}{' ...' if len(extra) > 6 else ''}")


def _group_size(records: dict[str, QuantizedLinear]) -> int | None:
    """The checkpoint's one group size (``None``: per channel)."""
    sizes = {r.group_size for r in records.values()}
    if len(sizes) != 1:
        raise PluginError(f"trtllm: one group size per checkpoint, got {sorted(sizes, key=str)}")
    return sizes.pop()


def export(run: Any, model: Any, records: dict[str, QuantizedLinear], out_dir: Path) -> list[Path]:
    if not records:
        raise PluginError("trtllm: the run produced no quantized linears")
    config = run.resolved.config
    opts = TRTLLMOptions.parse(dict(config.save.trtllm_cfg))
    algo = quant_algo_for(run.resolved.specs)
    family = _family(run, model)
    dtype_name = _dtype(opts, model)
    dtype = getattr(torch, dtype_name)
    ranks, facts = build_ranks(model, records, algo, opts, dtype, family)
    cfg = trtllm_config(model.config, family, algo, opts, dtype_name,
                        group_size=_group_size(records), has_zero=facts["has_zero"],
                        attn_bias=facts["attn_bias"], mlp_bias=facts["mlp_bias"],
                        vocab=facts["vocab"])
    out_dir = Path(out_dir)
    for r, tensors in enumerate(ranks):
        save_file(tensors, str(out_dir / f"rank{r}.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=4) + "\n")
    tokenizer = getattr(run, "tokenizer", None)
    if tokenizer is not None:  # trtllm-build ignores it; runners need it (--tokenizer_dir)
        tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    provenance = {"producer": "llmcq-trtllm 0.1.0", "quant_algo": algo,
                  "records": {n: r.describe() for n, r in sorted(records.items())},
                  "hf_to_trtllm": {"self_attn.q_proj/k_proj/v_proj": "attention.qkv",
                                   **HF_TO_TRT, "input_layernorm": "input_layernorm",
                                   "post_attention_layernorm": "post_layernorm"}}
    (out_dir / "llmcq_export.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return sorted(out_dir.iterdir())
