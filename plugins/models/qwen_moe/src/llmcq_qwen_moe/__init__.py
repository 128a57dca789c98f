"""Model adapters for Qwen's sparse mixture-of-experts checkpoints."""

from llmcq.api import ModelSpec

__all__ = ["QWEN2_MOE", "QWEN3_MOE"]

QWEN2_MOE = ModelSpec(
    name="qwen2_moe",
    aliases=("qwen15_moe", "qwen1.5_moe"),
    summary="Qwen1.5-MoE / Qwen2-MoE (Qwen2MoeForCausalLM): experts and shared expert "
            "quantized; router and shared-expert gate float",
    impl="llmcq_qwen_moe.adapter:QwenMoeAdapter",
    model_types=("qwen2_moe",),
    provides=frozenset({"scaling_pairs", "roles", "norm_kinds", "rotation_points"}),
)

QWEN3_MOE = ModelSpec(
    name="qwen3_moe",
    summary="Qwen3-MoE (Qwen3MoeForCausalLM): experts quantized, router float",
    impl="llmcq_qwen_moe.adapter:QwenMoeAdapter",
    model_types=("qwen3_moe",),
    provides=frozenset({"scaling_pairs", "roles", "norm_kinds", "rotation_points"}),
)
