"""Config-time checks of ``quant.bit_budget`` (torch-free).

The search gives each linear one of ``widths``, each the grid of ``quant.weight`` at that
bit. So: nothing else may decide widths (``quant.mix_bits``), the run must be weight-only on
an integer grid and not pruned (the sensitivities are measured on the float model), every
quantizing algorithm must honour per-linear grids, and each width's grid goes through every
check the global grid does (each algorithm's ``check``, each backend's ``supports``),
reported at ``quant.bit_budget.widths[i]``. Whether the target is reachable needs the
model's shapes and is checked once it is loaded, before any block is quantized.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from llmcq.capabilities import Feature
from llmcq.errors import ConfigError, relocated

if TYPE_CHECKING:
    from llmcq.api import BackendSpec
    from llmcq.config.schema import RunConfig
    from llmcq.specs import RunSpecs

__all__ = ["check_budget_sections", "check_budget_steps", "budget_features",
           "check_budget_backend", "width_variants", "fractional_zero_widths", "BUDGET"]

#: the config key of the search
BUDGET = "quant.bit_budget"


def width_variants(cfg: RunConfig, specs: RunSpecs) -> Iterator[tuple[str, int, RunConfig,
                                                                        RunSpecs]]:
    """``(key of the width, width, config, specs)`` for each candidate width, with
    ``quant.weight`` at that bit as the global grid."""
    q = cfg.quant
    if q is None or q.bit_budget is None or q.weight is None or specs.weight is None or \
            specs.weight.is_float:
        return  # FP8 is refused by check_budget_sections
    for k, b in enumerate(q.bit_budget.widths):
        vquant = q.model_copy(update={"weight": q.weight.model_copy(update={"bit": b}),
                                      "bit_budget": None})
        yield (f"{BUDGET}.widths[{k}]", b, cfg.model_copy(update={"quant": vquant}),
               replace(specs, weight=replace(specs.weight, bits=b)))


def _at(path: str, b: int, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except ConfigError as exc:
        raise relocated(exc, {"quant.weight.bit": path},
                        note=f"with {path} = {b} as quant.weight.bit") from None


def check_budget_sections(cfg: RunConfig) -> None:
    """What may go with ``quant.bit_budget`` (see the module docstring)."""
    q = cfg.quant
    if q is None or q.bit_budget is None:
        return
    bb = q.bit_budget
    if q.mix_bits:
        raise ConfigError(BUDGET, None, show_value=False, reason="quant.mix_bits also decides "
                          "linears' widths; use one of them (the search can write its "
                          "allocation as a quant.mix_bits snippet: quant.bit_budget.save_path)")
    if q.act is not None:
        raise ConfigError(BUDGET, None, show_value=False, reason="the search is for "
                          "weight-only quantization; remove quant.act (or quant.bit_budget)")
    if q.weight is not None and q.weight.is_float:
        raise ConfigError(BUDGET, None, show_value=False, reason="the search chooses "
                          "integer widths; quant.weight.quant_type is float-quant",
                          allowed="quant.weight.quant_type: int-quant")
    if cfg.sparse is not None:
        raise ConfigError(BUDGET, None, show_value=False, reason="the sensitivities are "
                          "measured on the dense model and pruning would change them; remove "
                          "the sparse section (or quant.bit_budget)")
    if not bb.count_overhead and bb.target < bb.widths[0]:
        raise ConfigError(f"{BUDGET}.target", bb.target, allowed=f">= {bb.widths[0]} (the "
                          "narrowest of quant.bit_budget.widths)", reason="below every "
                          "candidate width (count_overhead: False counts code bits only)")
    if cfg.calib is not None and bb.seq_len is not None and bb.seq_len > cfg.calib.seq_len:
        raise ConfigError(f"{BUDGET}.seq_len", bb.seq_len,
                          allowed=f"2 to {cfg.calib.seq_len} (calib.seq_len)",
                          reason="longer than the calibration samples")
    if cfg.calib is not None and bb.n_samples > cfg.calib.n_samples:
        raise ConfigError(f"{BUDGET}.n_samples", bb.n_samples,
                          allowed=f"1 to {cfg.calib.n_samples} (calib.n_samples)",
                          reason="more samples than the calib section provides")


def check_budget_steps(cfg: RunConfig, specs: RunSpecs, steps: list[Any]) -> None:
    """Every quantizing step honours per-linear grids and accepts every width's grid."""
    if cfg.quant is None or cfg.quant.bit_budget is None:
        return
    for st in steps:
        if st.section == "quant" and not st.spec.per_layer_specs:
            raise ConfigError(BUDGET, None, show_value=False, reason=f"{st.spec.name} "
                              f"({st.settings.method_path}) does not honour per-linear "
                              "grids (AlgorithmSpec.per_layer_specs), which the search sets; "
                              "use an algorithm that does (llmcq plugins --describe NAME)")
    for path, b, vcfg, vspecs in width_variants(cfg, specs):
        for st in steps:
            if st.section != "quant" or not _passes(st):
                continue  # a step refused with quant.weight is reported once, there
            settings = replace(st.settings, specs=vspecs, config=vcfg)
            _at(path, b, lambda s=settings, a=st.spec: a.check(s))


def _passes(step: Any) -> bool:
    try:
        step.spec.check(step.settings)
    except ConfigError:
        return False
    return True


def budget_features(cfg: RunConfig, specs: RunSpecs, steps: list[Any]) -> list[Feature]:
    """``layer_grids`` (linears on different widths) and what each width's grid brings
    with each step, at ``quant.bit_budget``."""
    q = cfg.quant
    if q is None or q.bit_budget is None or len(q.bit_budget.widths) < 2:
        return []
    out = [Feature("layer_grids", BUDGET, list(q.bit_budget.widths), source=BUDGET,
                   hint="give quant.bit_budget one width, or export with save_fake or "
                        "save_vllm")]
    for path, _b, vcfg, vspecs in width_variants(cfg, specs):
        for st in steps:
            if st.section == "quant":
                settings = replace(st.settings, specs=vspecs, config=vcfg)
                out += [replace(f, field=path if f.field == "quant.weight.bit" else f.field)
                        for f in st.spec.produces(settings)]
    return out


def fractional_zero_widths(cfg: RunConfig, specs: RunSpecs, steps: list[Any]) -> set[int]:
    """The widths at which the records will hold fractional zero points (the grid's
    ``round_zp: False``, or a step that declares it, e.g. SliM-LLM's binarized 1-bit groups
    at 2 bits): the search prices their zeros at 16 bits, as results.json will."""
    from llmcq.capabilities import spec_features

    out = set()
    for _path, b, vcfg, vspecs in width_variants(cfg, specs):
        found = spec_features(vspecs)
        for st in steps:
            if st.section == "quant":
                found += st.spec.produces(replace(st.settings, specs=vspecs, config=vcfg))
        if any(f.name == "fractional_zero" for f in found):
            out.add(b)
    return out


def check_budget_backend(backend: BackendSpec, cfg: RunConfig, specs: RunSpecs, path: str,
                         features: list[Feature]) -> None:
    """The backend's grid checks (``supports``) on each width's grid."""
    from llmcq.api import ExportTarget

    for wpath, b, vcfg, vspecs in width_variants(cfg, specs):
        target = ExportTarget(vcfg, vspecs, path, tuple(features))
        _at(wpath, b, lambda t=target: backend.supports(t))
