"""The public plugin contract: the specs entry points point at.

An entry point in ``llmcq.algorithms``, ``llmcq.models``, ``llmcq.backends``, ``llmcq.datasets``
or ``llmcq.evaluators`` targets a *spec*: a cheap, torch-free object that names the plugin,
holds its config class and the import string of its implementation. ``llmcq plugins`` and
``llmcq validate`` read specs only; a run imports the implementation (``spec.load_impl()``)
when it needs it. See CONTRIBUTING.md for worked examples.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from llmcq.config.schema import SpecialConfig
from llmcq.errors import ConfigError, PluginLoadError

if TYPE_CHECKING:
    from llmcq.capabilities import Feature, Need
    from llmcq.config.schema import QuantSection, RunConfig
    from llmcq.layers import LayerPlan
    from llmcq.specs import RunSpecs

__all__ = [
    "API_VERSION",
    "PluginSpec",
    "AlgorithmSpec",
    "StepSettings",
    "ModelSpec",
    "BackendSpec",
    "ExportTarget",
    "LayerTarget",
    "EvaluatorSpec",
    "GROUPS",
]

#: Major version of this contract. A spec built for another major version is refused at load.
API_VERSION = 2

#: entry-point group for each kind of plugin
GROUPS = {
    "algorithm": "llmcq.algorithms",
    "model": "llmcq.models",
    "backend": "llmcq.backends",
    "dataset": "llmcq.datasets",
    "evaluator": "llmcq.evaluators",
}


class NoSpecial(SpecialConfig):
    """``quant.special`` for an algorithm that takes no special keys."""


@dataclass(frozen=True, kw_only=True)
class PluginSpec:
    """What an entry point points at. Subclasses add the fields of their kind.

    ``impl`` is ``"module:attribute"``; it is imported only when a run uses the plugin.
    ``aliases`` are extra names the plugin answers to (matched case-insensitively, like
    ``name``), for example llmc's spellings.
    """

    group: ClassVar[str] = ""
    name: str
    summary: str = ""
    impl: str = ""
    aliases: tuple[str, ...] = ()
    paper: str | None = None
    #: install hint shown when the implementation fails to import (e.g. "pip install hqq")
    requires: tuple[str, ...] = ()
    api: int = API_VERSION

    def load_impl(self) -> Any:
        """Import and return the implementation named by ``impl``."""
        if not self.impl or ":" not in self.impl:
            raise PluginLoadError(f"plugin {self.name!r} has no valid impl string "
                                  f"(got {self.impl!r}; expected 'module:attribute')")
        module_name, _, attr = self.impl.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            hint = f"; install: {' '.join(self.requires)}" if self.requires else ""
            raise PluginLoadError(
                f"plugin {self.name!r}: cannot import {module_name!r}: {exc}{hint}") from exc
        try:
            obj = module
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError as exc:
            raise PluginLoadError(f"plugin {self.name!r}: {self.impl!r} not found: {exc}") from exc
        return obj

    def all_names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


@dataclass(frozen=True)
class StepSettings:
    """One recipe step as its algorithm sees it at config time (torch-free).

    ``specs``: the run's typed specs (the same objects the driver and the exporters get);
    ``special``: the step's validated ``special`` config; ``index``/``methods``: where the
    step sits in its section's recipe (``methods`` as written); ``section``: ``"quant"`` or
    ``"sparse"``; ``config``: the whole typed config, for keys beyond the specs.
    """

    specs: RunSpecs
    special: SpecialConfig
    index: int
    methods: tuple[str, ...]
    section: str
    config: RunConfig

    @property
    def method_path(self) -> str:
        """``quant.method``, or ``quant.method[i]`` in a list."""
        base = f"{self.section}.method"
        return base + (f"[{self.index}]" if len(self.methods) > 1 else "")

    @property
    def special_path(self) -> str:
        """``quant.special``, or ``quant.special.<method>`` in a list."""
        base = f"{self.section}.special"
        return base + (f".{self.methods[self.index]}" if len(self.methods) > 1 else "")

    def key(self, name: str) -> str:
        """The full path of one of the step's special keys (for error messages)."""
        return f"{self.special_path}.{name}"

    @property
    def quant(self) -> QuantSection | None:
        return self.config.quant


@dataclass(frozen=True, kw_only=True)
class AlgorithmSpec(PluginSpec):
    """An algorithm (``quant.method`` or ``sparse.method``).

    Declarations (all read at config time, before any model is loaded):

    * :meth:`check`: refuse settings the algorithm cannot honour;
    * :meth:`produces`: the record features (:data:`llmcq.capabilities.RECORD_FEATURES`)
      its results contain with these settings; backends that cannot write one are refused;
    * :meth:`needs`: the layout facts (:data:`llmcq.capabilities.LAYOUT_FEATURES`) it uses;
      adapters that do not provide one are refused;
    * :meth:`wants_calibration`: whether this run of it needs calibration data.

    ``impl`` names an :class:`llmcq.algorithm.Algorithm` subclass.
    """

    group: ClassVar[str] = "llmcq.algorithms"
    #: "quant" algorithms go in ``quant.method``, "sparse" ones in ``sparse.method``.
    kind: str = "quant"
    special: type[SpecialConfig] = NoSpecial
    #: whether the algorithm needs calibration data at all (RTN weight-only does not).
    needs_calibration: bool = False
    #: whether it accepts activation quantization (``quant.act``); off unless declared.
    supports_act: bool = False
    #: weight ``calib_algo`` values it understands.
    weight_calib_algos: tuple[str, ...] = ("minmax", "mse")
    #: element types it can quantize to: "int" (integer grids, ``quant_type: int-quant``)
    #: and/or "float" (FP8, ``quant_type: float-quant``), for weights and activations alike.
    #: Declare "float" only if every grid the algorithm touches goes through core's
    #: spec-aware functions (``fit_weight_qparams``, ``quantize_weight``,
    #: ``fake_quantize_weight``, ``fake_quantize_act``, ``llmcq.quant.clip``).
    weight_formats: tuple[str, ...] = ("int",)
    #: sparse algorithms: the keys of :data:`llmcq.sparsity.SPARSE_KEYS` it honours; a key
    #: set in the config and honoured by no step is refused
    sparse_keys: tuple[str, ...] = ()
    #: quantizing algorithms: whether ``quantize`` keeps the pruned weights of an earlier
    #: sparse step at zero while it optimizes (``block.masks``); core zeroes them in the
    #: records either way, and notes when the algorithm ignored them
    uses_masks: bool = False
    #: layout facts (:data:`llmcq.capabilities.LAYOUT_FEATURES`) every run of the algorithm
    #: needs; override :meth:`needs` when it depends on the settings
    layout_needs: tuple[str, ...] = ()
    #: quantizing algorithms: whether every grid, search loss and learned parameter uses
    #: each linear's own spec (``Algorithm.weight_of`` / ``act_of``) and linears kept in
    #: float get no record, so ``quant.mix_bits`` and ``ignored_layers`` are honoured;
    #: without it a config with either is refused
    per_layer_specs: bool = False

    def check(self, step: StepSettings) -> None:
        """Raise :class:`ConfigError` for settings this algorithm cannot honour. Overrides
        call ``super().check(step)`` first."""
        specs, quant = step.specs, step.quant
        if self.kind == "quant" and specs.weight is None and not self.supports_weightless():
            raise ConfigError("quant.weight", None, reason=f"{self.name} needs a quant.weight "
                              "section (bit, symmetric, granularity, group_size)",
                              show_value=False)
        if specs.act is not None and not self.supports_act:
            raise ConfigError("quant.act", "present",
                              reason=f"{self.name} is weight-only; remove quant.act",
                              show_value=False)
        for sec_path, sec in (("quant.weight", specs.weight), ("quant.act", specs.act)):
            kind = "float" if sec is not None and sec.is_float else "int"
            if sec is not None and kind not in self.weight_formats:
                allowed = tuple(f"{k}-quant" for k in self.weight_formats)
                raise ConfigError(f"{sec_path}.quant_type",
                                  "float-quant" if kind == "float" else "int-quant",
                                  allowed=allowed, reason=f"{self.name} does not quantize to "
                                  f"{'FP8' if kind == 'float' else 'integer'} grids")
        if quant is not None and quant.weight is not None and \
                quant.weight.calib_algo not in self.weight_calib_algos:
            raise ConfigError("quant.weight.calib_algo", quant.weight.calib_algo,
                              allowed=self.weight_calib_algos,
                              reason=f"not supported by {self.name}")

    def produces(self, step: StepSettings) -> list[Feature]:
        """Record features this step's results contain (beyond what the specs bring)."""
        return []

    def needs(self, step: StepSettings) -> list[Need]:
        """Layout facts this step uses with these settings (default: ``layout_needs``)."""
        from llmcq.capabilities import Need

        return [Need(n, step.method_path, step.methods[step.index], source=self.name)
                for n in self.layout_needs]

    def supports_weightless(self) -> bool:
        """True for transforms that quantize nothing themselves (e.g. a pure smoothing pass)."""
        return False

    def wants_calibration(self, step: StepSettings) -> bool:
        """Whether this run of the algorithm needs calibration data."""
        return self.needs_calibration

    def describe(self) -> dict[str, Any]:
        """What ``llmcq plugins --describe`` prints: keys and declared capabilities."""
        return {"kind": self.kind, "needs_calibration": self.needs_calibration,
                "supports_act": self.supports_act, "weight_formats": list(self.weight_formats),
                "weight_calib_algos": list(self.weight_calib_algos),
                "sparse_keys": list(self.sparse_keys), "uses_masks": self.uses_masks,
                "layout_needs": list(self.layout_needs),
                "per_layer_specs": self.per_layer_specs}


@dataclass(frozen=True, kw_only=True)
class ModelSpec(PluginSpec):
    """A model-family adapter (``model.type``). ``impl`` names a ``ModelAdapter`` subclass."""

    group: ClassVar[str] = "llmcq.models"
    #: Hugging Face ``config.model_type`` values served when ``model.type`` is absent.
    model_types: tuple[str, ...] = ()
    #: layout facts (:data:`llmcq.capabilities.LAYOUT_FEATURES`) the adapter provides, checked
    #: at config time; ``None``: known only once the model is loaded (tracing adapters), then
    #: checked before calibration. Core also checks the loaded layout itself either way.
    provides: frozenset[str] | None = None


@dataclass(frozen=True)
class ExportTarget:
    """What a backend's :meth:`BackendSpec.supports` checks (torch-free): the typed config,
    the run's typed specs, the save key that selected the backend (``path``) and the record
    features the run will produce (already checked against ``accepts``)."""

    config: RunConfig
    specs: RunSpecs
    path: str
    features: tuple[Feature, ...] = ()

    def has(self, name: str) -> bool:
        return any(f.name == name for f in self.features)


@dataclass(frozen=True)
class LayerTarget:
    """What a backend's :meth:`BackendSpec.check_layers` checks once the model is loaded and
    before any block runs: every quantizable linear's grids (``plan``), the save key that
    selected the backend (``path``), and the sets of linears serving engines run as one
    kernel: per block, each group of linears reading one input (q/k/v, gate/up:
    ``shared_input``, full names) and the MoE experts' linears (``experts``)."""

    plan: LayerPlan
    path: str
    shared_input: tuple[tuple[str, ...], ...] = ()
    experts: tuple[tuple[str, ...], ...] = ()


@dataclass(frozen=True, kw_only=True)
class BackendSpec(PluginSpec):
    """An export backend (``save.save_<x>`` flags or ``save.backends``).

    ``impl`` names an exporter: a callable ``export(run, model, records, out_dir) -> list[Path]``
    writing into ``out_dir``, a fresh temporary folder core renames into place afterwards.
    """

    group: ClassVar[str] = "llmcq.backends"
    #: sub-folder of ``save.save_path`` (llmc names: transformed_model, fake_quant_model, ...)
    folder: str = ""
    #: "transformed": exported before fake quantization (the float, transformed model);
    #: "quantized": exported after, from the quantized-linear records.
    stage: str = "quantized"
    #: record features (:data:`llmcq.capabilities.RECORD_FEATURES`) this backend writes
    #: faithfully; every other feature a run produces is refused at config time
    accepts: frozenset[str] = frozenset()
    #: features accepted only with some details, e.g. ``{"sparsity_mask": ("2:4",)}``
    accepts_detail: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: the backend's own sentence for refusing a feature (shown instead of the generic one)
    refusals: Mapping[str, str] = field(default_factory=dict)

    def supports(self, target: ExportTarget) -> None:
        """Raise :class:`ConfigError` if the run's grids cannot be exported here (record
        features were already checked against :attr:`accepts`). Overrides call
        ``super().supports(target)`` first."""
        if self.stage == "quantized" and target.specs.weight is None:
            raise ConfigError(target.path, True, reason=f"backend {self.name!r} exports a "
                              "quantized model, but the config has no quant.weight section")

    def check_layers(self, target: LayerTarget) -> None:
        """Raise :class:`ConfigError` if the run's per-linear grids (``quant.mix_bits``,
        ``ignored_layers``; ``layer_grids`` and ``float_linears`` were already checked against
        :attr:`accepts`) cannot be written for this model, e.g. linears an engine fuses given
        different grids. Called only for runs with per-linear settings."""

    def describe(self) -> dict[str, Any]:
        return {"stage": self.stage, "folder": self.folder, "accepts": sorted(self.accepts),
                "accepts_detail": {k: list(v) for k, v in self.accepts_detail.items()}}

    @staticmethod
    def linear_in_features(config: RunConfig) -> dict[str, int] | None:
        """Input widths of a transformer block's linears, read from the checkpoint's config
        without loading weights or torch: ``{"hidden": .., "attn_out": .., "mlp": ..}``
        (``"moe_mlp"`` too for MoE configs). ``None`` when the checkpoint cannot be read.

        Backends use it to refuse, at config time, group sizes their format cannot hold
        (a group must divide every input width).
        """
        from llmcq.model.loading import locate, peek_dims

        try:
            d = peek_dims(locate(config.model.path))
        except ConfigError:
            return None
        if d is None:
            return None
        dims = {"hidden": d["hidden"], "attn_out": d["heads"] * d["head_dim"], "mlp": d["inter"],
                "moe_mlp": d["moe_inter"]}
        return {k: v for k, v in dims.items() if v > 0}


@dataclass(frozen=True, kw_only=True)
class EvaluatorSpec(PluginSpec):
    """An evaluator (``eval.type``). ``impl`` names ``evaluate(run, model, eval_cfg, position)``."""

    group: ClassVar[str] = "llmcq.evaluators"
    #: True: the evaluator scores ``eval.tasks`` (lm-evaluation-harness tasks) read under
    #: ``eval.path``; the loader then resolves no ``eval.name`` datasets and leaves the checks
    #: of ``tasks``, ``limit`` and ``path`` to :meth:`check`. False: ``tasks`` and ``limit``
    #: are refused.
    reads_tasks: bool = False

    def check(self, section: Any, prefix: str) -> None:
        """Refuse, at config time and torch-free, an ``eval`` block (``section``, an
        :class:`~llmcq.config.schema.EvalSection`) this evaluator cannot honour: raise
        :class:`~llmcq.errors.ConfigError` naming ``f"{prefix}.<key>"``. Default: accept."""
