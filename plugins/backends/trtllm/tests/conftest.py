"""Tiny models for the TensorRT-LLM exporter tests: widths that fit the weight-only kernels
(multiples of 64 per rank for tp 1 and 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


def _save(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any, family: str,
          **sizes: Any) -> Path:
    from llmcq.testing.tiny_models import save_tiny_model, tiny_family_config

    cfg = tiny_family_config(family, vocab_size=len(tokenizer))
    for k, v in sizes.items():
        setattr(cfg, k, v)
    folder = tmp_path_factory.mktemp(f"tiny-{family}-trt")
    return save_tiny_model(folder, cfg, tokenizer, perturb_vectors=True)


@pytest.fixture(scope="session")
def tiny_llama_w4(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Path:
    """Llama, hidden 128, 4 heads of 32 / 2 kv heads, intermediate 256, 2 layers (widths are
    multiples of 64 x tp for tp 1 and 2)."""
    return _save(tmp_path_factory, tiny_tokenizer, "llama", hidden_size=128,
                 intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=32)


@pytest.fixture(scope="session")
def tiny_qwen2_w4(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Path:
    """Qwen2 (q/k/v biases), same sizes as tiny_llama_w4."""
    return _save(tmp_path_factory, tiny_tokenizer, "qwen2", hidden_size=128,
                 intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=32)


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Path:
    return _save(tmp_path_factory, tiny_tokenizer, "opt")




@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Path:
    """Mistral (untied head), hidden 64, intermediate 96: W8A8 only (96 is not a multiple of
    64, which the weight-only layers would pad)."""
    return _save(tmp_path_factory, tiny_tokenizer, "mistral")
