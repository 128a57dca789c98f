"""Where things are in ``StableLmForCausalLM``: a Llama-shaped block with LayerNorms (weight
and bias: both absorb a scale). With ``use_parallel_residual`` (StableLM-2 12B) one
``input_layernorm`` feeds attention and MLP, so q/k/v and gate/up form one group whose error
is the sum of both branches."""

from __future__ import annotations

from torch import nn

from llmcq.model.adapter import ModelAdapter
from llmcq.model.layout import BlockLayout, LinearGroup, llama_like_layout, prenorm_block

__all__ = ["StableLmAdapter", "STABLELM_LAYOUT", "PARALLEL_BLOCK"]

STABLELM_LAYOUT = llama_like_layout(prenorm_block())

PARALLEL_BLOCK = BlockLayout(groups=(
    LinearGroup(linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                         "mlp.gate_proj", "mlp.up_proj"),
                prev_op="input_layernorm", inspect=("self_attn", "mlp"),
                inspect_kwargs=(True, False)),
    LinearGroup(linears=("self_attn.o_proj",), prev_op="self_attn.v_proj", prev_kind="linear",
                inspect="self_attn.o_proj"),
    LinearGroup(linears=("mlp.down_proj",), prev_op="mlp.up_proj", prev_kind="linear",
                inspect="mlp.down_proj"),
))


class StableLmAdapter(ModelAdapter):
    layout = STABLELM_LAYOUT

    def block_layout(self, model: nn.Module, index: int) -> BlockLayout:
        if getattr(model.config, "use_parallel_residual", False):
            return PARALLEL_BLOCK
        return self.layout.block
