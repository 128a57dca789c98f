"""Load a mixpack folder into a transformers model whose quantized linears are
:class:`~llmcq_mixpack.module.MixPackLinear` modules.

The model is built from the folder's ``config.json``, every
recorded linear is replaced by a ``MixPackLinear`` holding its packed tensors, and the float
tensors are loaded into the rest. Anything that does not fit (a missing or damaged weight
file, a missing tensor, a wrong shape, a module the config does not build, an unknown
tensor) raises :class:`~llmcq_mixpack.format.MixPackFormatError` naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from llmcq.quant.fake import set_module
from torch import nn

from llmcq_mixpack.export import file_digest
from llmcq_mixpack.format import MixPackFormatError, check_header
from llmcq_mixpack.layout import read_packed
from llmcq_mixpack.module import MixPackLinear

__all__ = ["load_model", "read_quantization_config", "read_weights"]


def read_quantization_config(folder: Path) -> dict[str, Any]:
    """``config.json``'s ``quantization_config``, checked to be mixpack of this version."""
    cfg_path = folder / "config.json"
    if not folder.is_dir():
        raise MixPackFormatError(f"{folder} is not a folder")
    if not cfg_path.is_file():
        raise MixPackFormatError(f"{folder}: config.json is missing")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MixPackFormatError(f"{cfg_path} is not valid JSON ({exc})") from None
    return check_header(str(folder), raw.get("quantization_config"))


def read_weights(folder: Path, files: dict[str, Any], *, verify: bool = True
                 ) -> dict[str, torch.Tensor]:
    """Every tensor of the listed weight files, each file checked against its recorded size
    and (``verify``) sha256 first."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            raise MixPackFormatError(f"{folder}: weight file {name} is missing")
        size = path.stat().st_size
        if size != meta.get("bytes"):
            raise MixPackFormatError(f"{path}: {size} bytes, config.json records "
                                     f"{meta.get('bytes')} (truncated or replaced)")
        if verify and file_digest(path)["sha256"] != meta.get("sha256"):
            raise MixPackFormatError(f"{path}: sha256 differs from the one config.json "
                                     "records (the file is damaged)")
        try:
            part = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error type for a bad header
            raise MixPackFormatError(f"{path} cannot be read as safetensors ({exc})") from None
        twice = set(part) & set(tensors)
        if twice:
            raise MixPackFormatError(f"{path}: tensor {sorted(twice)[0]} is in two files")
        tensors.update(part)
    return tensors


def _dtype_of(config: Any, dtype: torch.dtype | str | None) -> torch.dtype:
    value = dtype or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32


def _skeleton(folder: Path, dtype: torch.dtype | str | None) -> tuple[nn.Module, torch.dtype]:
    """The model ``config.json`` describes, on the CPU. It is initialized as transformers
    does (random weights, overwritten next): skipping that would also skip what the
    initialization computes (tied embeddings, rotary buffers) in some families."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # ours; transformers knows no such method
    dt = _dtype_of(config, dtype)
    return AutoModelForCausalLM.from_config(config, dtype=dt), dt


def _replace_linear(model: nn.Module, name: str, entry: dict[str, Any],
                    tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    packed = read_packed(name, entry, tensors)
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise MixPackFormatError(f"module {name}: the model config.json builds has no such "
                                 "module") from None
    if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != (
            packed.out_features, packed.in_features):
        raise MixPackFormatError(f"module {name}: expected an nn.Linear "
                                 f"[{packed.out_features}, {packed.in_features}] in the model "
                                 f"config.json builds, found {old}")
    bias = tensors.pop(f"{name}.bias", None)
    if entry["bias"] and bias is None:
        raise MixPackFormatError(f"tensor {name}.bias is missing")
    set_module(model, name, MixPackLinear(packed, None if bias is None else bias.to(dtype)))


def _load_float_tensors(model: nn.Module, tensors: dict[str, torch.Tensor],
                        packed: set[str]) -> None:
    """Load the remaining tensors; a model tensor may be absent from the file only when it
    is tied to one that is present (``lm_head.weight`` to the embeddings)."""
    ours = lambda key: key.rpartition(".")[0] in packed  # noqa: E731
    expected = {k for k in model.state_dict() if not ours(k)}
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise MixPackFormatError(f"tensor {unexpected[0]} belongs to no module of the model "
                                 f"({len(unexpected)} such tensors)")
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # torch lists every size mismatch
        raise MixPackFormatError("float tensors do not fit the model config.json builds: "
                                 + " ".join(str(exc).split())) from None
    missing = [k for k in result.missing_keys if not ours(k)]
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in tensors if k in params}
    untied = [k for k in missing if k not in params or id(params[k]) not in loaded]
    if untied:
        raise MixPackFormatError(f"tensor {untied[0]} is missing ({len(untied)} model "
                                 "tensors are not in the weight files)")


def load_model(folder: str | Path, *, device: torch.device | str = "cpu",
               dtype: torch.dtype | str | None = None, verify: bool = True) -> nn.Module:
    """The model of a mixpack folder, in eval mode on ``device``.

    ``dtype``: the float tensors' and activations' dtype (default: the config's ``dtype``,
    else float32); weights are dequantized in float32 and cast to it, as the fake-quant
    model's are. ``verify``: check each weight file's sha256 (its size is always checked).
    """
    folder = Path(folder)
    qc = read_quantization_config(folder)
    tensors = read_weights(folder, qc["weight_files"], verify=verify)
    model, dt = _skeleton(folder, dtype)
    try:
        for name, entry in qc["modules"].items():
            _replace_linear(model, name, entry, tensors, dt)
        _load_float_tensors(model, tensors, set(qc["modules"]))
    except MixPackFormatError as exc:
        raise MixPackFormatError(f"{folder}: {exc}") from None
    return model.to(device).eval()
