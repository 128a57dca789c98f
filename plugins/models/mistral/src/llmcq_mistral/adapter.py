"""Where things are in ``MistralForCausalLM``: the Llama block (pre-norm attention with
grouped-query heads, gated SiLU MLP); sliding-window attention changes nothing here."""

from __future__ import annotations

from llmcq.model.adapter import ModelAdapter
from llmcq.model.layout import llama_like_layout

__all__ = ["MistralAdapter", "MISTRAL_LAYOUT"]

MISTRAL_LAYOUT = llama_like_layout()


class MistralAdapter(ModelAdapter):
    layout = MISTRAL_LAYOUT
