"""Tiny models built offline from transformers configs, with random weights.

The tokenizer is a real byte-level BPE trained on a little wikitext with the ``tokenizers``
library, so tiny models run the whole pipeline (data, calibration, perplexity, export)
without the hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["train_tokenizer", "tiny_llama_config", "save_tiny_model", "TINY_TEXT",
           "tiny_family_config", "TINY_FAMILIES", "auto_model_class"]

TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. Quantization maps weights to a small grid "
    "of integers; calibration data tells which errors matter. A block of a transformer holds "
    "attention and a feed-forward network, each built from linear layers. "
) * 8


def train_tokenizer(texts: list[str], vocab_size: int = 512) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_llama_config(vocab_size: int = 512, **overrides: Any) -> Any:
    from transformers import LlamaConfig

    kw: dict[str, Any] = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=160,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=1024, tie_word_embeddings=True,
                              rms_norm_eps=1e-5)
    kw.update(overrides)
    return LlamaConfig(**kw)


# --------------------------------------------------------------------------- other families
# One tiny config per model family: hidden 64, 2 blocks, grouped-query attention where the
# family has it, MoE with 4 experts (top 2). Keys are llmcq model.type names.

_SIZES: dict[str, Any] = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=512)
_TOKENS = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _cfg(cls_name: str, vocab_size: int, **kw: Any) -> Any:
    import transformers

    return getattr(transformers, cls_name)(vocab_size=vocab_size, **_TOKENS, **kw)


TINY_FAMILIES: dict[str, Any] = {
    "llama": lambda v: tiny_llama_config(v),
    "mistral": lambda v: _cfg("MistralConfig", v, **_SIZES, num_key_value_heads=2,
                              tie_word_embeddings=False),
    "ministral": lambda v: _cfg("MinistralConfig", v, **_SIZES, num_key_value_heads=2,
                                head_dim=16),
    "qwen2": lambda v: _cfg("Qwen2Config", v, **_SIZES, num_key_value_heads=2,
                            tie_word_embeddings=True),
    "qwen3": lambda v: _cfg("Qwen3Config", v, **_SIZES, num_key_value_heads=2, head_dim=16,
                            tie_word_embeddings=True),
    "mixtral": lambda v: _cfg("MixtralConfig", v, **_SIZES, num_key_value_heads=2,
                              num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda v: _cfg("Qwen2MoeConfig", v, **_SIZES, num_key_value_heads=2,
                                num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                shared_expert_intermediate_size=48, decoder_sparse_step=1),
    "qwen3_moe": lambda v: _cfg("Qwen3MoeConfig", v, **_SIZES, num_key_value_heads=2,
                                head_dim=16, num_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=32, decoder_sparse_step=1),
    "opt": lambda v: _cfg("OPTConfig", v, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=512,
                          word_embed_proj_dim=64),
    "bloom": lambda v: _cfg("BloomConfig", v, hidden_size=64, n_layer=2, n_head=4),
    "falcon": lambda v: _cfg("FalconConfig", v, hidden_size=64, num_hidden_layers=2,
                             num_attention_heads=4, new_decoder_architecture=False,
                             multi_query=True, parallel_attn=True, bias=False),
    # variants of one family's wiring, served by the same adapter
    "falcon_new": lambda v: _cfg("FalconConfig", v, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, new_decoder_architecture=True,
                                 num_kv_heads=2, num_ln_in_parallel_attn=2, bias=False),
    "opt_postln": lambda v: _cfg("OPTConfig", v, hidden_size=64, ffn_dim=96,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 max_position_embeddings=512, word_embed_proj_dim=32,
                                 do_layer_norm_before=False),
    "stablelm_parallel": lambda v: _cfg("StableLmConfig", v, **_SIZES, num_key_value_heads=2,
                                        use_parallel_residual=True, qk_layernorm=True),
    "gemma2": lambda v: _cfg("Gemma2Config", v, **_SIZES, num_key_value_heads=2, head_dim=16,
                             sliding_window=64, query_pre_attn_scalar=16),
    "gemma3_text": lambda v: _cfg("Gemma3TextConfig", v, **_SIZES, num_key_value_heads=2,
                                  head_dim=16, sliding_window=64, query_pre_attn_scalar=16),
    "phi": lambda v: _cfg("PhiConfig", v, **_SIZES),
    "phi3": lambda v: _cfg("Phi3Config", v, **_SIZES, num_key_value_heads=2),
    "stablelm": lambda v: _cfg("StableLmConfig", v, **_SIZES, num_key_value_heads=2),
    "starcoder2": lambda v: _cfg("Starcoder2Config", v, **_SIZES, num_key_value_heads=2),
    "deepseek_v2": lambda v: _cfg("DeepseekV2Config", v, **_SIZES, num_key_value_heads=4,
                                  n_routed_experts=4, num_experts_per_tok=2,
                                  moe_intermediate_size=32, first_k_dense_replace=1,
                                  n_shared_experts=1, kv_lora_rank=16, q_lora_rank=None,
                                  qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    "deepseek_v3": lambda v: _cfg("DeepseekV3Config", v, **_SIZES, num_key_value_heads=4,
                                  n_routed_experts=4, num_experts_per_tok=2,
                                  moe_intermediate_size=32, first_k_dense_replace=1,
                                  n_shared_experts=1, kv_lora_rank=16, q_lora_rank=24,
                                  qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                  n_group=1, topk_group=1),
    "llava": lambda v: _llava(v),
    # no family adapter: served by model.type auto only
    "gpt_neox": lambda v: _cfg("GPTNeoXConfig", v, hidden_size=64, intermediate_size=96,
                               num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=512, use_parallel_residual=True),
    "gpt_bigcode": lambda v: _cfg("GPTBigCodeConfig", v, n_embd=64, n_layer=2, n_head=4,
                                  n_positions=512, multi_query=True),
    "internlm3": lambda v: _cfg("InternLM3Config", v, **_SIZES, num_key_value_heads=2,
                                head_dim=16),
    "minicpm3": lambda v: _cfg("MiniCPM3Config", v, **_SIZES, num_key_value_heads=4,
                               q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
                               qk_rope_head_dim=8, v_head_dim=16),
    "olmo2": lambda v: _cfg("Olmo2Config", v, **_SIZES, num_key_value_heads=2),
}


def _llava(vocab_size: int) -> Any:
    from transformers import CLIPVisionConfig, LlavaConfig

    text = tiny_llama_config(vocab_size, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, image_size=32, patch_size=8,
                              projection_dim=32)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab_size - 1,
                       vision_feature_layer=-1)


def tiny_family_config(family: str, vocab_size: int = 512) -> Any:
    """The tiny transformers config of ``family`` (a key of :data:`TINY_FAMILIES`)."""
    return TINY_FAMILIES[family](vocab_size)


def auto_model_class(config: Any) -> Any:
    import transformers

    if getattr(config, "model_type", "") == "llava":
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def save_tiny_model(folder: Path, config: Any, tokenizer: Any, *, seed: int = 0,
                    perturb_vectors: bool = False) -> Path:
    """Build ``AutoModelForCausalLM.from_config(config)`` with seeded random weights, save it.

    ``perturb_vectors``: also move norm weights and biases off their 1/0 init, so tests of
    function-preserving transforms see non-trivial norms."""
    import torch

    torch.manual_seed(seed)
    model = auto_model_class(config).from_config(config)
    with torch.no_grad():  # larger-than-default weights so quantization error is visible
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif perturb_vectors and p.dim() == 1 and p.numel() > 1:
                # norms and biases away from their 1 / 0 init
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
