"""Where things are in ``Qwen2ForCausalLM``: the Llama block; q/k/v carry biases, which the
scaling transforms leave alone (a consumer's bias does not depend on its input scale)."""

from __future__ import annotations

from llmcq.model.adapter import ModelAdapter
from llmcq.model.layout import ModelLayout, prenorm_block

__all__ = ["Qwen2Adapter", "QWEN2_LAYOUT"]

QWEN2_LAYOUT = ModelLayout(
    blocks="model.layers",
    embeddings=("model.embed_tokens",),
    rotary="model.rotary_emb",
    final_norm="model.norm",
    lm_head="lm_head",
    block=prenorm_block(),
)


class Qwen2Adapter(ModelAdapter):
    layout = QWEN2_LAYOUT
