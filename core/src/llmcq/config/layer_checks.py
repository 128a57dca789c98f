"""Config-time checks of per-linear settings (``quant.mix_bits``, ``ignored_layers``).

Each ``quant.mix_bits`` setting that quantizes is a second set of grids: every check the
global ``quant.weight``/``quant.act`` go through (element types, each algorithm's
``check`` and ``produces``, each backend's ``supports``) runs again with the setting's
sections in their place, and what it reports is moved to the setting's keys
(``quant.weight.bit`` -> ``quant.mix_bits.setting_0.weight.bit``). Name matching needs the
model and runs when it is loaded (:meth:`llmcq.specs.RunSpecs.bind`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from llmcq.api import ExportTarget, StepSettings
from llmcq.capabilities import Feature, spec_features
from llmcq.errors import ConfigError, relocated

if TYPE_CHECKING:
    from llmcq.api import AlgorithmSpec, BackendSpec
    from llmcq.config.schema import RunConfig
    from llmcq.specs import RunSpecs

__all__ = ["check_layer_sections", "check_layer_steps", "layer_step_features",
           "check_layer_backend", "setting_variants"]


def setting_variants(cfg: RunConfig, specs: RunSpecs) -> Iterator[tuple[str, RunConfig,
                                                                          RunSpecs]]:
    """``(setting key, config, specs)`` for each quantizing ``quant.mix_bits`` setting, the
    config and specs holding the setting's weight/act as the global ones."""
    quant = cfg.quant
    if quant is None or not quant.mix_bits:
        return
    for path, vspecs in specs.variants():
        section = quant.mix_bits[path.rsplit(".", 1)[-1]]
        vquant = quant.model_copy(update={"weight": section.weight, "act": section.act,
                                          "mix_bits": None})
        yield path, cfg.model_copy(update={"quant": vquant}), vspecs


def _moves(path: str) -> dict[str, str]:
    return {"quant.weight": f"{path}.weight", "quant.act": f"{path}.act"}


def _at(path: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` with its ConfigError reported at the setting's keys."""
    try:
        return fn()
    except ConfigError as exc:
        raise relocated(exc, _moves(path), note=f"with the grids of {path}") from None


def check_layer_sections(cfg: RunConfig, specs: RunSpecs,
                         check_types: Callable[[Any], None]) -> None:
    """``ignored_layers`` needs quantization; each setting's sections pass the element-type
    rules of the global ones (``check_types``: the loader's ``check_quant_types``)."""
    if cfg.ignored_layers is not None and cfg.quant is None:
        raise ConfigError("ignored_layers", None, show_value=False, reason="keeps some linears "
                          "out of quantization, but the config has no quant section")
    for path, vcfg, _ in setting_variants(cfg, specs):
        _at(path, lambda vcfg=vcfg: check_types(vcfg.quant))


def check_layer_steps(cfg: RunConfig, specs: RunSpecs, steps: list[Any]) -> None:
    """Every quantizing step must honour per-linear settings (``per_layer_specs``), and
    accept each setting's grids (its ``check`` with them)."""
    if specs.layers is None:
        return
    key = "quant.mix_bits" if cfg.quant is not None and cfg.quant.mix_bits else \
        "ignored_layers"
    for st in steps:
        spec: AlgorithmSpec = st.spec
        if st.section != "quant" or spec.per_layer_specs:
            continue
        raise ConfigError(key, None, show_value=False, reason=f"{spec.name} "
                          f"({st.settings.method_path}) does not honour per-linear settings "
                          "(AlgorithmSpec.per_layer_specs); remove the key or use an "
                          "algorithm that does (llmcq plugins --describe NAME shows it)")
    for st in steps:
        if st.section != "quant" or not _passes(st.spec, st.settings):
            continue  # a step refused with the global grids is reported once, there
        for path, vcfg, vspecs in setting_variants(cfg, specs):
            settings = replace(st.settings, specs=vspecs, config=vcfg)
            _at(path, lambda s=settings, a=st.spec: a.check(s))


def _passes(spec: AlgorithmSpec, settings: StepSettings) -> bool:
    try:
        spec.check(settings)
    except ConfigError:
        return False
    return True


def layer_step_features(cfg: RunConfig, specs: RunSpecs, steps: list[Any]) -> list[Feature]:
    """Record features the settings' grids bring (FP8, activation quantization, fractional
    zeros, an algorithm's own features with those grids), at the settings' keys."""
    out: list[Feature] = []
    for path, vcfg, vspecs in setting_variants(cfg, specs):
        found = spec_features(vspecs)
        for st in steps:
            settings: StepSettings = replace(st.settings, specs=vspecs, config=vcfg)
            found += st.spec.produces(settings)
        for f in found:
            field = next((new + f.field[len(old):] for old, new in _moves(path).items()
                          if f.field == old or f.field.startswith(old + ".")), f.field)
            out.append(replace(f, field=field))
    return out


def check_layer_backend(backend: BackendSpec, cfg: RunConfig, specs: RunSpecs, path: str,
                        features: list[Feature]) -> None:
    """The backend's grid checks (``supports``) on each setting's grids."""
    for setting, vcfg, vspecs in setting_variants(cfg, specs):
        target = ExportTarget(vcfg, vspecs, path, tuple(features))
        _at(setting, lambda t=target: backend.supports(t))
