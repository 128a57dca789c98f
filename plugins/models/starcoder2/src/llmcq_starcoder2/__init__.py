"""Model adapter for StarCoder2 checkpoints."""

from llmcq.api import ModelSpec

__all__ = ["SPEC"]

SPEC = ModelSpec(
    name="starcoder2",
    summary="StarCoder2 (Starcoder2ForCausalLM; biases everywhere, GELU MLP c_fc/c_proj)",
    impl="llmcq_starcoder2.adapter:Starcoder2Adapter",
    model_types=("starcoder2",),
    provides=frozenset({"scaling_pairs", "roles", "norm_kinds", "rotation_points"}),
)
