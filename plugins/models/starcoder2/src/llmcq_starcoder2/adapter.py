"""Where things are in ``Starcoder2ForCausalLM``: pre-LayerNorm attention (GQA) and an
ungated GELU MLP. GELU is not positively homogeneous, so ``c_fc -> c_proj`` is no scaling
pair: ``c_proj`` is quantized without a producer. Roles: ``q, k, v, o``, ``up`` (``c_fc``),
``down`` (``c_proj``); LayerNorms."""

from __future__ import annotations

from llmcq.model.adapter import ModelAdapter
from llmcq.model.layout import llama_like_layout, prenorm_block

__all__ = ["Starcoder2Adapter", "STARCODER2_LAYOUT"]

STARCODER2_LAYOUT = llama_like_layout(prenorm_block(gate=None, up="c_fc", down="c_proj",
                                                   norm_kind="layer"), final_norm_kind="layer")


class Starcoder2Adapter(ModelAdapter):
    layout = STARCODER2_LAYOUT
