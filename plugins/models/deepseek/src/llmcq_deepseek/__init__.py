"""Model adapters for DeepSeek-V2 / V3-style checkpoints (MLA attention, MoE)."""

from llmcq.api import ModelSpec

__all__ = ["DEEPSEEK_V2", "DEEPSEEK_V3"]

DEEPSEEK_V2 = ModelSpec(
    name="deepseek_v2",
    aliases=("deepseekv2_lite",),
    summary="DeepSeek-V2 / V2-Lite (DeepseekV2ForCausalLM): MLA attention, dense first "
            "blocks, routed + shared experts; router float",
    impl="llmcq_deepseek.adapter:DeepseekAdapter",
    model_types=("deepseek_v2",),
    provides=frozenset({"scaling_pairs", "roles", "norm_kinds", "rotation_points"}),
)

DEEPSEEK_V3 = ModelSpec(
    name="deepseek_v3",
    aliases=("deepseek_r1",),
    summary="DeepSeek-V3 / R1 architecture (DeepseekV3ForCausalLM): MLA with low-rank "
            "queries, routed + shared experts; router float",
    impl="llmcq_deepseek.adapter:DeepseekAdapter",
    model_types=("deepseek_v3",),
    provides=frozenset({"scaling_pairs", "roles", "norm_kinds", "rotation_points"}),
)
