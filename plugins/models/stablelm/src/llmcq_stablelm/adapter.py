"""Where things are in ``StableLmForCausalLM``: a Llama-shaped block with LayerNorms (weight
and bias: both absorb a scale). With ``use_parallel_residual`` (StableLM-2 12B) one
``input_layernorm`` feeds attention and MLP, so q/k/v and gate/up form one group whose error
is the sum of both branches."""

from __future__ import annotations

from torch import nn

from llmcq.model.adapter import ModelAdapter
from llmcq.model.layout import (BlockLayout, LinearGroup, NormSite, llama_like_layout,
                                prenorm_block)

__all__ = ["StableLmAdapter", "STABLELM_LAYOUT", "PARALLEL_BLOCK"]

#: with ``qk_layernorm``: LayerNorms over each head of the queries and keys
QK_NORMS = (NormSite("self_attn.q_layernorm", "layer", "qk"),
            NormSite("self_attn.k_layernorm", "layer", "qk"))

STABLELM_LAYOUT = llama_like_layout(prenorm_block(norm_kind="layer"), final_norm_kind="layer")

PARALLEL_BLOCK = BlockLayout(groups=(
    LinearGroup(linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                         "mlp.gate_proj", "mlp.up_proj"),
                prev_op="input_layernorm", inspect=("self_attn", "mlp"),
                inspect_kwargs=(True, False), roles=("q", "k", "v", "gate", "up")),
    LinearGroup(linears=("self_attn.o_proj",), prev_op="self_attn.v_proj", prev_kind="linear",
                inspect="self_attn.o_proj", roles=("o",)),
    LinearGroup(linears=("mlp.down_proj",), prev_op="mlp.up_proj", prev_kind="linear",
                inspect="mlp.down_proj", roles=("down",)),
), norms=(NormSite("input_layernorm", "layer", "attn_mlp"),))

_VARIANTS = {(par, qk): BlockLayout(groups=base.groups, norms=base.norms + (QK_NORMS if qk else ()))
             for par, base in ((False, STABLELM_LAYOUT.block), (True, PARALLEL_BLOCK))
             for qk in (False, True)}


class StableLmAdapter(ModelAdapter):
    layout = STABLELM_LAYOUT

    def block_layout(self, model: nn.Module, index: int) -> BlockLayout:
        cfg = model.config
        return _VARIANTS[(bool(getattr(cfg, "use_parallel_residual", False)),
                          bool(getattr(cfg, "qk_layernorm", False)))]
