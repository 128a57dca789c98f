"""Model adapter for Qwen2 / Qwen2.5 dense checkpoints."""

from llmcq.api import ModelSpec

__all__ = ["SPEC"]

SPEC = ModelSpec(
    name="qwen2",
    aliases=("qwen2.5", "qwen25"),
    summary="Qwen2 and Qwen2.5 dense models (Qwen2ForCausalLM; q/k/v biases)",
    impl="llmcq_qwen2.adapter:Qwen2Adapter",
    model_types=("qwen2",),
    provides=frozenset({"scaling_pairs", "roles", "norm_kinds", "rotation_points"}),
)
