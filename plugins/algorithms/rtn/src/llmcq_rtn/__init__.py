"""Round-to-nearest quantization (llmc's RTN / Naive)."""

from llmcq.api import AlgorithmSpec

__all__ = ["SPEC"]

SPEC = AlgorithmSpec(
    name="rtn",
    aliases=("naive",),
    summary="round-to-nearest weights (min-max or mse range), optional activation quantization",
    impl="llmcq_rtn.algorithm:RTN",
    needs_calibration=False,
    supports_act=True,
    # quantizing a pruned (zero) weight on any grid with a zero code keeps it at zero, and
    # core masks the records: nothing for RTN to optimise around the masks
    uses_masks=True,
    weight_formats=("int", "float"),
    per_layer_specs=True,
)
