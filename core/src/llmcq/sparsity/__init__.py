"""What to prune to: the sparsity structure and spec of the ``sparse`` section (torch-free).

Like granularity, a structure is a value: ``Unstructured()`` or ``NM(2, 4)`` ("at most 2
of every 4 consecutive input weights of a row are kept"), parsed from llmc-style
``sparse.weight.mask_structure`` strings (``unstructured``, ``2:4``, ``4:8``).
Mask helpers that need torch live in :mod:`llmcq.sparsity.masks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from llmcq.config.schema import SparseSection

__all__ = ["Unstructured", "NM", "MaskStructure", "parse_structure", "SparsitySpec",
           "SPARSE_KEYS"]

#: the ``sparse.weight`` / ``sparse`` keys a sparse algorithm may honour; an algorithm lists
#: the ones it reads in ``AlgorithmSpec.sparse_keys`` and core refuses the others when set
SPARSE_KEYS = ("sparsity", "mask_structure", "n_prune_layers")


@dataclass(frozen=True)
class Unstructured:
    """Any weight may be pruned; ``sparsity`` says how many."""

    def __str__(self) -> str:
        return "unstructured"


@dataclass(frozen=True)
class NM:
    """At most ``n`` non-zeros in every ``m`` consecutive input columns of a row."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (self.m >= 2 and 1 <= self.n < self.m):
            raise ValueError(f"N:M structure needs 1 <= N < M and M >= 2, got {self.n}:{self.m}")

    @property
    def sparsity(self) -> float:
        """Fraction of weights pruned: ``1 - n / m``."""
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


MaskStructure = Union[Unstructured, NM]


def parse_structure(text: str) -> MaskStructure:
    """``"unstructured"`` -> ``Unstructured()``; ``"2:4"`` -> ``NM(2, 4)``."""
    t = str(text).strip().lower()
    if t == "unstructured":
        return Unstructured()
    n, sep, m = t.partition(":")
    if sep and n.strip().isdigit() and m.strip().isdigit():
        return NM(int(n), int(m))
    raise ValueError(f"unknown mask structure {text!r}: allowed unstructured or N:M (2:4, 4:8)")


@dataclass(frozen=True)
class SparsitySpec:
    """The resolved ``sparse`` section.

    ``sparsity``: fraction of each pruned linear's weights set to zero (for N:M it is
    ``1 - n/m``; 0 when only ``n_prune_layers`` is set: no weight is masked);
    ``structure``: the mask structure; ``n_prune_layers``: whole blocks to remove
    (ShortGPT-style; None when not asked); ``sparsity_out``: the next block reads the pruned
    block's outputs (llmc) instead of the dense block's.
    """

    sparsity: float
    structure: MaskStructure = Unstructured()
    n_prune_layers: int | None = None
    sparsity_out: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")

    @classmethod
    def from_section(cls, s: SparseSection) -> SparsitySpec:
        w = s.weight
        structure = parse_structure(w.mask_structure) if w is not None else Unstructured()
        if isinstance(structure, NM):
            sparsity = structure.sparsity
        elif w is not None and w.n_prune_layers is not None and \
                "sparsity" not in w.model_fields_set:
            sparsity = 0.0  # whole blocks removed (ShortGPT), no weight masked
        else:
            sparsity = w.sparsity if w is not None else 0.0
        return cls(sparsity=sparsity, structure=structure,
                   n_prune_layers=w.n_prune_layers if w is not None else None,
                   sparsity_out=s.sparsity_out)

    def describe(self) -> str:
        if self.n_prune_layers and not self.sparsity:
            return f"remove {self.n_prune_layers} blocks"
        text = f"sparsity {self.sparsity:g} {self.structure}"
        if self.n_prune_layers:
            text += f", remove {self.n_prune_layers} blocks"
        return text
