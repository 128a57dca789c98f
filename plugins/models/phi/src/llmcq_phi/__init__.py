"""Model adapters for Phi-1.5 / Phi-2 and Phi-3 / Phi-3.5 / Phi-4-mini checkpoints."""

from llmcq.api import ModelSpec

__all__ = ["PHI", "PHI3"]

PHI = ModelSpec(
    name="phi",
    aliases=("phi2", "phi1.5", "phi15"),
    summary="Phi-1.5 / Phi-2 (PhiForCausalLM): parallel attention and MLP on one LayerNorm",
    impl="llmcq_phi.adapter:PhiAdapter",
    model_types=("phi",),
    provides=frozenset({"scaling_pairs", "roles", "norm_kinds", "rotation_points"}),
)

PHI3 = ModelSpec(
    name="phi3",
    aliases=("phi3.5", "phi35", "phi4_mini"),
    summary="Phi-3 / Phi-3.5 (Phi3ForCausalLM): fused qkv_proj and gate_up_proj",
    impl="llmcq_phi.adapter:Phi3Adapter",
    model_types=("phi3",),
    provides=frozenset({"scaling_pairs", "roles", "norm_kinds", "rotation_points"}),
)
