"""Model adapter for Falcon checkpoints (7B, 40B, 180B, Falcon2/3-style)."""

from llmcq.api import ModelSpec

__all__ = ["SPEC"]

SPEC = ModelSpec(
    name="falcon",
    summary="Falcon (FalconForCausalLM): parallel attention, multi-query, fused QKV",
    impl="llmcq_falcon.adapter:FalconAdapter",
    model_types=("falcon",),
    provides=frozenset({"scaling_pairs", "roles", "norm_kinds", "rotation_points"}),
)
