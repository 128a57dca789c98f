"""Magnitude pruning (llmc's ``Magnitude``): zero the weights of smallest ``|w|``.

``sparse.method: magnitude`` with ``sparse.weight.sparsity`` (unstructured) or
``sparse.weight.mask_structure: N:M``. Data-free. Torch-free module (``llmcq validate``).
"""

from __future__ import annotations

from typing import Literal

from llmcq.api import AlgorithmSpec
from llmcq.config.schema import SpecialConfig

__all__ = ["SPEC", "MagnitudeSpecial"]


class MagnitudeSpecial(SpecialConfig):
    """``sparse.special`` of magnitude pruning."""

    #: unstructured masks: prune the smallest weights of the whole linear ("layer", llmc) or
    #: the same fraction of every output row ("row"); N:M masks are per row by definition
    scope: Literal["layer", "row"] = "layer"


SPEC = AlgorithmSpec(
    name="magnitude",
    summary="magnitude pruning: zero the smallest |w| of each linear (unstructured, per layer "
            "or per row) or of every M consecutive inputs (N:M); data-free",
    impl="llmcq_magnitude.algorithm:Magnitude",
    kind="sparse",
    special=MagnitudeSpecial,
    aliases=("Magnitude",),
    needs_calibration=False,
    sparse_keys=("sparsity", "mask_structure"),
)
