"""What ``llmcq plugins --describe NAME`` prints: a plugin's keys with types, defaults and
one-line docs, and what it declares (torch-free).

A key's doc is the ``#:`` comment block right above its field (the convention of every
config class in llmcq), or the field's ``description``.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

__all__ = ["field_docs", "describe_keys", "describe_spec"]

_FIELD = re.compile(r"^\s+([A-Za-z_]\w*)\s*:")


def field_docs(cls: type) -> dict[str, str]:
    """``{field: doc}`` from the ``#:`` comments above each field, over the class's MRO."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass in (object, BaseModel) or not issubclass(klass, BaseModel):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        pending: list[str] = []
        for line in lines:
            text = line.strip()
            if text.startswith("#:"):
                pending.append(text[2:].strip())
                continue
            m = _FIELD.match(line)
            if m and pending:
                docs[m.group(1)] = " ".join(pending)
            if text and not text.startswith("#"):
                pending = []
    return docs


def _type_name(annotation: Any) -> str:
    """``list[int] | None``-style text of an annotation (``Annotated`` metadata dropped)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_name(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def describe_keys(cls: type[BaseModel]) -> list[dict[str, Any]]:
    """One row per key: name, type, default (``None`` = required), doc."""
    docs = field_docs(cls)
    rows = []
    for name, info in cls.model_fields.items():
        if info.default is PydanticUndefined:
            default: Any = "(required)" if info.default_factory is None else info.default_factory()
        else:
            default = info.default
        rows.append({"key": name, "type": _type_name(info.annotation), "default": default,
                     "doc": info.description or docs.get(name, "")})
    return rows


def describe_spec(spec: Any) -> dict[str, Any]:
    """Keys and declarations of a plugin spec, as plain data."""
    from llmcq.api import AlgorithmSpec, BackendSpec, ModelSpec

    out: dict[str, Any] = {"name": spec.name, "summary": spec.summary,
                           "aliases": list(spec.aliases), "paper": spec.paper}
    if isinstance(spec, AlgorithmSpec):
        out["keys"] = describe_keys(spec.special)
        out["declares"] = spec.describe()
        out["with_defaults"] = _algorithm_defaults(spec)
    elif isinstance(spec, BackendSpec):
        out["declares"] = spec.describe()
    elif isinstance(spec, ModelSpec):
        out["declares"] = {"model_types": list(spec.model_types),
                           "provides": None if spec.provides is None
                           else sorted(spec.provides)}
    return out


def _algorithm_defaults(spec: Any) -> dict[str, Any]:
    """What the algorithm produces and needs with its default keys on a W4 g128 grid."""
    from llmcq.api import StepSettings
    from llmcq.config.schema import RunConfig
    from llmcq.specs import RunSpecs

    section = "sparse" if spec.kind == "sparse" else "quant"
    raw: dict[str, Any] = {section: {"method": spec.name}}
    if section == "quant":
        raw["quant"]["weight"] = {"bit": 4, "symmetric": False, "granularity": "per_group",
                                  "group_size": 128}
    try:
        cfg = RunConfig.model_validate(raw)
        settings = StepSettings(specs=RunSpecs.from_config(cfg),
                                special=spec.special.model_validate({}), index=0,
                                methods=(spec.name,), section=section, config=cfg)
        return {"setting": "w4 g128 asym" if section == "quant" else "sparsity 0.5",
                "produces": sorted({f.name for f in spec.produces(settings)}),
                "needs": sorted({n.name for n in spec.needs(settings)})}
    except Exception as exc:  # a spec whose defaults need more keys
        return {"error": f"{type(exc).__name__}: {exc}"}
