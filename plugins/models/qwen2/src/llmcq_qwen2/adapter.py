"""Where things are in ``Qwen2ForCausalLM``: the Llama block; q/k/v carry biases, which the
scaling transforms leave alone (a consumer's bias does not depend on its input scale)."""

from __future__ import annotations

from llmcq.model.adapter import ModelAdapter
from llmcq.model.layout import llama_like_layout

__all__ = ["Qwen2Adapter", "QWEN2_LAYOUT"]

QWEN2_LAYOUT = llama_like_layout()


class Qwen2Adapter(ModelAdapter):
    layout = QWEN2_LAYOUT
