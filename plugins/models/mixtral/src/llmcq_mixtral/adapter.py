"""Where things are in ``MixtralForCausalLM``.

Attention is the Llama block's. The sparse MoE block ``mlp`` holds a top-k router
(``mlp.gate``, not an ``nn.Linear``: kept float) and the experts, which transformers stores
as 3D tensors; :meth:`MixtralAdapter.prepare` splits them into one module per expert with
Mixtral's checkpoint names ``w1`` (gate), ``w3`` (up), ``w2`` (down), which transformers
merges back when an exported folder is loaded. Roles: ``q, k, v, o``, then
``expert_gate/up/down`` with the expert's index.
"""

from __future__ import annotations

from torch import nn

from llmcq.model.adapter import ModelAdapter
from llmcq.model.layout import (BlockLayout, ModelLayout, NormSite, attention_groups,
                                prenorm_block)
from llmcq.model.moe import sparse_moe_block, unfuse_experts

__all__ = ["MixtralAdapter", "MIXTRAL_LAYOUT", "EXPERT_NAMES"]

EXPERT_NAMES = ("w1", "w3", "w2")

ATTENTION = attention_groups(norm="input_layernorm", qkv=("self_attn.q_proj",
                             "self_attn.k_proj", "self_attn.v_proj"), out="self_attn.o_proj",
                             v="self_attn.v_proj")
NORMS = (NormSite("input_layernorm", "rms", "attn"),
         NormSite("post_attention_layernorm", "rms", "mlp"))

MIXTRAL_LAYOUT = ModelLayout(
    blocks="model.layers",
    embeddings=("model.embed_tokens",),
    rotary="model.rotary_emb",
    final_norm="model.norm",
    lm_head="lm_head",
    block=prenorm_block(),  # placeholder: block_layout builds the expert groups per block
    final_norm_kind="rms",
)


class MixtralAdapter(ModelAdapter):
    layout = MIXTRAL_LAYOUT

    def prepare(self, model: nn.Module) -> None:
        unfuse_experts(model, names=EXPERT_NAMES)

    def block_layout(self, model: nn.Module, index: int) -> BlockLayout:
        block = self.blocks(model)[index]
        return sparse_moe_block(block, attn_groups=ATTENTION, names=EXPERT_NAMES, norms=NORMS)
