"""Where things are in ``LlamaForCausalLM`` (transformers' modeling code, not copied)."""

from __future__ import annotations

from llmcq.model.adapter import ModelAdapter
from llmcq.model.layout import BlockLayout, LinearGroup, ModelLayout, NormSite

__all__ = ["LlamaAdapter", "LLAMA_LAYOUT"]

LLAMA_BLOCK = BlockLayout(groups=(
    LinearGroup(linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                prev_op="input_layernorm", prev_kind="norm", inspect="self_attn",
                inspect_kwargs=True, roles=("q", "k", "v")),
    LinearGroup(linears=("self_attn.o_proj",), prev_op="self_attn.v_proj", prev_kind="linear",
                inspect="self_attn.o_proj", roles=("o",)),
    LinearGroup(linears=("mlp.gate_proj", "mlp.up_proj"), prev_op="post_attention_layernorm",
                prev_kind="norm", inspect="mlp", roles=("gate", "up")),
    LinearGroup(linears=("mlp.down_proj",), prev_op="mlp.up_proj", prev_kind="linear",
                inspect="mlp.down_proj", roles=("down",)),
), norms=(NormSite("input_layernorm", "rms", "attn"),
          NormSite("post_attention_layernorm", "rms", "mlp")))

LLAMA_LAYOUT = ModelLayout(
    blocks="model.layers",
    embeddings=("model.embed_tokens",),
    rotary="model.rotary_emb",
    final_norm="model.norm",
    lm_head="lm_head",
    block=LLAMA_BLOCK,
    final_norm_kind="rms",
)


class LlamaAdapter(ModelAdapter):
    layout = LLAMA_LAYOUT
