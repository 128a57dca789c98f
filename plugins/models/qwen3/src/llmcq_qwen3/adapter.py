"""Where things are in ``Qwen3ForCausalLM``: the Llama block plus ``q_norm``/``k_norm``
(RMSNorm over each head of the projected queries and keys). Those norms sit after q/k_proj,
so ``input_layernorm -> q,k,v`` and ``v_proj -> o_proj`` stay exact scaling pairs."""

from __future__ import annotations

from llmcq.model.adapter import ModelAdapter
from llmcq.model.layout import llama_like_layout

__all__ = ["Qwen3Adapter", "QWEN3_LAYOUT"]

QWEN3_LAYOUT = llama_like_layout()


class Qwen3Adapter(ModelAdapter):
    layout = QWEN3_LAYOUT
