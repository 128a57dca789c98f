"""Model adapter for BLOOM checkpoints (bloom-560m ... bloom, bloomz)."""

from llmcq.api import ModelSpec

__all__ = ["SPEC"]

SPEC = ModelSpec(
    name="bloom",
    aliases=("bloomz",),
    summary="BLOOM / BLOOMZ (BloomForCausalLM): ALiBi, fused QKV, embedding LayerNorm",
    impl="llmcq_bloom.adapter:BloomAdapter",
    model_types=("bloom",),
    provides=frozenset({"scaling_pairs", "roles", "norm_kinds"}),
)
