"""The run's typed specs, resolved once from the config (torch-free).

:class:`RunSpecs` is built by :func:`llmcq.config.loader.resolve_config` and handed, the
same objects, to algorithm specs at config time (``check``, ``produces``, ``needs``), to
backend specs (``supports``), to algorithm drivers (``self.weight``, ``self.act``,
``self.sparsity``) and to exporters (``run.specs``). Nothing downstream re-reads the YAML
sections to rebuild a grid.

``weight``/``act`` are the global grids. With ``quant.mix_bits`` or ``ignored_layers``
(``layers``, :mod:`llmcq.layers`) each linear may have its own: once the model is loaded the
run binds the rules to the model's linears (:meth:`RunSpecs.bind`) and
:meth:`RunSpecs.weight_for` / :meth:`RunSpecs.act_for` give each linear's grids by full name
(None: kept in float). Without such rules they return the global grids for every linear.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from llmcq.errors import LlmcqError
from llmcq.layers import BlockLinears, LayerPlan, LayerRules, LayerSpec
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
    #: ``quant.calib_error``: record the calibration output errors (llmcq.quant.calib_error)
    calib_error: bool = True
    #: per-linear settings (``quant.mix_bits``, ``ignored_layers``); None: global grids only
    layers: LayerRules | None = None
    #: ``layers`` bound to the loaded model's linears (:meth:`bind`)
    plan: LayerPlan | None = None

    @classmethod
    def from_config(cls, cfg: RunConfig) -> RunSpecs:
        q, s = cfg.quant, cfg.sparse
        weight = WeightQuantSpec.from_section(q.weight) if q is not None and q.weight else None
        act = ActQuantSpec.from_section(q.act) if q is not None and q.act else None
        sparsity = SparsitySpec.from_section(s) if s is not None else None
        kv = KVQuantSpec.from_section(q.kvcache) if q is not None and q.kvcache else None
        return cls(weight=weight, act=act, kv=kv, sparsity=sparsity,
                   quant_out=bool(q.quant_out) if q is not None else False,
                   calib_error=bool(q.calib_error) if q is not None else True,
                   layers=LayerRules.from_config(cfg, weight, act))

    # ------------------------------------------------------------------ per linear

    @property
    def per_layer(self) -> bool:
        """Whether some linears have their own grids or are kept in float (config rules, or
        a plan set by a program such as a bit-budget search)."""
        return self.layers is not None or self.plan is not None

    def bind(self, prefix: str, blocks: BlockLinears) -> RunSpecs:
        """These specs with ``layers`` matched against a loaded model whose blocks
        ``{prefix}.{i}`` hold the quantizable linears ``blocks[i]`` (names relative to the
        block). Raises a ConfigError naming every entry that matches no linear."""
        if self.layers is None:
            return self
        return replace(self, plan=self.layers.bind(prefix, blocks))

    def layer_for(self, full_name: str) -> LayerSpec:
        """The grids of one linear (full module name): its ``quant.mix_bits`` setting, float
        for ``ignored_layers`` / ``do_quant: False``, else the global ones."""
        if self.plan is not None:
            return self.plan.spec(full_name)
        if self.layers is None:
            return LayerSpec(self.weight, self.act)
        raise LlmcqError("per-layer settings (quant.mix_bits, ignored_layers) are resolved "
                         "once the model is loaded: bind these specs first "
                         "(RunSpecs.bind; a run does it before the first block)")

    def weight_for(self, full_name: str) -> WeightQuantSpec | None:
        """The weight grid of one linear; None when it is kept in float."""
        return self.layer_for(full_name).weight

    def act_for(self, full_name: str) -> ActQuantSpec | None:
        """The activation quantization of one linear's input; None: its input stays float."""
        return self.layer_for(full_name).act

    def variants(self) -> list[tuple[str, RunSpecs]]:
        """Config-time checks: the specs as each ``quant.mix_bits`` setting that quantizes
        sees them (its key, these specs with its weight/act as the global ones)."""
        if self.layers is None:
            return []
        return [(s.path, replace(self, weight=s.spec.weight, act=s.spec.act, layers=None,
                                 plan=None))
                for s in self.layers.quantizing_settings]

    def any_act(self, pred: Callable[[ActQuantSpec], bool] = lambda a: True) -> bool:
        """Whether the global act spec or any setting's satisfies ``pred`` (static ranges
        need calibration data whichever linears they are for)."""
        acts = [self.act] + [v.act for _, v in self.variants()]
        return any(a is not None and pred(a) for a in acts)

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
