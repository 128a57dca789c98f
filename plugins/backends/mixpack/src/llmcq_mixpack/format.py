"""The names and version of the mixpack format, shared by writer and loader (torch-free).

The README's "Format" section is the specification; this module holds its constants so the
writer and the loader cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from llmcq.errors import LlmcqError

__all__ = ["QUANT_METHOD", "FORMAT_VERSION", "CODE_LAYOUT", "GRANULARITIES", "ZERO_DTYPES",
           "MixPackFormatError", "codes_key", "tensor_key", "check_header", "MODULE_KEYS"]

#: ``quantization_config.quant_method`` of a mixpack folder
QUANT_METHOD = "llmcq_mixpack"
#: the layout version this code writes and reads; a reader refuses any other
FORMAT_VERSION = 1
#: how codes are stored (informational; part of version 1)
CODE_LAYOUT = "int32 bit planes per width, LSB first, row-major width-map order"
GRANULARITIES = ("per_group", "per_channel", "per_tensor")
#: how zero points are stored: integral zeros in 0..255 as uint8, any other as float32
ZERO_DTYPES = ("uint8", "float32")
#: the keys of every ``quantization_config.modules`` entry
MODULE_KEYS = frozenset({"shape", "granularity", "group_size", "symmetric", "bits", "widths",
                         "group_bits", "zero", "col_perm", "float_columns", "bias"})


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
    if qc.get("format_version") != FORMAT_VERSION:
        raise MixPackFormatError(f"{folder}: mixpack format_version "
                                 f"{qc.get('format_version')!r}; this loader reads version "
                                 f"{FORMAT_VERSION} only")
    for key in ("modules", "weight_files"):
        if not isinstance(qc.get(key), dict) or not qc[key]:
            raise MixPackFormatError(f"{folder}: quantization_config.{key} is missing or empty")
    for file in qc["weight_files"]:
        if "/" in file or "\\" in file or not file.endswith(".safetensors"):
            raise MixPackFormatError(f"{folder}: weight file {file!r} is not a .safetensors "
                                     "file of the folder")
    for name, entry in qc["modules"].items():
        keys = set(entry) if isinstance(entry, dict) else set()
        if keys != MODULE_KEYS:
            raise MixPackFormatError(f"{folder}: module {name}: entry keys "
                                     f"{sorted(keys)} differ from {sorted(MODULE_KEYS)}")
        if entry["granularity"] not in GRANULARITIES:
            raise MixPackFormatError(f"{folder}: module {name}: granularity "
                                     f"{entry['granularity']!r} not one of {GRANULARITIES}")
        if entry["zero"] is not None and entry["zero"] not in ZERO_DTYPES:
            raise MixPackFormatError(f"{folder}: module {name}: zero {entry['zero']!r} not "
                                     f"one of {ZERO_DTYPES} or null")
    return qc
