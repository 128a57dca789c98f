"""Model adapter for Mistral-architecture checkpoints (Mistral 7B v0.1-v0.3, Ministral)."""

from llmcq.api import ModelSpec

__all__ = ["SPEC"]

SPEC = ModelSpec(
    name="mistral",
    aliases=("ministral",),
    summary="Mistral 7B and Mistral-architecture models (MistralForCausalLM)",
    impl="llmcq_mistral.adapter:MistralAdapter",
    model_types=("mistral", "ministral"),
    provides=frozenset({"scaling_pairs", "roles", "norm_kinds", "rotation_points"}),
)
