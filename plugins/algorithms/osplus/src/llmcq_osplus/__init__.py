"""Outlier Suppression+ (Wei et al. 2023, arXiv:2304.09145): a channel-wise shift
``z = (max + min) / 2`` and a channel-wise scale searched on the quantized output of the
group, both absorbed exactly into the producer norm and the consumer linears.

``quant.method: osplus`` (llmc's spelling ``OsPlus`` works). Torch-free: this module is what
``llmcq validate`` imports.
"""

from __future__ import annotations

from llmcq.api import AlgorithmSpec
from llmcq.config.schema import SpecialConfig
from pydantic import Field

__all__ = ["SPEC", "OsPlusSpecial"]


class OsPlusSpecial(SpecialConfig):
    """``quant.special`` of OS+: llmc's key (``true_sequential``) and three llmcq extensions.

    ```yaml
    quant:
        method: OsPlus
        weight: {bit: 8, symmetric: True, granularity: per_channel}
        act: {bit: 8, symmetric: True, granularity: per_token}
        special:
            true_sequential: True
        quant_out: True
    ```
    """

    #: llmc: measure each group after the groups before it in the block were fake-quantized.
    true_sequential: bool = False
    #: llmcq extension. Unset (llmc's behaviour): shift a group exactly when its producer norm
    #: and every consumer linear have a bias to absorb it (OPT, BLOOM; never Llama).
    #: ``true``: require the shift (a run stops with an error on a group without biases);
    #: ``false``: scale only.
    use_shift: bool | None = None
    #: llmcq extension: calibration batches the scale search scores (llmc: the first one).
    #: Channel ranges always use every batch.
    search_batches: int = Field(1, ge=1)
    #: llmcq extension: number of threshold steps; unset = llmc's ``max(100, max(X) / 0.5)``.
    search_steps: int | None = Field(None, ge=1)


SPEC = AlgorithmSpec(
    name="osplus",
    summary="Outlier Suppression+: channel-wise shift and scale (norm -> linears) searched on "
            "the quantized output, then the run's quantizer",
    impl="llmcq_osplus.algorithm:OsPlus",
    paper="https://arxiv.org/abs/2304.09145",
    special=OsPlusSpecial,
    needs_calibration=True,
    supports_act=True,
    layout_needs=("scaling_pairs",),
    # the search's loss quantizes each linear on its own grids; groups kept in float are
    # not transformed
    per_layer_specs=True,
)
