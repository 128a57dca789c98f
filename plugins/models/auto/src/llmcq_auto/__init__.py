"""The automatic model adapter (``model.type: auto``, and the default when no family adapter
serves a checkpoint's ``model_type``).

It finds the decoder blocks, their linears, which linears read the same input, and which
norm or linear produces that input by tracing real forward passes (see
:mod:`llmcq_auto.trace`), and verifies every scaling pair by folding a random scale into a
float32 copy of the block and checking the block's output is unchanged. Parts it cannot
verify are reported by name; a recipe with a scaling-based algorithm is then refused before
the first block (:mod:`llmcq_auto.guard`).
"""

from llmcq.api import ModelSpec

__all__ = ["SPEC", "SAFE_ALGORITHMS"]

#: algorithms that use no scaling pairs: allowed whatever the trace could not verify
SAFE_ALGORITHMS = ("rtn", "gptq", "hqq")

SPEC = ModelSpec(
    name="auto",
    aliases=("automatic",),
    summary="any transformers decoder-only model: blocks, linear groups and scaling pairs "
            "found by tracing and verified numerically",
    impl="llmcq_auto.adapter:AutoAdapter",
)
