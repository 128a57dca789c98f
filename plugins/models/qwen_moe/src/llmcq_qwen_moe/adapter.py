"""Where things are in ``Qwen2MoeForCausalLM`` and ``Qwen3MoeForCausalLM``.

Attention is the Llama block's (Qwen3: plus per-head q/k norms). A block's ``mlp`` is either
a dense gated MLP (``mlp_only_layers``, ``decoder_sparse_step``) or a sparse MoE block:
router ``mlp.gate`` (not an ``nn.Linear``: float), experts (split into one module per expert
by :meth:`prepare`), and for Qwen2-MoE a shared expert whose output is weighted by
``sigmoid(shared_expert_gate)``; that one-output gate is a router-like linear (role
``router``) and stays float. Roles: ``q, k, v, o``, ``gate, up, down`` (dense blocks),
``expert_gate/up/down`` with the expert's index, ``shared_gate/up/down``.
"""

from __future__ import annotations

from torch import nn

from llmcq.model.adapter import ModelAdapter
from llmcq.model.layout import (BlockLayout, ModelLayout, NormSite, attention_groups,
                                prenorm_block)
from llmcq.model.moe import ExpertList, sparse_moe_block, unfuse_experts

__all__ = ["QwenMoeAdapter", "QWEN_MOE_LAYOUT"]

ATTENTION = attention_groups(norm="input_layernorm", qkv=("self_attn.q_proj",
                             "self_attn.k_proj", "self_attn.v_proj"), out="self_attn.o_proj",
                             v="self_attn.v_proj")
PRE_NORMS = (NormSite("input_layernorm", "rms", "attn"),
             NormSite("post_attention_layernorm", "rms", "mlp"))
#: Qwen3-MoE's per-head RMSNorms on queries and keys
QK_NORMS = (NormSite("self_attn.q_norm", "rms", "qk"), NormSite("self_attn.k_norm", "rms", "qk"))

QWEN_MOE_LAYOUT = ModelLayout(
    blocks="model.layers",
    embeddings=("model.embed_tokens",),
    rotary="model.rotary_emb",
    final_norm="model.norm",
    lm_head="lm_head",
    block=prenorm_block(),  # dense blocks; sparse ones are built per block
    final_norm_kind="rms",
)
_DENSE_QK = prenorm_block(extra_norms=QK_NORMS)


class QwenMoeAdapter(ModelAdapter):
    layout = QWEN_MOE_LAYOUT

    def prepare(self, model: nn.Module) -> None:
        unfuse_experts(model)

    def block_layout(self, model: nn.Module, index: int) -> BlockLayout:
        block = self.blocks(model)[index]
        qk = hasattr(block.self_attn, "q_norm")
        if not isinstance(getattr(block.mlp, "experts", None), ExpertList):
            return _DENSE_QK if qk else self.layout.block
        has_shared = hasattr(block.mlp, "shared_expert")
        return sparse_moe_block(block, attn_groups=ATTENTION,
                                shared="shared_expert" if has_shared else None,
                                float_linears=("mlp.shared_expert_gate",) if has_shared else (),
                                norms=PRE_NORMS + (QK_NORMS if qk else ()))
