"""Round-to-nearest quantization (llmc's RTN / Naive)."""

from llmcq.api import AlgorithmSpec

__all__ = ["SPEC"]

SPEC = AlgorithmSpec(
    name="rtn",
    aliases=("naive",),
    summary="round-to-nearest weights (min-max or mse range), optional activation quantization",
    impl="llmcq_rtn.algorithm:RTN",
    needs_calibration=False,
    weight_formats=("int", "float"),
)
