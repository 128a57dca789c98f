"""Model adapter for Mixtral sparse mixture-of-experts checkpoints."""

from llmcq.api import ModelSpec

__all__ = ["SPEC"]

SPEC = ModelSpec(
    name="mixtral",
    summary="Mixtral 8x7B / 8x22B (MixtralForCausalLM): experts quantized, router float",
    impl="llmcq_mixtral.adapter:MixtralAdapter",
    model_types=("mixtral",),
    provides=frozenset({"scaling_pairs", "roles", "norm_kinds", "rotation_points"}),
)
