"""Write a llama.cpp GGUF file from llmcq's records, keeping their integer codes.

Each record with groups of 32 is written block by block in the llama.cpp type whose grid is
llmcq's (see :func:`llmcq_gguf.ggml_type_for`): the codes are copied, the scale becomes the
block's fp16 ``d`` (and, for Q4_1, ``m = -zero * scale`` in fp16). Nothing is re-quantized, so
GPTQ/AWQ-optimised codes survive; the only change is the fp16 rounding of ``d``/``m`` that the
format imposes. Other tensors (embeddings, norms, an untied head, linears kept in float by
``ignored_layers``) are written as F32. With per-linear grids each tensor has its own type;
the file is then ``model-mixed.gguf`` and its ``general.file_type`` the type holding the most
weights.

Names come from the ``gguf`` package's ``TensorNameMap``; Q and K rows are permuted the way
llama.cpp's converter does for the llama architecture (readers undo it). Metadata (hyper-
parameters, tokenizer, chat template) is copied from the source GGUF when the model was loaded
from one, otherwise built from the HF config and a byte-level BPE ``tokenizer.json`` with the
``gguf`` package's vocabulary helpers.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from llmcq.capabilities import describe_features
from llmcq.errors import PluginError
from llmcq.quant.record import QuantizedLinear
from llmcq.quant.spec import PerGroup

from llmcq_gguf import BLOCK, SPEC, ggml_type_for

__all__ = ["export", "pack_record", "rope_row_permutation", "FILE_NAME"]

FILE_NAME = "model-{type}.gguf"
#: metadata not copied from a source GGUF (rewritten, or describing the source's tensors)
_SKIP_KEYS = ("general.file_type", "general.quantization_version", "general.architecture",
              "general.alignment")


def pack_record(rec: QuantizedLinear) -> tuple[np.ndarray, str]:
    """llama.cpp blocks of one record: ``uint8 [out, in / 32 * type_size]`` and the type name."""
    gtype = ggml_type_for(rec.bits, rec.symmetric)
    gran = rec.weight.granularity
    if gtype is None or not isinstance(gran, PerGroup) or gran.size != BLOCK:
        raise PluginError(f"record {rec.describe()} has no exact llama.cpp type (needs g32 "
                          "W8 sym, W4 sym or W4 asym)")
    extra = set(rec.features()) - SPEC.accepts  # core's check_records refused these already
    if extra:
        raise PluginError(f"record {rec.describe()}: {describe_features(extra)} cannot be "
                          "written as GGUF")
    if rec.in_features % BLOCK:
        raise PluginError(f"record {rec.describe()}: in_features {rec.in_features} not a "
                          "multiple of 32 cannot be written as GGUF")
    out, n_in = rec.out_features, rec.in_features
    groups = n_in // BLOCK
    q = rec.qweight.to("cpu")
    d = rec.scale.to("cpu").float().reshape(out, groups).half()
    d_bytes = d.view(torch.uint8).reshape(out, groups, 2)
    if gtype == "Q8_0":
        qs = q.to(torch.int8).reshape(out, groups, BLOCK).view(torch.uint8)
        blocks = torch.cat([d_bytes, qs], dim=-1)
    else:
        nib = (q.to(torch.int16) + (8 if gtype == "Q4_0" else 0)).to(torch.uint8)
        nib = nib.reshape(out, groups, BLOCK)
        qs = nib[..., : BLOCK // 2] | (nib[..., BLOCK // 2:] << 4)
        parts = [d_bytes]
        if gtype == "Q4_1":
            assert rec.zero is not None
            m = (-rec.zero.to("cpu").float().reshape(out, groups)
                 * rec.scale.to("cpu").float().reshape(out, groups)).half()
            parts.append(m.view(torch.uint8).reshape(out, groups, 2))
        blocks = torch.cat([*parts, qs], dim=-1)
    return blocks.reshape(out, -1).contiguous().numpy(), gtype


def rope_row_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp's llama converter gives Q (``n_head``) and K (``n_head_kv``): within
    each head, HF's two rotary halves are interleaved back to pairs."""
    half = rows // n_head // 2
    return torch.arange(rows).reshape(n_head, 2, half).transpose(1, 2).reshape(-1)


def _rope_theta(config: Any) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        params = getattr(config, "rope_parameters", None) or {}
        theta = params.get("rope_theta", 10000.0)
    return float(theta)


def _copy_metadata(writer: Any, source: Path) -> None:
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(source))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in _SKIP_KEYS or not field.types:
            continue
        main = field.types[0]
        value = field.contents()
        if main == GGUFValueType.ARRAY:
            writer.add_key_value(key, value, main, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, main)


def _metadata_from_hf(writer: Any, model: Any, tokenizer: Any) -> None:
    from gguf import BpeVocab, SpecialVocab

    c = model.config
    heads = int(c.num_attention_heads)
    head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // heads)
    writer.add_name(str(getattr(c, "_name_or_path", "") or "llmcq-export"))
    writer.add_context_length(int(c.max_position_embeddings))
    writer.add_embedding_length(int(c.hidden_size))
    writer.add_block_count(int(c.num_hidden_layers))
    writer.add_feed_forward_length(int(c.intermediate_size))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(getattr(c, "num_key_value_heads", None) or heads))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(_rope_theta(c))
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    writer.add_vocab_size(int(c.vocab_size))
    if tokenizer is None:
        raise PluginError("gguf: the run has no tokenizer to write")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        try:
            vocab = BpeVocab(Path(tmp))
        except FileNotFoundError as exc:
            raise PluginError("gguf: only byte-level BPE tokenizers (tokenizer.json) are "
                              "converted from a Hugging Face source; load the model from a "
                              "GGUF to copy its tokenizer") from exc
        tokens, scores, types = [], [], []
        for text, score, ttype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(int(ttype))
        n_vocab = int(c.vocab_size)
        if len(tokens) < n_vocab:  # embedding rows beyond the tokenizer: padding tokens
            for i in range(len(tokens), n_vocab):
                tokens.append(f"[PAD{i}]".encode())
                scores.append(-1000.0)
                types.append(5)  # UNUSED
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens[:n_vocab])
        writer.add_token_types(types[:n_vocab])
        SpecialVocab(Path(tmp), load_merges=True, n_vocab=n_vocab).add_to_gguf(writer)


def export(run: Any, model: Any, records: dict[str, QuantizedLinear], out_dir: Path) -> list[Path]:
    import gguf

    if not records:
        raise PluginError("gguf: the run produced no quantized linears")
    c = model.config
    n_blocks = int(c.num_hidden_layers)
    n_head = int(c.num_attention_heads)
    n_kv = int(getattr(c, "num_key_value_heads", None) or n_head)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, n_blocks)

    packed: dict[str, tuple[np.ndarray, str]] = {}
    for name in sorted(records):
        packed[name] = pack_record(records[name])
    # per-linear grids: each tensor keeps its own type; the file's type is the one holding
    # the most weights (llama.cpp's "mostly" convention) and the file is named "mixed"
    weights: dict[str, int] = {}
    for name, (_, t) in packed.items():
        rec = records[name]
        weights[t] = weights.get(t, 0) + rec.out_features * rec.in_features
    main = max(sorted(weights), key=lambda t: weights[t])
    ftype = {"Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
             "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[main]

    path = out_dir / FILE_NAME.format(type=main if len(weights) == 1 else "mixed")
    writer = gguf.GGUFWriter(str(path), "llama")
    source = getattr(getattr(run, "resolved", None), "source", None)
    if source is not None and source.gguf_file is not None:
        _copy_metadata(writer, source.folder / source.gguf_file)
    else:
        _metadata_from_hf(writer, model, getattr(run, "tokenizer", None))
    writer.add_file_type(int(ftype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tied = bool(getattr(c, "tie_word_embeddings", False))
    state = model.state_dict()
    for key, tensor in state.items():
        if tied and key == "lm_head.weight":
            continue
        module, _, suffix = key.rpartition(".")
        gname = names.get_name(module)
        if gname is None:
            raise PluginError(f"gguf: no llama.cpp name for tensor {key!r}")
        gname = f"{gname}.{suffix}"
        perm = None
        if module.endswith("self_attn.q_proj"):
            perm = rope_row_permutation(tensor.shape[0], n_head)
        elif module.endswith("self_attn.k_proj"):
            perm = rope_row_permutation(tensor.shape[0], n_kv)
        if suffix == "weight" and module in packed:
            blocks, gtype = packed[module]
            if perm is not None:
                blocks = blocks[perm.numpy()]
            writer.add_tensor(gname, np.ascontiguousarray(blocks),
                              raw_dtype=gguf.GGMLQuantizationType[gtype])
            continue
        t = tensor.detach().to("cpu", torch.float32)
        if perm is not None:
            t = t[perm]
        writer.add_tensor(gname, np.ascontiguousarray(t.numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return [path]
