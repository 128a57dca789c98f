"""Capabilities instead of names: what records contain, what backends write, what layouts
provide (torch-free).

Three declarations meet here, all checked at config time (``llmcq validate``) before any
model is loaded:

* an **algorithm** declares, from its own resolved settings, the record features its
  results contain (:meth:`llmcq.api.AlgorithmSpec.produces`), each with the config key that
  brings it and a hint for avoiding it ("set static_groups: True"); and what it needs from
  the model layout (:meth:`llmcq.api.AlgorithmSpec.needs`);
* core adds the features the typed specs bring by themselves (activation quantization,
  FP8 codes, a sparsity mask, a quantized KV cache): :func:`spec_features`;
* a **backend** declares the record features it writes faithfully
  (:attr:`llmcq.api.BackendSpec.accepts`); a **model adapter** the layout facts it
  provides (:attr:`llmcq.api.ModelSpec.provides`, or at load time for adapters such as
  ``auto`` whose layout is found by tracing).

:func:`check_backend` and :func:`check_layout` compare them and raise a
:class:`~llmcq.errors.ConfigError` naming the field, the value, what the other side accepts
and the algorithm's hint. No backend or adapter reads another plugin's ``special`` keys or
compares algorithm names. After quantization core checks the records themselves against the
backend (:func:`check_records`), so an algorithm that under-declares fails loudly instead of
being exported wrongly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmcq.errors import ConfigError, ConfigErrors, PluginError

if TYPE_CHECKING:
    from llmcq.specs import RunSpecs

__all__ = ["RECORD_FEATURES", "LAYOUT_FEATURES", "Feature", "Need", "spec_features",
           "layer_features",
           "check_backend", "check_layout", "check_records", "record_details",
           "describe_features"]

#: what a quantized-linear record may hold beyond a plain uniform grid, by name
RECORD_FEATURES: dict[str, str] = {
    "g_idx": "columns quantized out of group order (an act-order permutation: g_idx)",
    "group_bits": "per-group bit widths (mixed precision within a linear)",
    "float_columns": "input columns kept in float (outlier columns)",
    "sparse_outliers": "sparse float outlier weights",
    "sparsity_mask": "a sparsity mask (pruned weights)",
    "input_transform": "an online transform of the linear's input (e.g. a Hadamard)",
    "act_quant": "activation quantization of the linear's input",
    "kv_cache_quant": "a quantized KV cache",
    "float_format": "float codes (FP8)",
    "fractional_zero": "non-integral zero points",
    "quantized_scales": "per-group scales that are themselves quantized",
    "grid_levels": "an asymmetric grid with other than 2^bits levels (ABQ-LLM's bit balance: "
                   "5 levels at 2 bits)",
    # run-level: declared by core from quant.mix_bits / ignored_layers (spec_features)
    "layer_grids": "linears on different grids (layer-wise mixed precision, quant.mix_bits)",
    "float_linears": "block linears kept in float (ignored_layers, mix_bits do_quant: False)",
}

#: what a model adapter's layout may provide, by name
LAYOUT_FEATURES: dict[str, str] = {
    "scaling_pairs": "producer -> linears pairs a per-channel scale can move through "
                     "(LinearGroup.prev_op)",
    "roles": "a declared role for every linear (q, k, v, o, gate, up, down, ...)",
    "norm_kinds": "the kind of every norm feeding linears (RMSNorm, LayerNorm, 1 + w)",
    "rotation_points": "residual-stream writers and readers, norms and their kinds, "
                       "head_dim: what a rotation of the residual stream needs",
}


@dataclass(frozen=True)
class Feature:
    """A record feature a run will produce, and where it comes from.

    ``field``/``value``: the config key and value that bring it (what an error names);
    ``hint``: how to avoid it, in the producer's words; ``detail``: a refinement a backend
    may accept selectively (the mask structure ``"2:4"``, ``"static"`` activations);
    ``source``: who declares it (an algorithm's name, or ``"quant.act"``).
    """

    name: str
    field: str
    value: Any = None
    hint: str = ""
    detail: str | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.name not in RECORD_FEATURES:
            raise ValueError(f"unknown record feature {self.name!r}; known: "
                             f"{', '.join(RECORD_FEATURES)}")

    def describe(self) -> str:
        text = RECORD_FEATURES[self.name]
        return f"{text} [{self.detail}]" if self.detail else text


@dataclass(frozen=True)
class Need:
    """A layout fact an algorithm needs, with the config key that makes it need it."""

    name: str
    field: str
    value: Any = None
    hint: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        if self.name not in LAYOUT_FEATURES:
            raise ValueError(f"unknown layout feature {self.name!r}; known: "
                             f"{', '.join(LAYOUT_FEATURES)}")


def spec_features(specs: RunSpecs) -> list[Feature]:
    """The record features the typed specs bring whatever the algorithm."""
    out: list[Feature] = []
    if specs.act is not None:
        a = specs.act
        out.append(Feature("act_quant", "quant.act", a.describe(),
                           detail="static" if a.static else "dynamic", source="quant.act",
                           hint="remove quant.act for a weight-only export"))
    w = specs.weight
    if (w is not None and w.is_float) or (specs.act is not None and specs.act.is_float):
        sec = "quant.weight" if w is not None and w.is_float else "quant.act"
        out.append(Feature("float_format", f"{sec}.quant_type", "float-quant",
                           detail="e4m3", source=sec,
                           hint="use quant_type: int-quant for an integer grid"))
    # masks: a sparse section that prunes weights (not only whole blocks: ShortGPT)
    if specs.sparsity is not None and specs.sparsity.sparsity > 0 and \
            specs.weight is not None:
        out.append(Feature("sparsity_mask", "sparse.method", None,
                           detail=str(specs.sparsity.structure), source="sparse",
                           hint="export with save_fake (dense, zeros kept) or prune without "
                                "quantizing and export with save_trans"))
    if w is not None and not w.is_float and not w.symmetric and not w.round_zp:
        out.append(Feature("fractional_zero", "quant.weight.round_zp", False,
                           source="quant.weight", hint="set round_zp: True for integral "
                           "zero points"))
    if specs.kv is not None:
        out.append(Feature("kv_cache_quant", "quant.kvcache", specs.kv.describe(),
                           source="quant.kvcache", hint="remove quant.kvcache"))
    return out + layer_features(specs)


def layer_features(specs: RunSpecs) -> list[Feature]:
    """``layer_grids`` / ``float_linears`` of the config's per-linear settings, each naming
    the key that brings it."""
    rules = specs.layers
    if rules is None:
        return []
    out = []
    mixed = [s for s in rules.quantizing_settings if s.spec.grids() != rules.default.grids()]
    if mixed:
        out.append(Feature("layer_grids", mixed[0].path, mixed[0].spec.describe(),
                           source="quant.mix_bits", hint="give every setting the global "
                           "weight and act sections, or export with save_fake or save_vllm"))
    floats = [s.path + ".do_quant" for s in rules.settings if s.spec.keeps_float]
    if rules.ignored is not None:
        floats.insert(0, "ignored_layers")
    if floats:
        out.append(Feature("float_linears", floats[0], None, source=floats[0].split(".")[0],
                           hint="remove it to quantize every linear, or export with "
                           "save_fake or save_vllm"))
    return out


def describe_features(names: Iterable[str]) -> str:
    names = sorted(set(names))
    return ", ".join(names) if names else "none (plain uniform integer grids only)"


def check_backend(backend: str, accepts: Iterable[str], features: Iterable[Feature], *,
                  path: str, accepts_detail: Mapping[str, Iterable[str]] | None = None,
                  reasons: Mapping[str, str] | None = None) -> None:
    """Refuse every feature ``backend`` does not write (see the module docstring): one
    :class:`ConfigError`, or a :class:`~llmcq.errors.ConfigErrors` listing them all.

    ``accepts_detail`` narrows a feature to some details (``{"sparsity_mask": ["2:4"]}``);
    ``reasons`` holds the backend's own sentence for a refusal.
    """
    accepted = set(accepts)
    details = {k: set(v) for k, v in (accepts_detail or {}).items()}
    errors: list[ConfigError] = []
    seen: set[tuple[str, str]] = set()
    for f in features:
        ok = f.name in accepted and (f.name not in details or f.detail in details[f.name])
        if ok or (f.name, f.field) in seen:
            continue
        seen.add((f.name, f.field))
        own = (reasons or {}).get(f.name)
        why = own or f"cannot write {RECORD_FEATURES[f.name]}"
        if f.detail:
            why += f" [{f.detail}]"
        if f.name in details and f.name in accepted:
            why += f" (it writes {f.name} only as: {', '.join(sorted(details[f.name]))})"
        by = f", which {f.source} produces with this setting" if f.source else ""
        hint = f"; {f.hint}" if f.hint else ""
        errors.append(ConfigError(f.field, f.value, show_value=f.value is not None,
                                  reason=f"backend {backend} ({path}) {why}{by}{hint}",
                                  allowed=f"{backend} writes: {describe_features(accepted)}"))
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigErrors(errors)


def check_layout(adapter: str, provides: Iterable[str], needs: Iterable[Need], *,
                 reasons: Mapping[str, str] | None = None) -> None:
    """Refuse the first layout fact an algorithm needs and ``adapter`` does not provide.

    ``reasons``: why the adapter lacks a fact (for ``auto``: the parts its trace could not
    verify)."""
    have = set(provides)
    for n in needs:
        if n.name in have:
            continue
        why = (reasons or {}).get(n.name) or "not declared by its layout"
        hint = f"; {n.hint}" if n.hint else ""
        raise ConfigError(n.field, n.value, show_value=n.value is not None,
                          reason=f"{n.source or 'the algorithm'} needs "
                                 f"{LAYOUT_FEATURES[n.name]}, which model adapter {adapter!r} "
                                 f"does not provide ({why}){hint}",
                          allowed=f"{adapter} provides: "
                                  f"{', '.join(sorted(have)) or 'no layout facts'}")


def record_details(rec: Any) -> dict[str, str]:
    """The detail of each detailed feature a record holds (``act_quant``: static/dynamic,
    ``sparsity_mask``: its structure), as :func:`spec_features` declares them."""
    out = {}
    if rec.act is not None:
        out["act_quant"] = "static" if rec.act.static else "dynamic"
    if rec.mask is not None and rec.mask_structure is not None:
        out["sparsity_mask"] = str(rec.mask_structure)
    if rec.is_float:
        out["float_format"] = rec.weight.fmt
    return out


def check_records(backend: str, accepts: Iterable[str], records: Mapping[str, Any], *,
                  plugin: str = "llmcq core",
                  accepts_detail: Mapping[str, Iterable[str]] | None = None) -> None:
    """After quantization: every record's features (and their details) must be ones
    ``backend`` writes. A mismatch means an algorithm produced something it did not declare
    at config time."""
    accepted = set(accepts)
    details = {k: set(v) for k, v in (accepts_detail or {}).items()}
    for name, rec in records.items():
        extra = set(rec.features()) - accepted
        got = record_details(rec)
        extra |= {f"{k} [{v}]" for k, v in got.items() if k in details and k in accepted
                  and v not in details[k]}
        if extra:
            raise PluginError(f"the record holds {describe_features(extra)}, which backend "
                              f"{backend!r} cannot write, and the recipe did not declare it at "
                              "config time (AlgorithmSpec.produces)", plugin=plugin,
                              stage="export", where=name)
