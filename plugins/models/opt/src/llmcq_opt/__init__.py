"""Model adapter for OPT checkpoints (125m ... 66b)."""

from llmcq.api import ModelSpec

__all__ = ["SPEC"]

SPEC = ModelSpec(
    name="opt",
    summary="OPT (OPTForCausalLM): learned positions, biases, ReLU MLP, pre- or post-LN",
    impl="llmcq_opt.adapter:OptAdapter",
    model_types=("opt",),
    provides=frozenset({"scaling_pairs", "roles", "norm_kinds"}),
)
