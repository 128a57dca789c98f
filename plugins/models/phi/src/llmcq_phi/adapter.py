"""Where things are in ``PhiForCausalLM`` and ``Phi3ForCausalLM``.

Phi-1.5/2: one ``input_layernorm`` feeds attention and MLP in parallel, so q,k,v and fc1
form one group whose error is the sum of both branches; ``v_proj -> dense``; fc2 reads
GELU outputs (no producer). The head has a bias and follows ``final_layernorm``.

Phi-3: ``input_layernorm -> qkv_proj`` and ``post_attention_layernorm -> gate_up_proj``.
``o_proj`` reads values from the fused ``qkv_proj`` and ``down_proj`` reads
``act(gate) * up`` from the fused ``gate_up_proj``: the shared folding code scales a
producer's outputs as a whole, so these two have no producer (they are still quantized).
"""

from __future__ import annotations

from llmcq.model.adapter import ModelAdapter
from llmcq.model.layout import BlockLayout, LinearGroup, ModelLayout, llama_like_layout

__all__ = ["PhiAdapter", "Phi3Adapter", "PHI_LAYOUT", "PHI3_LAYOUT"]

PHI_LAYOUT = ModelLayout(
    blocks="model.layers",
    embeddings=("model.embed_tokens",),
    rotary="model.rotary_emb",
    final_norm="model.final_layernorm",
    lm_head="lm_head",
    block=BlockLayout(groups=(
        LinearGroup(linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                             "mlp.fc1"),
                    prev_op="input_layernorm", inspect=("self_attn", "mlp"),
                    inspect_kwargs=(True, False)),
        LinearGroup(linears=("self_attn.dense",), prev_op="self_attn.v_proj",
                    prev_kind="linear", inspect="self_attn.dense"),
        LinearGroup(linears=("mlp.fc2",), prev_op=None, inspect="mlp.fc2"),
    )),
)

PHI3_LAYOUT = llama_like_layout(BlockLayout(groups=(
    LinearGroup(linears=("self_attn.qkv_proj",), prev_op="input_layernorm",
                inspect="self_attn", inspect_kwargs=True),
    LinearGroup(linears=("self_attn.o_proj",), prev_op=None, inspect="self_attn.o_proj"),
    LinearGroup(linears=("mlp.gate_up_proj",), prev_op="post_attention_layernorm",
                inspect="mlp"),
    LinearGroup(linears=("mlp.down_proj",), prev_op=None, inspect="mlp.down_proj"),
)))


class PhiAdapter(ModelAdapter):
    layout = PHI_LAYOUT


class Phi3Adapter(ModelAdapter):
    layout = PHI3_LAYOUT
