"""Where things are in ``BloomForCausalLM``.

``input_layernorm -> query_key_value`` and ``post_attention_layernorm -> dense_h_to_4h`` are
the scaling pairs. ``query_key_value`` interleaves queries, keys and values per head, so it
cannot absorb a scale for ``self_attention.dense`` as a whole; GELU sits between
``dense_h_to_4h`` and ``dense_4h_to_h``. BLOOM's attention and MLP modules take the residual
as an argument, so a group's error is measured on its own linears' outputs (as llmc does).
With ``apply_residual_connection_post_layernorm`` the norm outputs are also the residual and
no norm may absorb a scale.

Before the blocks: ``word_embeddings`` then ``word_embeddings_layernorm``; ALiBi biases are
built by the model and reach the blocks as keyword inputs.
"""

from __future__ import annotations

from torch import nn

from llmcq.model.adapter import ModelAdapter
from llmcq.model.layout import BlockLayout, LinearGroup, ModelLayout, NormSite

__all__ = ["BloomAdapter", "BLOOM_LAYOUT", "bloom_block"]


def bloom_block(*, norms_scalable: bool = True) -> BlockLayout:
    """Roles ``qkv`` (fused, interleaved per head), ``o`` (``dense``), ``up``, ``down``;
    LayerNorms, whose outputs are also the residual under
    ``apply_residual_connection_post_layernorm`` (``norms_scalable=False``)."""
    return BlockLayout(groups=(
        LinearGroup(linears=("self_attention.query_key_value",),
                    prev_op="input_layernorm" if norms_scalable else None,
                    inspect="self_attention.query_key_value", roles=("qkv",)),
        LinearGroup(linears=("self_attention.dense",), prev_op=None,
                    inspect="self_attention.dense", roles=("o",)),
        LinearGroup(linears=("mlp.dense_h_to_4h",),
                    prev_op="post_attention_layernorm" if norms_scalable else None,
                    inspect="mlp.dense_h_to_4h", roles=("up",)),
        LinearGroup(linears=("mlp.dense_4h_to_h",), prev_op=None, inspect="mlp.dense_4h_to_h",
                    roles=("down",)),
    ), norms=(NormSite("input_layernorm", "layer", "attn" if norms_scalable else "residual"),
              NormSite("post_attention_layernorm", "layer",
                       "mlp" if norms_scalable else "residual")))


BLOOM_LAYOUT = ModelLayout(
    blocks="transformer.h",
    embeddings=("transformer.word_embeddings",),
    pre_block=("transformer.word_embeddings_layernorm",),
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    block=bloom_block(),
    final_norm_kind="layer",
    rotation_blockers=("a LayerNorm (transformer.word_embeddings_layernorm) normalizes the "
                       "embeddings' output, which is the residual stream itself",),
)
_POST_LN_BLOCK = bloom_block(norms_scalable=False)


class BloomAdapter(ModelAdapter):
    layout = BLOOM_LAYOUT

    def block_layout(self, model: nn.Module, index: int) -> BlockLayout:
        if getattr(model.config, "apply_residual_connection_post_layernorm", False):
            return _POST_LN_BLOCK
        return self.layout.block
