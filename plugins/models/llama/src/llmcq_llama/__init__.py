"""Model adapter for Llama-architecture checkpoints (Llama 1/2/3, SmolLM)."""

from llmcq.api import ModelSpec

__all__ = ["SPEC"]

SPEC = ModelSpec(
    name="llama",
    aliases=("smollm", "smollm2", "llama2", "llama3"),
    summary="Llama 1/2/3/3.x and SmolLM (LlamaForCausalLM)",
    impl="llmcq_llama.adapter:LlamaAdapter",
    model_types=("llama",),
    provides=frozenset({"scaling_pairs", "roles", "norm_kinds", "rotation_points"}),
)
