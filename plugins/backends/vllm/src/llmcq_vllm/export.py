"""Write the compressed-tensors checkpoint vLLM and SGLang read, from llmcq's records.

The ``compressed-tensors`` library does the packing and the config: for each record we hand
its compressor (chosen by the library's own format inference: ``pack-quantized`` for
weight-only int, ``int-quantized`` when activations are quantized) the record's dequantized
weight together with the record's scale and zero point, so the compressor recovers exactly
the record's integer codes (checked for every layer), and ``ModelCompressor.update_config``
writes ``quantization_config`` into ``config.json``.

Grids: llmcq's symmetric grid is signed like compressed-tensors'; llmcq's asymmetric grid is
unsigned ``[0, 2^b - 1]`` while compressed-tensors' is signed, so codes and zero points shift
by ``2^(b-1)`` (``(q - z) * s`` is unchanged).

FP8 records (``quant_type: float-quant``, codes in ``float8_e4m3fn``) are written in the
``float-quantized`` format: ``weight`` float8_e4m3fn ``[out, in]`` and ``weight_scale``
float32 (``[out, 1]`` per channel, ``[1]`` per tensor: vLLM keeps FP8 scales in float32, and
so the stored scale is the record's own), input activations ``type: float, num_bits: 8``,
dynamic per token (``strategy: token``) or per tensor, or static per tensor with
``input_scale``. Weight-only FP8 records use the same format (vLLM's W8A16-FP8 scheme).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from llmcq.capabilities import describe_features
from llmcq.errors import PluginError
from llmcq.model.hf_io import save_hf_folder
from llmcq.quant.record import QuantizedLinear
from llmcq.quant.spec import PerChannel, PerGroup, PerTensor, PerToken

from llmcq_vllm import ACCEPTS, LIGHTLLM_SPEC, SPARSE
from llmcq_vllm.kvcache import kv_cache_export

__all__ = ["export", "export_lightllm", "scheme_args", "compress_record", "storage_dtype"]


def storage_dtype(model: Any) -> torch.dtype:
    """The float dtype of the model's own (unquantized) weights: scales are stored in it."""
    emb = model.get_input_embeddings()
    dtype = emb.weight.dtype if emb is not None else next(model.parameters()).dtype
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float16


def scheme_args(rec: QuantizedLinear) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``QuantizationArgs`` keyword dicts (weights, input activations) of one record."""
    gran = rec.weight.granularity
    kind = "float" if rec.is_float else "int"
    weights: dict[str, Any] = {"num_bits": rec.bits, "type": kind, "symmetric": rec.symmetric,
                               "dynamic": False}
    if isinstance(gran, PerGroup):
        weights.update(strategy="group", group_size=gran.size)
    elif isinstance(gran, PerChannel):
        weights.update(strategy="channel")
    elif isinstance(gran, PerTensor):
        weights.update(strategy="tensor")
    else:  # pragma: no cover - WeightQuantSpec holds no other granularity
        raise PluginError(f"unsupported weight granularity {gran}")
    act = rec.act
    if act is None:
        return weights, None
    inputs: dict[str, Any] = {"num_bits": act.bits, "type": "float" if act.is_float else "int",
                              "symmetric": act.symmetric}
    if act.static:
        inputs.update(strategy="tensor", dynamic=False)
    elif isinstance(act.granularity, PerToken):
        inputs.update(strategy="token", dynamic=True)
    elif act.is_float and isinstance(act.granularity, PerTensor):  # vLLM: dynamic FP8 tensor
        inputs.update(strategy="tensor", dynamic=True)
    else:
        raise PluginError(f"activation quantization {act.describe()} has no vLLM scheme")
    return weights, inputs


def _check_record(name: str, rec: QuantizedLinear, accepts: frozenset[str]) -> None:
    """What core's ``check_records`` already refused (a record feature the backend does not
    accept), repeated for direct callers, and a partial last group (not a feature: a shape)."""
    problems = []
    extra = set(rec.features()) - accepts
    if extra:
        problems.append(f"it holds {describe_features(extra)}, which the compressed-tensors "
                        "writer cannot hold")
    gran = rec.weight.granularity
    if isinstance(gran, PerGroup) and rec.in_features % gran.size:
        problems.append(f"a partial last group (in_features {rec.in_features} is not a multiple "
                        f"of group_size {gran.size})")
    if problems:
        raise PluginError(f"{name}: cannot be written as compressed-tensors: "
                          + "; ".join(problems))


def compress_record(rec: QuantizedLinear, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor],
                                                                         str, dict, dict | None]:
    """Compressed tensors of one linear (local names: ``weight_packed``, ``weight_scale``, ...),
    the compression format, and the weight/input ``QuantizationArgs`` dicts."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    wargs, iargs = scheme_args(rec)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**wargs),
                                input_activations=None if iargs is None
                                else QuantizationArgs(**iargs))
    if rec.is_float:
        return _compress_float_record(rec, scheme, wargs, iargs)
    fmt = infer_module_format(torch.nn.Linear, scheme)
    offset = 0 if rec.symmetric else 2 ** (rec.bits - 1)
    q = rec.qweight.to(torch.int16) - offset  # signed codes, as compressed-tensors holds them
    if rec.mask is not None:  # pruned weights: the code of exact zero
        from llmcq_vllm.sparse import zero_pruned_codes

        q = zero_pruned_codes(rec, q, offset)
    scale = rec.scale.to(dtype)
    state: dict[str, torch.Tensor] = {"weight_scale": scale.reshape(-1) if isinstance(
        rec.weight.granularity, PerTensor) else scale}
    zero = None
    if rec.zero is not None:
        zero = rec.zero.round().to(torch.int16) - offset
        state["weight_zero_point"] = zero.to(torch.int8).reshape(state["weight_scale"].shape)
    # the weight the compressor re-quantizes: exactly the record's grid, with the stored scale
    idx = rec.column_groups()
    s_full = scale.float().reshape(scale.shape[0], -1)[:, idx] if not isinstance(
        rec.weight.granularity, PerTensor) else scale.float().reshape(1, 1)
    zf = 0.0 if zero is None else (zero.float().reshape(zero.shape[0], -1)[:, idx]
                                   if not isinstance(rec.weight.granularity, PerTensor)
                                   else zero.float().reshape(1, 1))
    state["weight"] = (q.float() - zf) * s_full
    if rec.act is not None and rec.act.static:
        if rec.act_scale is None:
            raise PluginError("static activation quantization without a calibrated scale")
        state["input_scale"] = rec.act_scale.reshape(1).to(dtype)
        if not rec.act.symmetric:
            a_off = 2 ** (rec.act.bits - 1)
            assert rec.act_zero is not None
            state["input_zero_point"] = (rec.act_zero.reshape(1).round() - a_off).to(torch.int8)
    compressor = BaseCompressor.get_value_from_registry(fmt.value)
    out = compressor.compress(state, scheme)
    # the library must have recovered our codes exactly
    if "weight_packed" in out:
        codes = unpack_from_int32(out["weight_packed"], rec.bits, out["weight_shape"])
    else:
        codes = out["weight"]
    if not torch.equal(codes.to(torch.int16), q):
        raise PluginError("compressed-tensors re-quantized different integer codes than the "
                          "record holds (scale not representable in the storage dtype?)")
    return dict(out), fmt.value, wargs, iargs


def _compress_float_record(rec: QuantizedLinear, scheme: Any, wargs: dict,
                           iargs: dict | None) -> tuple[dict[str, torch.Tensor], str, dict,
                                                        dict | None]:
    """``float-quantized`` tensors of an FP8 record (scales float32, as vLLM holds them)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.config import CompressionFormat

    if not isinstance(rec.weight.granularity, (PerChannel, PerTensor)):
        raise PluginError(f"FP8 weights per {rec.weight.granularity}: compressed-tensors' "
                          "float-quantized format is written per channel or per tensor here")
    scale = rec.scale.float()
    per_tensor = isinstance(rec.weight.granularity, PerTensor)
    state: dict[str, torch.Tensor] = {"weight_scale": scale.reshape(1) if per_tensor
                                      else scale.reshape(-1, 1)}
    codes = rec.qweight if rec.mask is None else torch.where(  # pruned: the zero code
        rec.mask, rec.qweight, torch.zeros_like(rec.qweight))
    # the weight the compressor re-quantizes: the record's codes times the stored scale
    state["weight"] = codes.float() * (scale.reshape(1, 1) if per_tensor
                                             else scale.reshape(-1, 1))
    if rec.act is not None and rec.act.static:
        if rec.act_scale is None:
            raise PluginError("static activation quantization without a calibrated scale")
        state["input_scale"] = rec.act_scale.reshape(1).float()
    fmt = CompressionFormat.float_quantized.value
    out = BaseCompressor.get_value_from_registry(fmt).compress(state, scheme)
    written = out["weight"]
    if written.dtype != rec.qweight.dtype or not torch.equal(written.float(), codes.float()):
        raise PluginError("compressed-tensors re-quantized different FP8 codes than the "
                          "record holds")
    return dict(out), fmt, wargs, iargs


def unquantized_matrices(model: Any, records: dict[str, QuantizedLinear]) -> list[str]:
    """Modules holding a 2-D ``weight`` that no record quantizes (the head, MoE routers,
    linears an adapter keeps in float), embeddings excepted: the config's ``ignore`` list."""
    out = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (name and name not in records and isinstance(weight, torch.Tensor)
                and weight.dim() == 2 and not isinstance(module, torch.nn.Embedding)):
            out.append(name)
    return out


def checkpoint_names(model: Any, names: list[str]) -> list[str]:
    """Module names as the saved checkpoint spells them: transformers may rename modules on
    load (``model._weight_conversions``, e.g. Mixtral's ``block_sparse_moe`` -> ``mlp``) and
    ``save_pretrained`` renames them back; the config must use the saved names."""
    conversions = getattr(model, "_weight_conversions", None) or []
    reverse = [c.reverse_transform() for c in reversed(conversions)]
    out = []
    for name in names:
        key = name + ".weight"
        for rev in reverse:
            renamed, matched = rev.rename_source_key(key)
            if matched is not None:
                key = renamed
        out.append(key.removesuffix(".weight"))
    return out


def export(run: Any, model: Any, records: dict[str, QuantizedLinear], out_dir: Path, *,
           scale_dtype: torch.dtype | None = None,
           accepts: frozenset[str] = ACCEPTS | SPARSE) -> list[Path]:
    """The compressed-tensors folder; scales in the model's dtype unless ``scale_dtype``;
    ``accepts``: the record features the calling backend writes (vllm/sglang: ``ACCEPTS``
    and ``SPARSE``). Pruned weights are written as the codes of exact zero
    (:mod:`llmcq_vllm.sparse`); a pruned run without quantization writes the float model."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )

    if not records:
        if getattr(getattr(run, "specs", None), "sparsity", None) is not None:
            # pruned without quantization: vLLM/SGLang run the float model as it is
            return save_hf_folder(model, getattr(run, "tokenizer", None), out_dir)
        raise PluginError("nothing to export: the run produced no quantized linears")
    dtype = scale_dtype or storage_dtype(model)
    state = OrderedDict((k, v.detach().to("cpu")) for k, v in model.state_dict().items())
    groups: dict[str, tuple[dict, dict | None, str, list[str]]] = {}
    for name in sorted(records):
        rec = records[name].to("cpu")
        _check_record(name, rec, accepts)
        tensors, fmt, wargs, iargs = compress_record(rec, dtype)
        state.pop(f"{name}.weight", None)
        for key, value in tensors.items():
            state[f"{name}.{key}"] = value.contiguous()
        if rec.bias is not None:
            state[f"{name}.bias"] = rec.bias.detach().to("cpu", dtype)
        key = json.dumps([wargs, iargs, fmt], sort_keys=True)
        groups.setdefault(key, (wargs, iargs, fmt, []))[3].append(name)

    kv_state, kv_args = kv_cache_export(run, model)  # FP8 KV scales (quant.kvcache)
    state.update(kv_state)
    ignore = sorted(checkpoint_names(model, unquantized_matrices(model, records)))
    single = len(groups) == 1
    config_groups = {}
    formats = set()
    for i, (wargs, iargs, fmt, names) in enumerate(groups.values()):
        formats.add(fmt)
        config_groups[f"group_{i}"] = QuantizationScheme(
            targets=["Linear"] if single else sorted(checkpoint_names(model, names)),
            weights=QuantizationArgs(**wargs),
            input_activations=None if iargs is None else QuantizationArgs(**iargs),
            format=None if single else CompressionFormat(fmt))
    qconfig = QuantizationConfig(
        config_groups=config_groups, ignore=ignore,
        format=formats.pop() if len(formats) == 1 else CompressionFormat.mixed_precision.value,
        quantization_status=QuantizationStatus.COMPRESSED,
        kv_cache_scheme=None if kv_args is None else QuantizationArgs(**kv_args))

    save_hf_folder(model, None, out_dir, state_dict=state)
    ModelCompressor(quantization_config=qconfig).update_config(str(out_dir))
    if run is not None and getattr(run, "tokenizer", None) is not None:
        run.tokenizer.save_pretrained(str(out_dir))
    return sorted(out_dir.iterdir())


def export_lightllm(run: Any, model: Any, records: dict[str, QuantizedLinear],
                    out_dir: Path) -> list[Path]:
    """The same files with fp32 scales (LightLLM hands them to ``cutlass_scaled_mm`` as they
    are) and LightLLM's top-level ``activation_scheme`` key in config.json."""
    files = export(run, model, records, out_dir, scale_dtype=torch.float32,
                   accepts=LIGHTLLM_SPEC.accepts)
    static = any(r.act is not None and r.act.static for r in records.values())
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["activation_scheme"] = "static" if static else "dynamic"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return files
