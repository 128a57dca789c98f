"""Model adapter for StableLM checkpoints (StableLM-3B-4E1T, StableLM-2)."""

from llmcq.api import ModelSpec

__all__ = ["SPEC"]

SPEC = ModelSpec(
    name="stablelm",
    aliases=("stablelm2", "stable_lm"),
    summary="StableLM / StableLM-2 (StableLmForCausalLM; LayerNorm, partial rotary)",
    impl="llmcq_stablelm.adapter:StableLmAdapter",
    model_types=("stablelm",),
    provides=frozenset({"scaling_pairs", "roles", "norm_kinds", "rotation_points"}),
)
