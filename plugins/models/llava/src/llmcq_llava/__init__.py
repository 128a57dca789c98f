"""Model adapter for the language model of LLaVA-style vision-language checkpoints."""

from llmcq.api import ModelSpec

__all__ = ["SPEC"]

SPEC = ModelSpec(
    name="llava",
    aliases=("llava_hf", "llava15"),
    summary="LLaVA-1.5 style VLMs (LlavaForConditionalGeneration): the language model is "
            "quantized, the vision tower and projector stay float",
    impl="llmcq_llava.adapter:LlavaAdapter",
    model_types=("llava",),
    provides=frozenset({"scaling_pairs", "roles", "norm_kinds", "rotation_points"}),
)
