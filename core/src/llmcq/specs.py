"""The run's typed specs, resolved once from the config (torch-free).

:class:`RunSpecs` is built by :func:`llmcq.config.loader.resolve_config` and handed, the
same objects, to algorithm specs at config time (``check``, ``produces``, ``needs``), to
backend specs (``supports``), to algorithm drivers (``self.weight``, ``self.act``,
``self.sparsity``) and to exporters (``run.specs``). Nothing downstream re-reads the YAML
sections to rebuild a grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmcq.quant.spec import ActQuantSpec, KVQuantSpec, WeightQuantSpec
from llmcq.sparsity import SparsitySpec

if TYPE_CHECKING:
    from llmcq.config.schema import RunConfig

__all__ = ["RunSpecs"]


@dataclass(frozen=True)
class RunSpecs:
    """What the run quantizes and prunes to. ``None`` where the config asks for nothing."""

    weight: WeightQuantSpec | None = None
    act: ActQuantSpec | None = None
    kv: KVQuantSpec | None = None
    sparsity: SparsitySpec | None = None
    #: llmc's ``quant.quant_out``: each block reads the quantized outputs of the one before
    quant_out: bool = False

    @classmethod
    def from_config(cls, cfg: RunConfig) -> RunSpecs:
        q, s = cfg.quant, cfg.sparse
        weight = WeightQuantSpec.from_section(q.weight) if q is not None and q.weight else None
        act = ActQuantSpec.from_section(q.act) if q is not None and q.act else None
        sparsity = SparsitySpec.from_section(s) if s is not None else None
        return cls(weight=weight, act=act, kv=None, sparsity=sparsity,
                   quant_out=bool(q.quant_out) if q is not None else False)

    def describe(self) -> str:
        parts = []
        if self.weight is not None:
            parts.append(self.weight.describe())
        if self.act is not None:
            parts.append(self.act.describe())
        if self.kv is not None:
            parts.append(self.kv.describe())
        if self.sparsity is not None:
            parts.append(self.sparsity.describe())
        return ", ".join(parts) or "nothing"
