"""Where things are in ``DeepseekV2ForCausalLM`` / ``DeepseekV3ForCausalLM``.

Multi-head latent attention: the block's ``input_layernorm`` feeds the query projection
(``q_proj``, or the low-rank ``q_a_proj``) and ``kv_a_proj_with_mqa``; ``q_a_layernorm``
feeds ``q_b_proj`` and ``kv_a_layernorm`` feeds ``kv_b_proj`` (two more exact norm->linear
scaling pairs). ``o_proj`` reads values produced by ``kv_b_proj`` interleaved with the keys
of each head, so it has no producer that could absorb a scale as a whole. Roles: ``q`` (or
``q_a``, ``q_b``), ``kv_a``, ``kv_b``, ``o``; the latent norms sit at ``latent``.

The first ``first_k_dense_replace`` blocks have a dense gated MLP; the others a router
(``mlp.gate``, not an ``nn.Linear``: float), routed experts (split per expert by
:meth:`prepare`; roles ``expert_gate/up/down``) and shared experts (``shared_*``).
"""

from __future__ import annotations

from torch import nn

from llmcq.model.adapter import ModelAdapter
from llmcq.model.layout import (BlockLayout, LinearGroup, ModelLayout, NormSite, mlp_groups,
                                prenorm_block)
from llmcq.model.moe import ExpertList, sparse_moe_block, unfuse_experts

__all__ = ["DeepseekAdapter", "DEEPSEEK_LAYOUT", "mla_groups", "mla_norms"]

DEEPSEEK_LAYOUT = ModelLayout(
    blocks="model.layers",
    embeddings=("model.embed_tokens",),
    rotary="model.rotary_emb",
    final_norm="model.norm",
    lm_head="lm_head",
    block=prenorm_block(),  # placeholder: block_layout builds each block's groups
    final_norm_kind="rms",
)


def mla_groups(attn: nn.Module, prefix: str = "self_attn") -> tuple[LinearGroup, ...]:
    p = f"{prefix}."
    low_rank_q = getattr(attn, "q_a_proj", None) is not None
    first = (p + "q_a_proj" if low_rank_q else p + "q_proj", p + "kv_a_proj_with_mqa")
    groups = [LinearGroup(linears=first, prev_op="input_layernorm", inspect=prefix,
                          inspect_kwargs=True, roles=("q_a" if low_rank_q else "q", "kv_a"))]
    if low_rank_q:
        groups.append(LinearGroup(linears=(p + "q_b_proj",), prev_op=p + "q_a_layernorm",
                                  inspect=p + "q_b_proj", roles=("q_b",)))
    groups += [
        LinearGroup(linears=(p + "kv_b_proj",), prev_op=p + "kv_a_layernorm",
                    inspect=p + "kv_b_proj", roles=("kv_b",)),
        LinearGroup(linears=(p + "o_proj",), prev_op=None, inspect=p + "o_proj",
                    roles=("o",)),
    ]
    return tuple(groups)


def mla_norms(attn: nn.Module, prefix: str = "self_attn") -> tuple[NormSite, ...]:
    """The block's pre-norms and MLA's latent norms (all RMSNorm)."""
    latent = [NormSite(f"{prefix}.kv_a_layernorm", "rms", "latent")]
    if getattr(attn, "q_a_proj", None) is not None:
        latent.insert(0, NormSite(f"{prefix}.q_a_layernorm", "rms", "latent"))
    return (NormSite("input_layernorm", "rms", "attn"), *latent,
            NormSite("post_attention_layernorm", "rms", "mlp"))


class DeepseekAdapter(ModelAdapter):
    layout = DEEPSEEK_LAYOUT

    def prepare(self, model: nn.Module) -> None:
        unfuse_experts(model)

    def block_layout(self, model: nn.Module, index: int) -> BlockLayout:
        block = self.blocks(model)[index]
        attention = mla_groups(block.self_attn)
        norms = mla_norms(block.self_attn)
        if isinstance(getattr(block.mlp, "experts", None), ExpertList):
            return sparse_moe_block(block, attn_groups=attention, shared="shared_experts",
                                    norms=norms)
        return BlockLayout(groups=(*attention, *mlp_groups(
            norm="post_attention_layernorm", up=("mlp.gate_proj", "mlp.up_proj"),
            down="mlp.down_proj", down_prev="mlp.up_proj")), norms=norms)
