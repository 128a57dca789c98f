"""The transformed float model (llmc's ``save_trans``)."""

from llmcq.api import BackendSpec
from llmcq.capabilities import RECORD_FEATURES

__all__ = ["SPEC"]


SPEC = BackendSpec(
    name="trans",
    aliases=("transformed",),
    summary="the transformed float model (before quantization) as a plain HF folder",
    impl="llmcq_trans.export:export",
    folder="transformed_model",
    stage="transformed",
    # the float model before quantization: record features do not reach it (pruned weights
    # are zeros in it), except an online input transform, which it cannot run
    accepts=frozenset(RECORD_FEATURES) - {"input_transform"},
    refusals={"input_transform": "saves the float model, which would need the online "
                                 "input transform at run time to compute the same function"},
)
