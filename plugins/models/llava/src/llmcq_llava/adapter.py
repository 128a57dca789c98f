"""Where things are in ``LlavaForConditionalGeneration`` (transformers 5 layout).

The language model sits at ``model.language_model`` (a ``*Model`` of its own family) with
the head at ``lm_head``; ``model.vision_tower`` and ``model.multi_modal_projector`` are not
in the layout, so they are never quantized. Calibration and perplexity run text-only
(``input_ids`` without ``pixel_values``). The language model must be pre-norm with a
Llama-shaped block (Llama/Vicuna, Mistral, Qwen2 are).
"""

from __future__ import annotations

from torch import nn

from llmcq.model.adapter import ModelAdapter
from llmcq.model.layout import ModelLayout, prenorm_block

__all__ = ["LlavaAdapter", "LLAVA_LAYOUT"]

LM = "model.language_model"

LLAVA_LAYOUT = ModelLayout(
    blocks=f"{LM}.layers",
    embeddings=(f"{LM}.embed_tokens",),
    rotary=f"{LM}.rotary_emb",
    final_norm=f"{LM}.norm",
    lm_head="lm_head",
    block=prenorm_block(),
    final_norm_kind="rms",
)


class LlavaAdapter(ModelAdapter):
    layout = LLAVA_LAYOUT
    auto_class = "AutoModelForImageTextToText"

    def attention_heads(self, model: nn.Module) -> tuple[int, int]:
        cfg = model.config.text_config
        heads = int(cfg.num_attention_heads)
        return heads, int(getattr(cfg, "num_key_value_heads", None) or heads)
