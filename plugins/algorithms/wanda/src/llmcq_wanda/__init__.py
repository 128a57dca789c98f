"""Wanda (Sun et al. 2023, arXiv:2306.11695), llmc's ``Wanda``: prune the weights of lowest
``|W_ij| * ||X_j||_2``, compared within each output row (or each N:M group of a row).

``sparse.method: Wanda`` with ``sparse.weight.sparsity`` (unstructured, per row) or
``sparse.weight.mask_structure: N:M``; ``sparse.sparsity_out`` as llmc. No special keys.
Torch-free module (``llmcq validate`` reads it).
"""

from __future__ import annotations

from llmcq.api import AlgorithmSpec

__all__ = ["SPEC"]

SPEC = AlgorithmSpec(
    name="wanda",
    summary="Wanda pruning: zero the weights of lowest |w| * ||x||_2 per output row "
            "(unstructured) or per N:M group, from calibration activations",
    impl="llmcq_wanda.algorithm:Wanda",
    kind="sparse",
    aliases=("Wanda",),
    paper="https://arxiv.org/abs/2306.11695",
    needs_calibration=True,
    # pruning is independent of how a quant section beside it quantizes
    supports_act=True,
    weight_formats=("int", "float"),
    sparse_keys=("sparsity", "mask_structure"),
)
