"""Where things are in ``Qwen3ForCausalLM``: the Llama block plus ``q_norm``/``k_norm``
(RMSNorm over each head of the projected queries and keys). Those norms sit after q/k_proj,
so ``input_layernorm -> q,k,v`` and ``v_proj -> o_proj`` stay exact scaling pairs."""

from __future__ import annotations

from llmcq.model.adapter import ModelAdapter
from llmcq.model.layout import NormSite, llama_like_layout, prenorm_block

__all__ = ["Qwen3Adapter", "QWEN3_LAYOUT", "QK_NORMS"]

#: per-head RMSNorms on the projected queries and keys
QK_NORMS = (NormSite("self_attn.q_norm", "rms", "qk"), NormSite("self_attn.k_norm", "rms", "qk"))

QWEN3_LAYOUT = llama_like_layout(prenorm_block(extra_norms=QK_NORMS))


class Qwen3Adapter(ModelAdapter):
    layout = QWEN3_LAYOUT
