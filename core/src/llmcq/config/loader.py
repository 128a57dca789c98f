"""YAML -> validated, plugin-resolved config, before any model is loaded (torch-free).

Order of checks: YAML syntax; ``--set`` overrides; unknown keys (with the closest key as a
suggestion); types and values (pydantic); then everything that needs the installed plugins:
method, model, dataset, evaluator and backend names, each algorithm's ``special`` keys and
capability checks, backend support, files that must exist and outputs that must not.
Every failure is a :class:`ConfigError` naming the key path, the value and what is allowed.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from llmcq.api import (
    AlgorithmSpec,
    BackendSpec,
    EvaluatorSpec,
    ExportTarget,
    ModelSpec,
    StepSettings,
)
from llmcq.capabilities import Feature, Need, check_backend, check_layout, spec_features
from llmcq.config.budget_checks import (budget_features, check_budget_backend,
                                        check_budget_sections, check_budget_steps)
from llmcq.config.kv_checks import check_kv_evals, check_kvcache
from llmcq.config.layer_checks import (check_layer_backend, check_layer_sections,
                                       check_layer_steps, layer_step_features)
from llmcq.config.schema import FLOAT_BITS, SAVE_FLAGS, QuantSection, RunConfig, SpecialConfig
from llmcq.data.datasets import DatasetSpec
from llmcq.data.preproc import PREPROCESSORS
from llmcq.errors import ConfigError, ConfigErrors, OutputExistsError, closest
from llmcq.model.loading import ModelSource, locate, peek_model_type
from llmcq.plugins import registry
from llmcq.plugins.registry import EntryPointInfo
from llmcq.specs import RunSpecs

__all__ = ["ResolvedConfig", "ResolvedStep", "ResolvedBackend", "load_config",
           "resolve_config", "parse_overrides", "apply_overrides", "validate_special",
           "check_quant_types",
           "RESULTS_FILE"]

RESULTS_FILE = "results.json"

#: model adapter used when ``model.type`` is absent and no family adapter serves the checkpoint
AUTO_ADAPTER = "auto"
#: llmc ``model.type`` names with no family adapter (transformers ships no modeling code, or
#: the family is served by tracing): resolved to the automatic adapter when it is installed
LLMC_AUTO_TYPES = ("internlm2", "minicpm", "starcoder")

#: llmc keys llmcq does not implement yet, with what they are (clearer than "unknown key")
LLMC_UNSUPPORTED = {
    "quant.quant_objects": "vision/language split quantization",
    "quant.language": "vision/language split quantization",
    "quant.vision": "vision/language split quantization",
    "quant.weight.int_range": "custom integer ranges",
    "quant.weight.qmax_to_tensor": "qmax_to_tensor",
    "quant.act.qmax_to_tensor": "qmax_to_tensor",
    "opencompass": "OpenCompass evaluation",
    "calib.add_answer": "chat-data calibration",
    "calib.type": "multimodal calibration",
    "eval.max_new_tokens": "generation evaluation",
    "model.use_cpu_to_save_cuda_mem_for_catcher": "catcher memory options (the block-wise "
                                                   "engine always keeps the model in host memory)",
}


@dataclass(frozen=True)
class ResolvedStep:
    name: str
    spec: AlgorithmSpec
    info: EntryPointInfo
    special: SpecialConfig
    section: str  # "quant" or "sparse"
    settings: StepSettings


@dataclass(frozen=True)
class ResolvedBackend:
    name: str
    spec: BackendSpec
    info: EntryPointInfo
    field: str

    @property
    def folder(self) -> str:
        return self.spec.folder or f"{self.spec.name}_model"


@dataclass(frozen=True)
class ResolvedEval:
    index: int
    evaluator: EvaluatorSpec
    evaluator_info: EntryPointInfo
    datasets: list[tuple[DatasetSpec, EntryPointInfo, str | None]]


@dataclass
class ResolvedConfig:
    """A validated config with every plugin it names resolved (specs only, no torch)."""

    config: RunConfig
    raw: dict[str, Any]
    source: ModelSource
    model: tuple[ModelSpec, EntryPointInfo]
    steps: list[ResolvedStep]
    backends: list[ResolvedBackend]
    calib: tuple[DatasetSpec, EntryPointInfo] | None
    evals: list[ResolvedEval]
    needs_calibration: bool
    overwrite: bool
    config_path: str | None = None
    notes: list[str] = field(default_factory=list)
    #: the typed specs every stage uses (resolved once, here)
    specs: RunSpecs = field(default_factory=RunSpecs)
    #: record features the recipe produces (checked against every backend)
    features: list[Feature] = field(default_factory=list)
    #: layout facts the recipe needs (checked against the adapter, at load if not before)
    needs: list[Need] = field(default_factory=list)

    @property
    def needs_tokenizer(self) -> bool:
        """Whether any dataset of the run tokenizes text (random token ids do not)."""
        used = [d[0] for e in self.evals for d in e.datasets]
        if self.calib is not None and self.needs_calibration:
            used.append(self.calib[0])
        return any(getattr(d, "needs_tokenizer", True) for d in used)

    @property
    def save_dir(self) -> Path:
        return Path(self.config.save.save_path).expanduser()

    def plugins_used(self) -> list[dict[str, str | None]]:
        infos = [("model", self.model[1])] + [(f"{s.section}.method", s.info) for s in self.steps]
        infos += [("save", b.info) for b in self.backends]
        infos += [("eval", e.evaluator_info) for e in self.evals]
        infos += [("eval.name", d[1]) for e in self.evals for d in e.datasets]
        if self.calib:
            infos.append(("calib.name", self.calib[1]))
        seen, out = set(), []
        for role, info in infos:
            key = (info.group, info.name)
            if key in seen:
                continue
            seen.add(key)
            out.append({"role": role, "group": info.group, "name": info.name,
                        "distribution": info.distribution, "version": info.version,
                        "target": info.value})
        return out


# --------------------------------------------------------------------------- YAML + overrides

def _read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("CONFIG", str(path), reason="config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError("CONFIG", str(path), reason=f"invalid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("CONFIG", str(path), reason="the top level must be a mapping of "
                          "sections (base, model, calib, eval, quant, sparse, save)")
    return data


def parse_overrides(items: list[str] | tuple[str, ...]) -> list[tuple[str, Any]]:
    """``["quant.weight.bit=3"]`` -> ``[("quant.weight.bit", 3)]`` (values parsed as YAML)."""
    out = []
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError("--set", item, reason="expected KEY.PATH=VALUE")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError("--set", item, reason=f"value is not valid YAML: {exc}") from exc
        out.append((key.strip(), value))
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    for key, value in overrides:
        parts = key.split(".")
        node: Any = raw
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}", value,
                                  reason=f"{'.'.join(parts[:i])} is not a mapping")
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        if isinstance(node, list) and parts[-1].isdigit() and int(parts[-1]) < len(node):
            node[int(parts[-1])] = value
        elif isinstance(node, dict):
            node[parts[-1]] = value
        else:
            raise ConfigError(f"--set {key}", value, reason="parent is not a mapping")
    return raw


# --------------------------------------------------------------------------- schema checks

def _section_type(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(Section class inside an annotation, whether it is a list of them)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            cls, is_list = _section_type(arg)
            if cls is not None:
                return cls, is_list
        return None, False
    if origin is list:
        args = typing.get_args(annotation)
        cls, _ = _section_type(args[0]) if args else (None, False)
        return cls, cls is not None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def _mapped_section(annotation: Any) -> type[BaseModel] | None:
    """The section class of a ``dict[str, Section]`` field (``quant.mix_bits``), else None."""
    for arg in (typing.get_args(annotation) if typing.get_origin(annotation) in
                (typing.Union, types.UnionType) else (annotation,)):
        if typing.get_origin(arg) is dict:
            value = typing.get_args(arg)[-1]
            if isinstance(value, type) and issubclass(value, BaseModel):
                return value
    return None


def check_keys(raw: dict[str, Any], model: type[BaseModel], path: str = "",
               errors: list[ConfigError] | None = None) -> None:
    """Unknown keys anywhere in ``raw`` -> ConfigError with the closest allowed key.

    With ``errors``, every unknown key is appended there instead of raising at the first."""
    collect = errors is not None
    found: list[ConfigError] = errors if errors is not None else []
    fields = model.model_fields
    collects = getattr(model, "collects_key", None)  # keys a section gathers itself
    for key, value in raw.items():
        here = f"{path}.{key}" if path else str(key)
        if key not in fields and collects is not None and collects(key):
            continue
        if key not in fields:
            if here in LLMC_UNSUPPORTED:
                err = ConfigError(here, value, reason=f"{LLMC_UNSUPPORTED[here]} is not "
                                  "supported by llmcq yet; remove the key", show_value=False)
            else:
                err = ConfigError(here, value, reason="unknown key", allowed=sorted(fields),
                                  suggestion=closest(str(key), fields), show_value=False)
            if not collect:
                raise err
            found.append(err)
            continue
        cls, is_list = _section_type(fields[key].annotation)
        if cls is None:
            mapped = _mapped_section(fields[key].annotation)
            if mapped is not None and isinstance(value, dict):  # quant.mix_bits.setting_<i>
                for name, item in value.items():
                    if isinstance(item, dict):
                        check_keys(item, mapped, f"{here}.{name}", errors)
            continue
        if isinstance(value, dict):
            check_keys(value, cls, here, errors)
        elif is_list and isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    check_keys(item, cls, f"{here}[{i}]", errors)


def _error_path(loc: tuple[Any, ...], raw: Any, prefix: str) -> tuple[str, Any]:
    """Dotted key path and value of a pydantic error location (union tags dropped)."""
    parts: list[str] = [prefix] if prefix else []
    node = raw
    for i, item in enumerate(loc):
        if isinstance(node, dict) and item not in node and i + 1 < len(loc) \
                and loc[i + 1] in node:
            continue  # a field filled from the section's own keys (save.plugin_flags)
        if isinstance(node, dict) and item in node:
            parts.append(str(item))
            node = node[item]
        elif isinstance(node, list) and isinstance(item, int) and item < len(node):
            parts[-1] = f"{parts[-1]}[{item}]" if parts else f"[{item}]"
            node = node[item]
        elif isinstance(node, dict) and isinstance(item, str) and item not in node \
                and item.isidentifier() and not any(c in item for c in "[]"):
            # a missing required key, or a union tag such as 'str'/'list[str]'
            if item in ("str", "int", "bool", "float", "dict", "list"):
                continue
            parts.append(item)
            node = None
    return ".".join(parts) or prefix or "config", node


def validation_to_config_error(exc: ValidationError, raw: Any, prefix: str = "",
                               *, skip_extra: bool = False) -> ConfigError:
    """Every error pydantic found, as one :class:`ConfigError` (a :class:`ConfigErrors`
    when there are several). ``skip_extra``: drop "extra key" errors (already reported by
    :func:`check_keys`)."""
    errors = [_one_error(err, raw, prefix) for err in exc.errors()
              if not (skip_extra and err.get("type") == "extra_forbidden")]
    if not errors:  # only unknown keys, already reported by check_keys
        return ConfigErrors([_one_error(exc.errors()[0], raw, prefix)]) if not skip_extra \
            else ConfigErrors([])
    return errors[0] if len(errors) == 1 else ConfigErrors(errors)


def _one_error(err: Any, raw: Any, prefix: str) -> ConfigError:
    path, value = _error_path(tuple(err.get("loc", ())), raw, prefix)
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    allowed = None
    if err.get("type") == "literal_error":
        allowed = err.get("ctx", {}).get("expected")
        msg = "unsupported value"
    elif err.get("type") == "missing":
        return ConfigError(path, None, reason="required key is missing", show_value=False)
    if msg.startswith("allowed: "):
        allowed, msg = msg.removeprefix("allowed: "), "unsupported value"
    return ConfigError(path, err.get("input", value), reason=msg[0].lower() + msg[1:],
                       allowed=allowed)


def validate_special(spec: AlgorithmSpec, raw: Any, path: str) -> SpecialConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(path, raw, reason="must be a mapping of the algorithm's keys")
    errors: list[ConfigError] = []
    check_keys(raw, spec.special, path, errors)
    try:
        special = spec.special.model_validate(raw)
    except ValidationError as exc:
        errors.append(validation_to_config_error(exc, raw, path, skip_extra=True))
        raise ConfigErrors(errors) from None
    if errors:
        raise ConfigErrors(errors)
    return special


def parse_run_config(raw: dict[str, Any]) -> RunConfig:
    errors: list[ConfigError] = []
    check_keys(raw, RunConfig, "", errors)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as exc:
        errors.append(validation_to_config_error(exc, raw, skip_extra=True))
        raise ConfigErrors(errors) from None
    if errors:
        raise ConfigErrors(errors)
    return cfg


# --------------------------------------------------------------------------- plugin checks

def _steps(section_name: str, section: Any, kind: str) -> list[tuple[str, AlgorithmSpec,
                                                                 EntryPointInfo, SpecialConfig]]:
    """The section's methods resolved to specs, each with its validated ``special``."""
    methods = section.methods
    steps: list[tuple[str, AlgorithmSpec, EntryPointInfo]] = []
    for i, method in enumerate(methods):
        field_path = f"{section_name}.method" + (f"[{i}]" if len(methods) > 1 else "")
        spec, info = registry.load_spec("llmcq.algorithms", method, field=field_path,
                                        kind=AlgorithmSpec)
        assert isinstance(spec, AlgorithmSpec)
        if spec.kind != kind:
            raise ConfigError(field_path, method, reason=f"{spec.name} is a {spec.kind} "
                              f"algorithm; put it under {spec.kind}.method")
        steps.append((method, spec, info))
    special = section.special
    per_method: dict[str, Any]
    if len(steps) == 1:
        per_method = {steps[0][1].name: special}
    else:
        per_method = {}
        by_key = {registry.normalize(n): s[1].name for s in steps for n in s[1].all_names()}
        by_key.update({registry.normalize(s[0]): s[1].name for s in steps})
        for key, value in special.items():
            target = by_key.get(registry.normalize(str(key)))
            if target is None:
                raise ConfigError(f"{section_name}.special.{key}", value, reason="with several "
                                  "methods, special maps each method name to its own keys",
                                  allowed=[s[0] for s in steps],
                                  suggestion=closest(str(key), [s[0] for s in steps]),
                                  show_value=False)
            per_method[target] = value
    out = []
    errors: list[ConfigError] = []
    for method, spec, info in steps:
        path = f"{section_name}.special" + (f".{method}" if len(steps) > 1 else "")
        try:
            special_cfg = validate_special(spec, per_method.get(spec.name, {}), path)
        except ConfigError as exc:
            errors.append(exc)
            continue
        out.append((method, spec, info, special_cfg))
    if errors:
        raise ConfigErrors(errors)
    return out


def _sparse_keys(cfg: RunConfig, steps: list[ResolvedStep]) -> None:
    """Refuse ``sparse`` keys that no sparse step of the recipe honours."""
    sp = cfg.sparse
    if sp is None:
        return
    honoured = {k for st in steps if st.section == "sparse" for k in st.spec.sparse_keys}
    names = ", ".join(st.spec.name for st in steps if st.section == "sparse")
    w = sp.weight
    given: list[tuple[str, str, Any]] = []
    if w is not None:
        if "sparsity" in w.model_fields_set:
            given.append(("sparsity", "sparse.weight.sparsity", w.sparsity))
        if w.mask_structure != "unstructured":
            given.append(("mask_structure", "sparse.weight.mask_structure", w.mask_structure))
        if w.n_prune_layers is not None:
            given.append(("n_prune_layers", "sparse.weight.n_prune_layers", w.n_prune_layers))
    for key, path, value in given:
        if key not in honoured:
            raise ConfigError(path, value, reason=f"not used by {names} (it honours: "
                              f"{', '.join(sorted(honoured)) or 'none of the sparse keys'})")


def check_quant_types(quant: QuantSection) -> None:
    """``quant_type`` rules of the weight and act sections: an integer ``bit`` for int-quant;
    for float-quant (FP8) the format e4m3, symmetric, one scale per channel or tensor
    (weights) or per token or tensor (activations), min-max ranges, and the same element
    type for weights and activations."""
    sections = [("quant.weight", quant.weight), ("quant.act", quant.act)]
    for path, sec in sections:
        if sec is None:
            continue
        if not sec.is_float:
            if not isinstance(sec.bit, int):
                raise ConfigError(f"{path}.bit", sec.bit, allowed="an integer from 2 to 8",
                                  reason="int-quant needs a valid integer bit width; for FP8 "
                                  f"set {path}.quant_type: float-quant")
            continue
        if sec.bit not in FLOAT_BITS:
            raise ConfigError(f"{path}.bit", sec.bit, allowed=FLOAT_BITS,
                              reason="float-quant: the FP8 element format (e5m2 and the "
                              "narrower float formats of llmc are not supported)")
        if not sec.symmetric:
            raise ConfigError(f"{path}.symmetric", False, allowed=(True,),
                              reason="float-quant grids are symmetric (no zero point)")
        grans = ("per_channel", "per_tensor") if path == "quant.weight" else \
            ("per_token", "per_tensor")
        if sec.granularity not in grans:
            raise ConfigError(f"{path}.granularity", sec.granularity, allowed=grans,
                              reason="float-quant (FP8) scales: per channel or tensor for "
                              "weights, per token or tensor for activations")
        if sec.calib_algo != "minmax":
            raise ConfigError(f"{path}.calib_algo", sec.calib_algo, allowed=("minmax",),
                              reason="float-quant ranges are min-max (absmax / 448)")
    w, a = quant.weight, quant.act
    if w is not None and a is not None and w.quant_type != a.quant_type:
        raise ConfigError("quant.act.quant_type", a.quant_type, allowed=(w.quant_type,),
                          reason="weights and activations must use the same element type "
                          "(mixed integer/FP8 schemes are not implemented)")


def _check_path(path: str | None, field_path: str) -> None:
    if path is not None and not Path(path).expanduser().exists():
        raise ConfigError(field_path, path, reason="no such file or folder")


class _Collector:
    """Gathers independent config errors so one ``validate`` reports every one."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    @contextmanager
    def part(self) -> Iterator[None]:
        try:
            yield
        except ConfigError as exc:
            self.errors.append(exc)

    def raise_any(self) -> None:
        if self.errors:
            raise ConfigErrors(self.errors)


def resolve_config(raw: dict[str, Any], *, overwrite: bool = False,
                   config_path: str | None = None) -> ResolvedConfig:
    """Validate ``raw`` and resolve every plugin it names; raises one :class:`ConfigError`
    (a :class:`ConfigErrors` listing them all when several independent parts are wrong)."""
    cfg = parse_run_config(raw)
    notes: list[str] = []
    errs = _Collector()
    specs = RunSpecs()
    specs_ok = False
    with errs.part():
        if cfg.quant is not None:
            if cfg.quant.weight is None:
                raise ConfigError("quant.weight", None, reason="required: bit, symmetric, "
                                  "granularity and group_size of the weights", show_value=False)
            check_quant_types(cfg.quant)
            if cfg.quant.kvcache is not None:
                check_kvcache(cfg.quant.kvcache)
        specs = _specs(cfg)
        check_layer_sections(cfg, specs, check_quant_types)
        check_budget_sections(cfg)
        specs_ok = True
    with errs.part():
        check_kv_evals(cfg)

    # model
    source: ModelSource | None = None
    model: tuple[ModelSpec, EntryPointInfo] | None = None
    with errs.part():
        source = locate(cfg.model.path)
        model = _model_spec(cfg, source, notes)

    # algorithms: each step checked with the run's typed specs
    steps: list[ResolvedStep] = []
    for section_name, section in (("sparse", cfg.sparse), ("quant", cfg.quant)):
        if section is None or not specs_ok:
            continue
        with errs.part():
            found = _steps(section_name, section, section_name)
            methods = tuple(section.methods)
            for i, (method, spec, info, special) in enumerate(found):
                settings = StepSettings(specs=specs, special=special, index=i, methods=methods,
                                        section=section_name, config=cfg)
                with errs.part():
                    spec.check(settings)
                steps.append(ResolvedStep(method, spec, info, special, section_name, settings))
    with errs.part():
        check_layer_steps(cfg, specs, steps)
    with errs.part():
        check_budget_steps(cfg, specs, steps)
    with errs.part():
        _sparse_keys(cfg, steps)
    if cfg.sparse is not None and cfg.quant is not None:
        quantizer = next((st for st in reversed(steps) if st.section == "quant"
                          and not st.spec.supports_weightless()), None)
        if quantizer is not None and not quantizer.spec.uses_masks:
            notes.append(f"{quantizer.spec.name} does not use the pruning masks while it "
                         "quantizes; the pruned weights are set to zero in its records after")

    # what the records will hold, and what the layout must provide
    features: list[Feature] = []
    needs: list[Need] = []
    with errs.part():
        features = spec_features(specs)
        for st in steps:
            features += st.spec.produces(st.settings)
            needs += st.spec.needs(st.settings)
        features += layer_step_features(cfg, specs, steps)
        features += budget_features(cfg, specs, steps)
    if model is not None and model[0].provides is not None:
        with errs.part():
            check_layout(model[0].name, model[0].provides, needs)

    # calibration
    needs_calib = False
    calib = None
    with errs.part():
        needs_calib, calib = _calibration(cfg, steps, specs, notes)

    # evaluation
    evals: list[ResolvedEval] = []
    for i, e in enumerate(cfg.eval):
        with errs.part():
            evals.append(_evaluation(cfg, i, e))

    # export: the record features first, then each backend's own grid checks
    backends = []
    for name in cfg.save.backend_names if specs_ok else []:
        flag = next((f for f, b in SAVE_FLAGS.items() if b == name and getattr(cfg.save, f)),
                    None)  # the flag that selected it (save_trans or llmc's save_fp: trans)
        flag = flag or next((f for f, on in cfg.save.plugin_flags.items()
                             if on and cfg.save.flag_backend(f) == name), None)
        field_path = f"save.{flag}" if flag else "save.backends"
        with errs.part():
            bspec, binfo = registry.load_spec("llmcq.backends", name, field=field_path,
                                              kind=BackendSpec)
            assert isinstance(bspec, BackendSpec)
            check_backend(bspec.name, bspec.accepts, features, path=field_path,
                          accepts_detail=bspec.accepts_detail, reasons=bspec.refusals)
            bspec.supports(ExportTarget(cfg, specs, field_path, tuple(features)))
            check_layer_backend(bspec, cfg, specs, field_path, features)
            check_budget_backend(bspec, cfg, specs, field_path, features)
            backends.append(ResolvedBackend(name, bspec, binfo, field_path))

    with errs.part():
        _check_save_path(cfg)
    errs.raise_any()
    assert source is not None and model is not None

    overwrite = overwrite or cfg.save.overwrite
    resolved = ResolvedConfig(cfg, raw, source, model, steps, backends, calib, evals,
                              needs_calib, overwrite, config_path, notes, specs=specs,
                              features=features, needs=needs)
    if not overwrite:
        _refuse_existing(resolved)
    return resolved


def _specs(cfg: RunConfig) -> RunSpecs:
    try:
        return RunSpecs.from_config(cfg)
    except ValueError as exc:  # a grid the section validators let through (should not happen)
        raise ConfigError("quant", None, reason=str(exc), show_value=False) from None


def _model_spec(cfg: RunConfig, source: ModelSource,
                notes: list[str]) -> tuple[ModelSpec, EntryPointInfo]:
    if cfg.model.type is None:
        mspec, minfo = _adapter_for(source)
        if mspec.name == AUTO_ADAPTER:
            notes.append(f"no model.type and no family adapter serves model_type "
                         f"{peek_model_type(source)!r}: using the automatic adapter ('auto')")
        return mspec, minfo
    mtype = cfg.model.type
    infos = registry.discover("llmcq.models")
    try:
        registry.resolve("llmcq.models", mtype, field="model.type")
    except ConfigError:
        pass  # not an adapter name or alias
    else:
        spec, info = registry.load_spec("llmcq.models", mtype, field="model.type",
                                        kind=ModelSpec)
        assert isinstance(spec, ModelSpec)
        return spec, info
    # not an adapter name: a Hugging Face model_type one adapter serves, or the checkpoint's
    # own model_type (or an llmc name) left to the automatic adapter
    served = _serving_adapter(mtype, infos)
    if served is not None:
        notes.append(f"model.type {mtype!r} is served by adapter {served[0].name!r}")
        return served
    checkpoint_type = peek_model_type(source)
    same = checkpoint_type is not None and \
        registry.normalize(checkpoint_type) == registry.normalize(mtype)
    has_auto = any(registry.normalize(i.name) == AUTO_ADAPTER for i in infos)
    if has_auto and (same or registry.normalize(mtype) in LLMC_AUTO_TYPES):
        notes.append(f"model.type {mtype!r} has no family adapter here: using the automatic "
                     "adapter ('auto')")
        spec, info = registry.load_spec("llmcq.models", AUTO_ADAPTER, field="model.type",
                                        kind=ModelSpec)
        assert isinstance(spec, ModelSpec)
        return spec, info
    # unknown: the registry's error (allowed names, closest spelling)
    spec, info = registry.load_spec("llmcq.models", mtype, field="model.type", kind=ModelSpec)
    assert isinstance(spec, ModelSpec)
    return spec, info


def _calibration(cfg: RunConfig, steps: list[ResolvedStep], specs: RunSpecs, notes: list[str]
                 ) -> tuple[bool, tuple[DatasetSpec, EntryPointInfo] | None]:
    wanting = [s.spec.name for s in steps if s.spec.wants_calibration(s.settings)]
    searching = cfg.quant is not None and cfg.quant.bit_budget is not None
    static_kv = specs.kv is not None and specs.kv.static
    needs_calib = bool(wanting) or specs.any_act(lambda a: a.static) or searching or static_kv
    if needs_calib and cfg.calib is None:
        reason = (f"{', '.join(wanting)} needs calibration data" if wanting
                  else "quant.bit_budget measures sensitivities on calibration data"
                  if searching else "static KV-cache quantization (quant.kvcache.static) "
                  "needs calibration data" if static_kv and not specs.any_act(lambda a: a.static)
                  else "static activation quantization needs calibration data")
        raise ConfigError("calib", None, reason=f"{reason}; add a calib section (name, path, "
                          "n_samples, seq_len, preproc)", show_value=False)
    if cfg.calib is None:
        return needs_calib, None
    c = cfg.calib
    if c.download:
        raise ConfigError("calib.download", True, reason="downloads are not supported; "
                          "set download: False and point calib.path at local data")
    if c.padding:
        raise ConfigError("calib.padding", True, reason="padded calibration batches are "
                          "not supported yet", allowed="False")
    if c.apply_chat_template:
        raise ConfigError("calib.apply_chat_template", True, reason="chat-template "
                          "calibration is not supported yet", allowed="False")
    dspec, dinfo = registry.load_spec("llmcq.datasets", c.name, field="calib.name",
                                      kind=DatasetSpec)
    assert isinstance(dspec, DatasetSpec)
    if c.preproc not in PREPROCESSORS:
        raise ConfigError("calib.preproc", c.preproc, reason="unknown preprocessor",
                          allowed=sorted(PREPROCESSORS),
                          suggestion=closest(c.preproc, PREPROCESSORS))
    if dspec.needs_path and c.path is None:
        raise ConfigError("calib.path", None, reason=f"dataset {dspec.name} is read from "
                          "a local file or folder", show_value=False)
    _check_path(c.path, "calib.path")
    if not needs_calib:
        notes.append("calib section present but no step needs calibration; it is unused")
    return needs_calib, (dspec, dinfo)


def _evaluation(cfg: RunConfig, i: int, e: Any) -> ResolvedEval:
    prefix = "eval" if len(cfg.eval) == 1 else f"eval[{i}]"
    if e.download:
        raise ConfigError(f"{prefix}.download", True, reason="downloads are not supported; "
                          f"set download: False and point {prefix}.path at local data")
    for pos in e.eval_pos:
        if pos in ("fake_quant", "fake_quant_wo_kv", "transformed") and cfg.quant is None and \
                not (pos == "transformed" and cfg.sparse is not None):
            raise ConfigError(f"{prefix}.eval_pos", e.eval_pos, reason=f"position {pos!r} "
                              "needs a quant section", allowed="pretrain")
    espec, einfo = registry.load_spec("llmcq.evaluators", e.type, field=f"{prefix}.type",
                                      kind=EvaluatorSpec)
    assert isinstance(espec, EvaluatorSpec)
    espec.check(e, prefix)
    if espec.reads_tasks:
        return ResolvedEval(i, espec, einfo, [])
    for key in ("tasks", "limit"):
        if getattr(e, key) is not None:
            raise ConfigError(f"{prefix}.{key}", getattr(e, key), reason=f"eval.type "
                              f"{espec.name} reads no lm-evaluation-harness tasks",
                              suggestion="type: tasks")
    datasets = []
    for j, (name, path) in enumerate(zip(e.names, e.paths)):
        npath = f"{prefix}.name" + (f"[{j}]" if isinstance(e.name, list) else "")
        dspec, dinfo = registry.load_spec("llmcq.datasets", name, field=npath, kind=DatasetSpec)
        assert isinstance(dspec, DatasetSpec)
        ppath = f"{prefix}.path" + (f"[{j}]" if isinstance(e.path, list) else "")
        if dspec.needs_path and path is None:
            raise ConfigError(ppath, None, reason=f"dataset {dspec.name} is read from a "
                              "local file or folder", show_value=False)
        _check_path(path, ppath)
        datasets.append((dspec, dinfo, path))
    return ResolvedEval(i, espec, einfo, datasets)


def _check_save_path(cfg: RunConfig) -> None:
    """``save.save_path`` must be a folder (created if absent), never an existing file, and
    no parent of it may be a file: refused now, before anything is computed."""
    path = Path(cfg.save.save_path).expanduser()
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            what = "is a file" if p == path else f"sits under {p}, which is a file"
            raise ConfigError("save.save_path", cfg.save.save_path,
                              reason=f"{what}; save_path must be a folder (created if absent)")
        if p.exists():
            break


def _serving_adapter(model_type: str | None, infos: list[EntryPointInfo]
                     ) -> tuple[ModelSpec, EntryPointInfo] | None:
    """The family adapter whose ``model_types`` lists ``model_type`` (spelling-insensitive);
    adapters that fail to load are skipped (``llmcq plugins --check`` reports them)."""
    if not model_type:
        return None
    key = registry.normalize(model_type)
    for info in infos:
        try:
            spec, info = registry.load_spec("llmcq.models", info.name, field="model.type",
                                            kind=ModelSpec)
        except Exception:
            continue
        assert isinstance(spec, ModelSpec)
        if key in {registry.normalize(t) for t in spec.model_types}:
            return spec, info
    return None


def _adapter_for(source: ModelSource) -> tuple[ModelSpec, EntryPointInfo]:
    model_type = peek_model_type(source)
    infos = registry.discover("llmcq.models")
    served = _serving_adapter(model_type, infos)
    if served is not None:
        return served
    # no family adapter: the automatic adapter (plugin "auto") when it is installed
    if any(registry.normalize(i.name) == AUTO_ADAPTER for i in infos):
        spec, info = registry.load_spec("llmcq.models", AUTO_ADAPTER, field="model.type",
                                        kind=ModelSpec)
        assert isinstance(spec, ModelSpec)
        return spec, info
    names = sorted({i.name for i in infos})
    raise ConfigError("model.type", None, reason=f"not given, and no installed adapter serves "
                      f"this checkpoint's model_type {model_type!r}; set model.type",
                      allowed=names or "(no model adapter installed)", show_value=False)


def _refuse_existing(resolved: ResolvedConfig) -> None:
    out = resolved.save_dir
    existing = [out / b.folder for b in resolved.backends if (out / b.folder).exists()]
    if (out / RESULTS_FILE).exists():
        existing.append(out / RESULTS_FILE)
    q = resolved.config.quant
    snippet = q.bit_budget.save_path if q is not None and q.bit_budget is not None else None
    if snippet is not None and Path(snippet).expanduser().exists():
        existing.append(Path(snippet).expanduser())
    if existing:
        listing = ", ".join(str(p) for p in existing)
        raise OutputExistsError(f"save.save_path: {listing} already exist(s); choose another "
                                "save_path, or pass --overwrite (save.overwrite: true)")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                overwrite: bool = False) -> ResolvedConfig:
    """Read, override, validate and resolve a config file."""
    raw = _read_yaml(path)
    raw = apply_overrides(raw, parse_overrides(list(overrides)))
    return resolve_config(raw, overwrite=overwrite, config_path=str(path))

