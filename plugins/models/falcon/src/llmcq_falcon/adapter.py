"""Where things are in ``FalconForCausalLM``.

Three block wirings, chosen by the config:

* ``parallel_attn`` with one norm (Falcon-7B; new architecture with
  ``num_ln_in_parallel_attn: 1``): ``input_layernorm`` feeds both ``query_key_value`` and
  ``dense_h_to_4h``. They form one group (a scale folded into the norm reaches both), whose
  error is attention plus MLP output on the norm's output. (llmc lists them as two groups
  sharing the norm, which would scale the MLP input without compensating it.)
* new architecture with two norms (40B/180B): ``ln_attn -> query_key_value``,
  ``ln_mlp -> dense_h_to_4h``.
* sequential: ``input_layernorm -> query_key_value``,
  ``post_attention_layernorm -> dense_h_to_4h``.

``self_attention.dense`` reads values from the fused ``query_key_value`` and
``dense_4h_to_h`` reads GELU outputs: neither has a producer that can absorb a scale.
"""

from __future__ import annotations

from torch import nn

from llmcq.model.adapter import ModelAdapter
from llmcq.model.layout import BlockLayout, LinearGroup, ModelLayout, NormSite

__all__ = ["FalconAdapter", "FALCON_LAYOUT", "falcon_block"]

QKV, DENSE = "self_attention.query_key_value", "self_attention.dense"
UP, DOWN = "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"


def falcon_block(wiring: str) -> BlockLayout:
    """Roles ``qkv`` (fused), ``o`` (``dense``), ``up``, ``down``; LayerNorms."""
    tail = (LinearGroup(linears=(DENSE,), prev_op=None, inspect=DENSE, roles=("o",)),
            LinearGroup(linears=(DOWN,), prev_op=None, inspect=DOWN, roles=("down",)))
    if wiring == "parallel":
        return BlockLayout(groups=(
            LinearGroup(linears=(QKV, UP), prev_op="input_layernorm",
                        inspect=("self_attention", "mlp"), inspect_kwargs=(True, False),
                        roles=("qkv", "up")),
            *tail), norms=(NormSite("input_layernorm", "layer", "attn_mlp"),))
    attn_norm, mlp_norm = {"two_norms": ("ln_attn", "ln_mlp"),
                           "sequential": ("input_layernorm", "post_attention_layernorm")}[wiring]
    return BlockLayout(groups=(
        LinearGroup(linears=(QKV,), prev_op=attn_norm, inspect="self_attention",
                    inspect_kwargs=True, roles=("qkv",)),
        tail[0],
        LinearGroup(linears=(UP,), prev_op=mlp_norm, inspect="mlp", roles=("up",)),
        tail[1]), norms=(NormSite(attn_norm, "layer", "attn"), NormSite(mlp_norm, "layer", "mlp")))


_BLOCKS = {w: falcon_block(w) for w in ("parallel", "two_norms", "sequential")}


def wiring(config: object) -> str:
    if getattr(config, "new_decoder_architecture", False):
        if getattr(config, "num_ln_in_parallel_attn", None) == 2 or \
                getattr(config, "num_ln_in_parallel_attn", None) is None:
            return "two_norms"
        return "parallel"
    return "parallel" if getattr(config, "parallel_attn", True) else "sequential"


FALCON_LAYOUT = ModelLayout(
    blocks="transformer.h",
    embeddings=("transformer.word_embeddings",),
    rotary="transformer.rotary_emb",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    block=_BLOCKS["parallel"],
    final_norm_kind="layer",
)


class FalconAdapter(ModelAdapter):
    layout = FALCON_LAYOUT

    def block_layout(self, model: nn.Module, index: int) -> BlockLayout:
        return _BLOCKS[wiring(model.config)]

    def attention_heads(self, model: nn.Module) -> tuple[int, int]:
        cfg = model.config
        heads = int(cfg.num_attention_heads)
        if getattr(cfg, "new_decoder_architecture", False):
            return heads, int(cfg.num_kv_heads)
        return heads, 1 if getattr(cfg, "multi_query", False) else heads
