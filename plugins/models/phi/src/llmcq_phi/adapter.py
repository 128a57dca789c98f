"""Where things are in ``PhiForCausalLM`` and ``Phi3ForCausalLM``.

Phi-1.5/2: one ``input_layernorm`` feeds attention and MLP in parallel, so q,k,v and fc1
form one group whose error is the sum of both branches; ``v_proj -> dense``; fc2 reads
GELU outputs (no producer). The head has a bias and follows ``final_layernorm``.

Phi-3: ``input_layernorm -> qkv_proj`` and ``post_attention_layernorm -> gate_up_proj``.
``o_proj`` reads values from the fused ``qkv_proj`` and ``down_proj`` reads
``act(gate) * up`` from the fused ``gate_up_proj``: the shared folding code scales a
producer's outputs as a whole, so these two have no producer (they are still quantized).
Roles: ``qkv`` and ``gate_up`` (fused), ``o``, ``down``.
"""

from __future__ import annotations

from torch import nn

from llmcq.model.adapter import ModelAdapter
from llmcq.model.layout import (BlockLayout, LinearGroup, ModelLayout, NormSite,
                                llama_like_layout)

__all__ = ["PhiAdapter", "Phi3Adapter", "PHI_LAYOUT", "PHI3_LAYOUT"]

PHI_BLOCK = BlockLayout(groups=(
    LinearGroup(linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                         "mlp.fc1"),
                prev_op="input_layernorm", inspect=("self_attn", "mlp"),
                inspect_kwargs=(True, False), roles=("q", "k", "v", "up")),
    LinearGroup(linears=("self_attn.dense",), prev_op="self_attn.v_proj",
                prev_kind="linear", inspect="self_attn.dense", roles=("o",)),
    LinearGroup(linears=("mlp.fc2",), prev_op=None, inspect="mlp.fc2", roles=("down",)),
), norms=(NormSite("input_layernorm", "layer", "attn_mlp"),))

#: with ``qk_layernorm``: LayerNorms over each head of the queries and keys
PHI_QK_BLOCK = BlockLayout(groups=PHI_BLOCK.groups, norms=PHI_BLOCK.norms + (
    NormSite("self_attn.q_layernorm", "layer", "qk"),
    NormSite("self_attn.k_layernorm", "layer", "qk")))

PHI_LAYOUT = ModelLayout(
    blocks="model.layers",
    embeddings=("model.embed_tokens",),
    rotary="model.rotary_emb",
    final_norm="model.final_layernorm",
    lm_head="lm_head",
    block=PHI_BLOCK,
    final_norm_kind="layer",
)

PHI3_LAYOUT = llama_like_layout(BlockLayout(groups=(
    LinearGroup(linears=("self_attn.qkv_proj",), prev_op="input_layernorm",
                inspect="self_attn", inspect_kwargs=True, roles=("qkv",)),
    LinearGroup(linears=("self_attn.o_proj",), prev_op=None, inspect="self_attn.o_proj",
                roles=("o",)),
    LinearGroup(linears=("mlp.gate_up_proj",), prev_op="post_attention_layernorm",
                inspect="mlp", roles=("gate_up",)),
    LinearGroup(linears=("mlp.down_proj",), prev_op=None, inspect="mlp.down_proj",
                roles=("down",)),
), norms=(NormSite("input_layernorm", "rms", "attn"),
          NormSite("post_attention_layernorm", "rms", "mlp"))))


class PhiAdapter(ModelAdapter):
    layout = PHI_LAYOUT

    def block_layout(self, model: nn.Module, index: int) -> BlockLayout:
        if getattr(model.config, "qk_layernorm", False):
            return PHI_QK_BLOCK
        return self.layout.block


class Phi3Adapter(ModelAdapter):
    layout = PHI3_LAYOUT
