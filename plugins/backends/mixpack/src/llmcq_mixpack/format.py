"""The names and version of the mixpack format, shared by writer and loader (torch-free).

The README's "Format" section is the specification; this module holds its constants so the
writer and the loader cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from llmcq.errors import LlmcqError

__all__ = ["QUANT_METHOD", "FORMAT_VERSION", "READ_VERSIONS", "CODE_LAYOUT", "GRANULARITIES",
           "ZERO_DTYPES", "MixPackFormatError", "codes_key", "tensor_key", "check_header",
           "MODULE_KEYS", "module_keys", "ACT_ALLOWED", "act_problem", "read_act"]

#: ``quantization_config.quant_method`` of a mixpack folder
QUANT_METHOD = "llmcq_mixpack"
#: the layout version this code writes (2: each module entry has an ``act`` key)
FORMAT_VERSION = 2
#: the versions this code reads (1: weight-only entries, no ``act`` key); a reader refuses
#: any other
READ_VERSIONS = (1, 2)
#: how codes are stored (informational; part of version 1)
CODE_LAYOUT = "int32 bit planes per width, LSB first, row-major width-map order"
GRANULARITIES = ("per_group", "per_channel", "per_tensor")
#: how zero points are stored: integral zeros in 0..255 as uint8, any other as float32
ZERO_DTYPES = ("uint8", "float32")
#: the keys of every ``quantization_config.modules`` entry of version 1
MODULE_KEYS = frozenset({"shape", "granularity", "group_size", "symmetric", "bits", "widths",
                         "group_bits", "zero", "col_perm", "float_columns", "bias"})
#: the activation settings a packed linear reproduces exactly (``MixPackLinear`` applies
#: llmcq's ``fake_quantize_act``, as ``FakeQuantLinear`` does): field -> allowed values
ACT_ALLOWED: dict[str, tuple[Any, ...]] = {
    "fmt": ("int",), "static": (False,), "granularity": ("per_token",)}


def module_keys(version: int) -> frozenset[str]:
    """The keys of a module entry of ``version`` (2 adds ``act``)."""
    return MODULE_KEYS if version == 1 else MODULE_KEYS | {"act"}


def act_problem(act: Any) -> tuple[str, Any, tuple[Any, ...]] | None:
    """``(field, value, allowed)`` of the first field of an
    :class:`~llmcq.quant.spec.ActQuantSpec` outside :data:`ACT_ALLOWED`, or None when the
    setting can be written: dynamic, per token, integer (any bits, symmetric or asymmetric,
    either ``sym_range``)."""
    got = {"fmt": act.fmt, "static": act.static,
           "granularity": str(act.granularity).split("(")[0]}
    for key, allowed in ACT_ALLOWED.items():
        if got[key] not in allowed:
            return key, got[key], allowed
    return None


class MixPackFormatError(LlmcqError):
    """A mixpack folder is missing, incomplete, corrupt or of another version."""


def codes_key(module: str, bits: int) -> str:
    """Safetensors key of one linear's bit-plane stream of width ``bits``."""
    return f"{module}.codes_b{bits}"


def tensor_key(module: str, what: str) -> str:
    """Safetensors key of one linear's ``group_bits``, ``scale``, ``zero``, ``col_perm``,
    ``float_cols``, ``float_vals`` or ``bias``."""
    return f"{module}.{what}"


def check_header(folder: str, qc: Any) -> dict[str, Any]:
    """Refuse a ``quantization_config`` that is not a mixpack one of this version, naming
    what is wrong; returns it."""
    if not isinstance(qc, dict):
        raise MixPackFormatError(f"{folder}: config.json has no quantization_config; not a "
                                 "mixpack folder")
    if qc.get("quant_method") != QUANT_METHOD:
        raise MixPackFormatError(f"{folder}: quantization_config.quant_method is "
                                 f"{qc.get('quant_method')!r}, not {QUANT_METHOD!r}")
    version = qc.get("format_version")
    if isinstance(version, bool) or version not in READ_VERSIONS:
        raise MixPackFormatError(f"{folder}: mixpack format_version {version!r}; this loader "
                                 f"reads versions {', '.join(map(str, READ_VERSIONS))}")
    for key in ("modules", "weight_files"):
        if not isinstance(qc.get(key), dict) or not qc[key]:
            raise MixPackFormatError(f"{folder}: quantization_config.{key} is missing or empty")
    for file in qc["weight_files"]:
        if "/" in file or "\\" in file or not file.endswith(".safetensors"):
            raise MixPackFormatError(f"{folder}: weight file {file!r} is not a .safetensors "
                                     "file of the folder")
    for name, entry in qc["modules"].items():
        keys = set(entry) if isinstance(entry, dict) else set()
        if keys != module_keys(version):
            raise MixPackFormatError(f"{folder}: module {name}: entry keys "
                                     f"{sorted(keys)} differ from "
                                     f"{sorted(module_keys(version))} (format version "
                                     f"{version})")
        if entry["granularity"] not in GRANULARITIES:
            raise MixPackFormatError(f"{folder}: module {name}: granularity "
                                     f"{entry['granularity']!r} not one of {GRANULARITIES}")
        if entry["zero"] is not None and entry["zero"] not in ZERO_DTYPES:
            raise MixPackFormatError(f"{folder}: module {name}: zero {entry['zero']!r} not "
                                     f"one of {ZERO_DTYPES} or null")
        read_act(f"{folder}: module {name}", entry.get("act"))
    return qc


def read_act(where: str, value: Any) -> Any:
    """The :class:`~llmcq.quant.spec.ActQuantSpec` of an entry's ``act`` (its ``to_dict``
    form, or null: None), refusing a malformed one or one outside :data:`ACT_ALLOWED`."""
    if value is None:
        return None
    from llmcq.quant.spec import ActQuantSpec

    try:
        if not isinstance(value, dict):
            raise TypeError(f"{type(value).__name__}, not an object")
        act = ActQuantSpec.from_dict(value)
    except (KeyError, TypeError, ValueError) as exc:
        raise MixPackFormatError(f"{where}: malformed act {value!r} ({exc})") from None
    problem = act_problem(act)
    if problem:
        key, got, allowed = problem
        raise MixPackFormatError(f"{where}: act {key} {got!r}; mixpack holds dynamic "
                                 f"per-token integer settings only (allowed {key}: "
                                 f"{', '.join(map(str, allowed))})")
    return act
