"""The automatic model adapter (``model.type: auto``, and the default when no family adapter
serves a checkpoint's ``model_type``).

It finds the decoder blocks, their linears, which linears read the same input, and which
norm or linear produces that input by tracing real forward passes (see
:mod:`llmcq_auto.trace`); it infers every linear's role from the data flow and learns every
norm's kind numerically (:mod:`llmcq_auto.infer`), and verifies every scaling pair by
folding a random scale into a float32 copy of the block and checking the block's output is
unchanged. What it cannot verify is reported by name and withheld from the layout facts it
provides (:meth:`llmcq_auto.adapter.AutoAdapter.layout_facts`): core then refuses any
algorithm that needs a withheld fact, with those parts as the reason, before calibration.
"""

from llmcq.api import ModelSpec

__all__ = ["SPEC"]

SPEC = ModelSpec(
    name="auto",
    aliases=("automatic",),
    summary="any transformers decoder-only model: blocks, linear groups, roles, norm kinds "
            "and scaling pairs found by tracing and verified numerically",
    impl="llmcq_auto.adapter:AutoAdapter",
)
