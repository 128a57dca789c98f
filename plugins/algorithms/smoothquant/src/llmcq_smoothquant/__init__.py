"""SmoothQuant (Xiao et al. 2022, arXiv:2211.10438): migrate activation outliers into the
weights with a per-channel scale, ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``.

``quant.method: smoothquant`` (llmc's spelling ``SmoothQuant`` works). Torch-free: this
module is what ``llmcq validate`` imports.
"""

from __future__ import annotations

from llmcq.api import AlgorithmSpec
from llmcq.config.schema import SpecialConfig
from pydantic import Field

__all__ = ["SPEC", "SmoothQuantSpecial"]


class SmoothQuantSpecial(SpecialConfig):
    """``quant.special`` of SmoothQuant (llmc's keys and defaults).

    ```yaml
    quant:
        method: SmoothQuant
        weight: {bit: 8, symmetric: True, granularity: per_channel}
        act: {bit: 8, symmetric: True, granularity: per_token}
        special:
            alpha: 0.8
    ```
    """

    #: migration strength: 0 puts all the difficulty on the activations, 1 on the weights.
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    #: re-measure each group's activations after the groups before it in the block were
    #: fake-quantized (round-to-nearest weights, the run's activation quantizer).
    true_sequential: bool = False


SPEC = AlgorithmSpec(
    name="smoothquant",
    summary="SmoothQuant: per-channel smoothing of activation outliers into the weights "
            "(norm -> linears), then the run's quantizer",
    impl="llmcq_smoothquant.algorithm:SmoothQuant",
    paper="https://arxiv.org/abs/2211.10438",
    special=SmoothQuantSpecial,
    needs_calibration=True,
    supports_act=True,
    layout_needs=("scaling_pairs",),
    # scales come from max|X| and max|W| only; its fake quantization (true_sequential) and
    # the run's quantizer go through core's spec-aware functions: FP8 works too
    weight_formats=("int", "float"),
    # true_sequential's fake quantization uses each linear's grids; groups kept in float
    # are not smoothed
    per_layer_specs=True,
)
