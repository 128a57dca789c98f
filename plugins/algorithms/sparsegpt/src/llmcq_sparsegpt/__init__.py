"""SparseGPT (Frantar & Alistarh 2023, arXiv:2301.00774): one-shot pruning that updates the
kept weights to compensate (OBS with the layer Hessian), unstructured or N:M; beside a
``quant`` section whose method is RTN, the kept weights are quantized in the same sweep (the
paper's joint 50% + 4-bit). Torch-free module (``llmcq validate`` reads it).
"""

from __future__ import annotations

from pydantic import Field

from llmcq.api import AlgorithmSpec, StepSettings
from llmcq.config.schema import SpecialConfig
from llmcq.errors import ConfigError

__all__ = ["SPEC", "SparseGPTSpecial", "SparseGPTSpec", "joint_quant_active"]


class SparseGPTSpecial(SpecialConfig):
    """``sparse.special`` of SparseGPT."""

    #: lazy-batch width: columns swept before the rest of the weight is updated at once;
    #: unstructured masks are chosen for this many columns at a time (the paper's B_s)
    blocksize: int = Field(128, ge=1)
    #: damping of the Hessian, as a fraction of its mean diagonal
    percdamp: float = Field(0.01, ge=0.0)
    #: retries with 10x the damping when the Cholesky factorization fails
    damp_retries: int = Field(4, ge=0, le=12)
    #: with ``quant.method: RTN`` beside ``sparse``: quantize the kept weights in the pruning
    #: sweep (SparseGPT's joint mode; the records come from it); False: prune only, RTN then
    #: rounds the pruned weights
    joint_quant: bool = True


def joint_quant_active(step: StepSettings) -> bool:
    """Joint pruning + quantization: asked for, and the quant recipe is RTN alone (a
    quantizer with a sweep of its own, GPTQ say, quantizes the pruned weights after)."""
    q = step.quant
    if not getattr(step.special, "joint_quant", False) or q is None or q.weight is None:
        return False
    from llmcq.plugins import registry

    return [registry.normalize(m) for m in q.methods] in (["rtn"], ["naive"])


class SparseGPTSpec(AlgorithmSpec):
    def check(self, step: StepSettings) -> None:
        super().check(step)
        if not joint_quant_active(step):
            return
        w = step.specs.weight
        assert w is not None
        if w.is_float:
            raise ConfigError("quant.weight.quant_type", "float-quant", allowed=("int-quant",),
                              reason="SparseGPT's joint sweep rounds onto integer grids; "
                              f"set {step.key('joint_quant')}: False to prune first and let "
                              "RTN quantize after")


SPEC = SparseGPTSpec(
    name="sparsegpt",
    summary="SparseGPT: OBS pruning with Hessian-based weight updates, lazy column blocks, "
            "unstructured or N:M; joint with RTN-grid quantization of the kept weights",
    impl="llmcq_sparsegpt.algorithm:SparseGPT",
    kind="sparse",
    special=SparseGPTSpecial,
    aliases=("SparseGPT",),
    paper="https://arxiv.org/abs/2301.00774",
    needs_calibration=True,
    supports_act=True,
    per_layer_specs=True,
    weight_formats=("int", "float"),
    sparse_keys=("sparsity", "mask_structure"),
)
