"""Where things are in ``MistralForCausalLM``: the Llama block (pre-norm attention with
grouped-query heads, gated SiLU MLP); sliding-window attention changes nothing here."""

from __future__ import annotations

from llmcq.model.adapter import ModelAdapter
from llmcq.model.layout import ModelLayout, prenorm_block

__all__ = ["MistralAdapter", "MISTRAL_LAYOUT"]

MISTRAL_LAYOUT = ModelLayout(
    blocks="model.layers",
    embeddings=("model.embed_tokens",),
    rotary="model.rotary_emb",
    final_norm="model.norm",
    lm_head="lm_head",
    block=prenorm_block(),
)


class MistralAdapter(ModelAdapter):
    layout = MISTRAL_LAYOUT
