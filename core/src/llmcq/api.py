"""The public plugin contract: the specs entry points point at.

An entry point in ``llmcq.algorithms``, ``llmcq.models``, ``llmcq.backends``, ``llmcq.datasets``
or ``llmcq.evaluators`` targets a *spec*: a cheap, torch-free object that names the plugin,
holds its config class and the import string of its implementation. ``llmcq plugins`` and
``llmcq validate`` read specs only; a run imports the implementation (``spec.load_impl()``)
when it needs it. See CONTRIBUTING.md for worked examples.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from llmcq.config.schema import SpecialConfig
from llmcq.errors import ConfigError, PluginLoadError

if TYPE_CHECKING:
    from llmcq.config.schema import QuantSection, RunConfig

__all__ = [
    "API_VERSION",
    "PluginSpec",
    "AlgorithmSpec",
    "ModelSpec",
    "BackendSpec",
    "EvaluatorSpec",
    "GROUPS",
]

#: Major version of this contract. A spec built for another major version is refused at load.
API_VERSION = 1

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


@dataclass(frozen=True, kw_only=True)
class AlgorithmSpec(PluginSpec):
    """An algorithm (``quant.method`` or ``sparse.method``).

    Override :meth:`check` to refuse unsupported settings at config time, before any model is
    loaded. ``impl`` names an :class:`llmcq.algorithm.Algorithm` subclass.
    """

    group: ClassVar[str] = "llmcq.algorithms"
    #: "quant" algorithms go in ``quant.method``, "sparse" ones in ``sparse.method``.
    kind: str = "quant"
    special: type[SpecialConfig] = NoSpecial
    #: whether the algorithm needs calibration data at all (RTN weight-only does not).
    needs_calibration: bool = False
    #: whether it accepts activation quantization (``quant.act``).
    supports_act: bool = True
    #: weight ``calib_algo`` values it understands.
    weight_calib_algos: tuple[str, ...] = ("minmax", "mse")
    #: element types it can quantize to: "int" (integer grids, ``quant_type: int-quant``)
    #: and/or "float" (FP8, ``quant_type: float-quant``), for weights and activations alike.
    #: Declare "float" only if every grid the algorithm touches goes through core's
    #: spec-aware functions (``fit_weight_qparams``, ``quantize_weight``,
    #: ``fake_quantize_weight``, ``fake_quantize_act``, ``llmcq.quant.clip``).
    weight_formats: tuple[str, ...] = ("int",)

    def check(self, quant: QuantSection, special: SpecialConfig, *, path: str) -> None:
        """Raise :class:`ConfigError` for settings this algorithm cannot honour."""
        if quant.weight is None and self.kind == "quant" and not self.supports_weightless():
            raise ConfigError("quant.weight", None, reason=f"{self.name} needs a quant.weight "
                              "section (bit, symmetric, granularity, group_size)",
                              show_value=False)
        if quant.act is not None and not self.supports_act:
            raise ConfigError("quant.act", "present",
                              reason=f"{self.name} is weight-only; remove quant.act",
                              show_value=False)
        for sec_path, sec in (("quant.weight", quant.weight), ("quant.act", quant.act)):
            kind = "float" if sec is not None and sec.is_float else "int"
            if sec is not None and kind not in self.weight_formats:
                allowed = tuple(f"{k}-quant" for k in self.weight_formats)
                raise ConfigError(f"{sec_path}.quant_type", sec.quant_type, allowed=allowed,
                                  reason=f"{self.name} does not quantize to "
                                  f"{'FP8' if kind == 'float' else 'integer'} grids")
        if quant.weight is not None and quant.weight.calib_algo not in self.weight_calib_algos:
            raise ConfigError("quant.weight.calib_algo", quant.weight.calib_algo,
                              allowed=self.weight_calib_algos,
                              reason=f"not supported by {self.name}")

    def supports_weightless(self) -> bool:
        """True for transforms that quantize nothing themselves (e.g. a pure smoothing pass)."""
        return False

    def wants_calibration(self, quant: QuantSection | None, special: SpecialConfig) -> bool:
        """Whether this run of the algorithm needs calibration data."""
        return self.needs_calibration


@dataclass(frozen=True, kw_only=True)
class ModelSpec(PluginSpec):
    """A model-family adapter (``model.type``). ``impl`` names a ``ModelAdapter`` subclass."""

    group: ClassVar[str] = "llmcq.models"
    #: Hugging Face ``config.model_type`` values served when ``model.type`` is absent.
    model_types: tuple[str, ...] = ()


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
    #: record element types it writes: "int" (integer codes) and/or "float" (FP8 codes,
    #: ``quant_type: float-quant``); the default refuses FP8 runs at config time.
    weight_formats: tuple[str, ...] = ("int",)

    def supports(self, config: RunConfig, *, path: str) -> None:
        """Raise :class:`ConfigError` if the run's settings cannot be exported here."""
        if self.stage == "quantized" and config.quant is None:
            raise ConfigError(path, True, reason=f"backend {self.name!r} exports a quantized "
                              "model, but the config has no quant section")
        if self.stage != "quantized" or config.quant is None:
            return
        for sec_path, sec in (("quant.weight", config.quant.weight),
                              ("quant.act", config.quant.act)):
            if sec is not None and sec.is_float and "float" not in self.weight_formats:
                raise ConfigError(f"{sec_path}.quant_type", sec.quant_type,
                                  allowed=tuple(f"{k}-quant" for k in self.weight_formats),
                                  reason=f"backend {self.name!r} writes integer codes only; "
                                  "FP8 (float-quant) runs export through vllm, sglang or fake")

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
