"""Model adapter for Qwen3 dense checkpoints."""

from llmcq.api import ModelSpec

__all__ = ["SPEC"]

SPEC = ModelSpec(
    name="qwen3",
    summary="Qwen3 dense models (Qwen3ForCausalLM; per-head RMSNorm on queries and keys)",
    impl="llmcq_qwen3.adapter:Qwen3Adapter",
    model_types=("qwen3",),
    provides=frozenset({"scaling_pairs", "roles", "norm_kinds", "rotation_points"}),
)
