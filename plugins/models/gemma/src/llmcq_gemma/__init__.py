"""Model adapters for Gemma2 and Gemma3 (text) checkpoints."""

from llmcq.api import ModelSpec

__all__ = ["GEMMA2", "GEMMA3"]

GEMMA2 = ModelSpec(
    name="gemma2",
    summary="Gemma 2 (Gemma2ForCausalLM): 1 + weight RMSNorms, sandwich norms, soft-capping",
    impl="llmcq_gemma.adapter:GemmaAdapter",
    model_types=("gemma2",),
    provides=frozenset({"scaling_pairs", "roles", "norm_kinds"}),
)

GEMMA3 = ModelSpec(
    name="gemma3_text",
    summary="Gemma 3 text models (Gemma3ForCausalLM, e.g. gemma-3-1b): as Gemma 2 plus q/k "
            "norms",
    impl="llmcq_gemma.adapter:GemmaAdapter",
    model_types=("gemma3_text",),
    provides=frozenset({"scaling_pairs", "roles", "norm_kinds"}),
)
