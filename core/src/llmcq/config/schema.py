"""The typed run config: llmc's YAML sections and keys, validated strictly.

Every section forbids unknown keys and is frozen. Values are checked here where the rule is
local to one section; rules that need the installed plugins (method names, backend support,
an algorithm's ``special`` keys) are checked in :mod:`llmcq.config.loader`. Nothing here
imports torch.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "Section",
    "SpecialConfig",
    "BaseSection",
    "ModelSection",
    "CalibSection",
    "EvalSection",
    "WeightQuantSection",
    "ActQuantSection",
    "QuantSection",
    "KVCacheSection",
    "MixBitsSetting",
    "BitBudgetSection",
    "IgnoredLayersSection",
    "SparseWeightSection",
    "SparseSection",
    "SaveSection",
    "RunConfig",
    "EVAL_POSITIONS",
    "DTYPES",
    "QUANT_TYPES",
    "FLOAT_BITS",
    "KV_METHODS",
    "KV_GRANULARITIES",
]

#: ``fake_quant_wo_kv`` (llmc's): the fake-quantized model with a float KV cache
EVAL_POSITIONS = ("pretrain", "transformed", "fake_quant", "fake_quant_wo_kv")
DTYPES = ("auto", "float32", "float16", "bfloat16")
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
                  "float": "float32"}


def _is_tuple_type(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_tuple_type(a) for a in typing.get_args(annotation))
    return annotation is tuple


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, types are strict, frozen.

    YAML has no tuples: a list given for a field typed as a tuple is taken as that tuple
    (strict mode would refuse it otherwise)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _yaml_lists_as_tuples(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, info in cls.model_fields.items():
            if isinstance(out.get(name), list) and _is_tuple_type(info.annotation):
                out[name] = tuple(out[name])
        return out


class SpecialConfig(Section):
    """Base for an algorithm's ``quant.special`` block. Subclass it in a plugin's config module.

    Keep it torch-free: it is imported by ``llmcq validate``.
    """


class BaseSection(Section):
    seed: int = 42
    #: llmcq extension: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
    device: str = "auto"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        v = v.strip().lower()
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("allowed: auto, cpu, cuda, cuda:N")


class ModelSection(Section):
    #: adapter name from ``llmcq.models`` (llmc spellings work: Llama, Opt, ...). When absent,
    #: the adapter serving the checkpoint's ``config.model_type`` is used.
    type: str | None = None
    #: a local Hugging Face folder or a ``.gguf`` file; absent means the bundled SmolLM2-135M.
    path: str | None = None
    torch_dtype: str = "auto"
    tokenizer_mode: Literal["fast", "slow"] = "fast"
    trust_remote_code: bool = False

    @field_validator("torch_dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        key = v.strip().lower().removeprefix("torch.")
        key = _DTYPE_ALIASES.get(key, key)
        if key not in DTYPES:
            raise ValueError(f"allowed: {', '.join(DTYPES)}")
        return key


class CalibSection(Section):
    #: dataset name from ``llmcq.datasets`` (wikitext2, c4, ptb, pileval, custom_txt, ...).
    name: str
    #: llmc's download switch. Downloads are not supported: data is read from ``path``.
    download: bool = False
    path: str | None = None
    n_samples: int = Field(128, ge=1)
    #: samples per forward batch; -1 puts every sample in one batch (llmc semantics).
    bs: int = 1
    seq_len: int = Field(512, ge=8)
    #: preprocessor name (wikitext2_gptq, c4_gptq, ptb_gptq, pileval_awq, pileval_smooth,
    #: pileval_omni, txt_general_preproc/general, random_truncate_txt).
    preproc: str = "general"
    seed: int = 42
    padding: bool = False
    apply_chat_template: bool = False

    @field_validator("bs")
    @classmethod
    def _bs(cls, v: int) -> int:
        if v == -1 or v >= 1:
            return v
        raise ValueError("allowed: -1 (all samples in one batch) or a positive integer")


class EvalSection(Section):
    eval_pos: list[Literal["pretrain", "transformed", "fake_quant", "fake_quant_wo_kv"]] = Field(
        default_factory=lambda: ["pretrain", "fake_quant"])
    #: dataset name(s) from ``llmcq.datasets``.
    name: str | list[str] = "wikitext2"
    download: bool = False
    #: a path, or one path per name when ``name`` is a list.
    path: str | list[str] | None = None
    bs: int = Field(1, ge=1)
    seq_len: int = Field(2048, ge=8)
    inference_per_block: bool = False
    #: evaluator name from ``llmcq.evaluators``.
    type: str = "ppl"
    #: llmcq extension: evaluate only the first N windows (quick checks); absent = all.
    #: ``type: decode_ppl``: the number of windows decoded token by token (llmc's key).
    num_samples: int | None = Field(None, ge=1)
    #: llmcq extension, with ``quant.kvcache`` at the fake_quant position: ``type: ppl`` feeds
    #: each window through the quantized cache in forwards of this many tokens (absent: the
    #: whole window in one forward; 1: token by token, as ``decode_ppl``).
    kv_chunk: int | None = Field(None, ge=1)
    #: llmcq extension, for evaluators that read lm-evaluation-harness tasks (``type: tasks``):
    #: the task names, their data read from local files under ``path`` (the data root).
    tasks: list[str] | None = None
    #: llmcq extension, ``type: tasks``: score only the first N documents of each task
    #: (lm-evaluation-harness's ``limit``); absent = all.
    limit: int | None = Field(None, ge=1)

    @property
    def names(self) -> list[str]:
        return [self.name] if isinstance(self.name, str) else list(self.name)

    @property
    def paths(self) -> list[str | None]:
        if self.path is None or isinstance(self.path, str):
            return [self.path] * len(self.names)
        return list(self.path)

    @model_validator(mode="after")
    def _paths_match_names(self) -> EvalSection:
        if isinstance(self.path, list) and len(self.path) != len(self.names):
            raise ValueError(
                f"eval.path has {len(self.path)} entries but eval.name has {len(self.names)}: "
                "give one path per name, or a single path")
        return self


#: llmc's ``quant_type`` values: integer grids, or float elements (``bit`` names the format)
QUANT_TYPES = ("int-quant", "float-quant")
#: float element formats for ``quant_type: float-quant`` (llmc also lists e5m2: not supported)
FLOAT_BITS = ("e4m3",)


class _QuantBase(Section):
    #: llmc's ``quant_type``: int-quant (integer grid, ``bit`` 2..8) or float-quant (``bit``
    #: names the float format: e4m3).
    quant_type: Literal["int-quant", "float-quant"] = "int-quant"
    bit: Annotated[int, Field(ge=2, le=8)] | str
    symmetric: bool = True
    #: symmetric integer scale: restricted (llmc, absmax / (2^(b-1) - 1)) or full
    #: (compressed-tensors / llm-compressor, absmax / (2^(b-1) - 1/2), code -2^(b-1) used).
    sym_range: Literal["restricted", "full"] = "restricted"
    group_size: int = -1
    ste: bool = False
    #: llmc's qtorch switch for float emulation: accepted and ignored (llmcq rounds with
    #: torch's float8 dtypes).
    use_qtorch: bool = False

    @property
    def is_float(self) -> bool:
        return self.quant_type == "float-quant"

    @model_validator(mode="after")
    def _sym_range(self) -> _QuantBase:
        if self.sym_range == "full" and (not self.symmetric or self.is_float):
            raise ValueError("sym_range: full applies to symmetric integer grids "
                             f"(got symmetric={self.symmetric}, quant_type={self.quant_type})")
        return self

    @model_validator(mode="after")
    def _group(self) -> _QuantBase:
        gran = self.granularity  # type: ignore[attr-defined]
        if gran == "per_group":
            if self.group_size < 1:
                raise ValueError("granularity per_group needs group_size >= 1 "
                                 f"(got group_size={self.group_size})")
        elif self.group_size not in (-1, 0):
            raise ValueError(f"group_size={self.group_size} applies only to granularity per_group "
                             f"(got granularity={gran}); set group_size: -1 or per_group")
        return self


class WeightQuantSection(_QuantBase):
    granularity: Literal["per_tensor", "per_channel", "per_group"] = "per_channel"
    #: how the initial range is found: minmax; mse (clip-ratio grid search); learnable
    #: (trained by an algorithm that supports it, such as OmniQuant).
    calib_algo: Literal["minmax", "mse", "learnable"] = "minmax"
    #: llmc's packing switches: exporters always pack, so these are accepted and ignored.
    need_pack: bool = False
    pack_version: Literal["gemm_pack", "gemv_pack", "vllm_pack"] | None = None
    #: round the asymmetric zero point to an integer (llmc's ``round_zp``).
    round_zp: bool = True


class ActQuantSection(_QuantBase):
    granularity: Literal["per_token", "per_tensor", "per_group"] = "per_token"
    #: static: one scale per tensor fixed on calibration data; otherwise dynamic at run time.
    static: bool = False
    calib_algo: Literal["minmax"] = "minmax"

    @model_validator(mode="after")
    def _static(self) -> ActQuantSection:
        if self.static and self.granularity != "per_tensor":
            raise ValueError("static activation quantization needs granularity per_tensor "
                             f"(got {self.granularity})")
        return self


#: llmc's ``quant.kvcache.method`` spellings -> llmcq's method name
KV_METHODS = {"naive": "naive", "kivi": "kivi"}
KV_GRANULARITIES = ("per_token", "per_head", "per_channel", "per_tensor")


class KVCacheSection(Section):
    """llmc's ``quant.kvcache``: the attention's key/value cache stored on a grid (evaluated
    with the quantized cache in place, :mod:`llmcq.quant.kvcache`). Cross-key rules
    (static granularities, KIVI's keys) are checked by :func:`llmcq.config.kv_checks.check_kvcache`
    so each error names its key."""

    #: Naive (keys and values on one grid) or Kivi (keys per channel in groups of tokens,
    #: values per token, the most recent ``residual_length`` tokens kept in float, as the
    #: KIVI paper; llmc's Kivi used ``granularity`` for both)
    method: str
    #: int-quant (integer grid, ``bit`` 2..16) or float-quant (``bit: e4m3``, FP8)
    quant_type: Literal["int-quant", "float-quant"] = "int-quant"
    bit: Annotated[int, Field(ge=2, le=16)] | str
    symmetric: bool = True
    #: Naive: the grid of keys and values (per_token: one scale per token over all heads;
    #: per_head: per token and head; per_channel / per_tensor: over the tokens quantized
    #: together, or static). Kivi: the values' grid (per_token or per_head); keys are per
    #: channel.
    granularity: Literal["per_token", "per_head", "per_channel", "per_tensor"] = "per_token"
    #: Kivi: tokens per key group (the paper's G; -1: one group of ``residual_length``)
    group_size: int = -1
    #: Naive per_tensor / per_channel: ranges fixed on the calibration data (``calib``)
    static: bool = False
    #: Kivi: the most recent tokens kept in full precision (the paper's R; llmc's default 128)
    residual_length: int | None = Field(None, ge=1)

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v.strip().lower() not in KV_METHODS:
            raise ValueError("allowed: Naive, Kivi")
        return v

    @property
    def method_name(self) -> str:
        return KV_METHODS[self.method.strip().lower()]

    @property
    def residual(self) -> int:
        return 128 if self.residual_length is None else self.residual_length


#: how a ``quant.mix_bits`` entry names linears: a text found in the linear's name within
#: its block, optionally ``#`` and block indices joined by ``-`` (a list, not a range)
LAYER_ENTRY = re.compile(r"^(?P<text>[^#]+?)(?:#(?P<blocks>\d+(?:-\d+)*))?$")


class MixBitsSetting(Section):
    """One ``quant.mix_bits.setting_<i>``: the grids of some linears (llmc's layer-wise
    mixed precision). ``weight``/``act`` replace the global sections for these linears
    (they are not merged with them); a setting without ``act`` leaves its linears'
    inputs unquantized even when ``quant.act`` is set, as in llmc."""

    #: the linears: a text contained in the linear's name within its block (``down_proj``
    #: matches ``mlp.down_proj`` in every block), optionally ``#`` and block indices joined
    #: by ``-``: ``down_proj#0-1-31`` is blocks 0, 1 and 31 (a list, as llmc reads it)
    layer_name: list[str]
    #: False keeps these linears in float (neither weights nor inputs quantized)
    do_quant: bool = True
    #: these linears' weight grid (required when do_quant is True)
    weight: WeightQuantSection | None = None
    #: these linears' activation quantization; absent: their inputs stay in float
    act: ActQuantSection | None = None

    @field_validator("layer_name", mode="before")
    @classmethod
    def _one_name(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("layer_name")
    @classmethod
    def _entries(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("layer_name is empty: name at least one linear (down_proj, "
                             "self_attn.o_proj#0-1, ...)")
        for i, entry in enumerate(v):
            if not LAYER_ENTRY.match(entry.strip()):
                raise ValueError(f"entry {i} ({entry!r}) is not NAME or NAME#i-j-k (a text "
                                 "of the linear's name, then block indices joined by '-')")
        return [e.strip() for e in v]

    @model_validator(mode="after")
    def _grids(self) -> MixBitsSetting:
        if self.do_quant and self.weight is None:
            raise ValueError("do_quant: True needs a weight section (bit, symmetric, "
                             "granularity, group_size): it replaces quant.weight for these "
                             "linears")
        if not self.do_quant and (self.weight is not None or self.act is not None):
            raise ValueError("do_quant: False keeps these linears in float; remove weight "
                             "and act")
        return self


class BitBudgetSection(Section):
    """``quant.bit_budget`` (llmcq extension): choose each linear's width among ``widths``
    so that the model's measured output error is smallest at a target average
    (:mod:`llmcq.budget`; docs/mixed_precision.md, "Bit-budget search")."""

    #: the average bits per quantized weight to reach (never exceeded)
    target: float = Field(gt=0)
    #: True: the target counts storage as results.json's bits_per_param does (codes, a
    #: 16-bit scale per group, zero points); False: code bits only (weight_bits_mean)
    count_overhead: bool = True
    #: candidate widths of every linear, each a grid like quant.weight at that bit
    widths: tuple[int, ...] = (2, 3, 4)
    #: calibration samples (the first of the calib section's) the sensitivities are
    #: measured on
    n_samples: int = Field(8, ge=1)
    #: use only the first seq_len tokens of each of those samples (the search's cost grows
    #: with the tokens); absent: calib.seq_len
    seq_len: int | None = Field(None, ge=2)
    #: write the chosen allocation here as a quant.mix_bits YAML snippet (optional)
    save_path: str | None = None

    @field_validator("widths")
    @classmethod
    def _widths(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v:
            raise ValueError("allowed: one or more integer widths from 2 to 8 ([2, 3, 4])")
        bad = [b for b in v if not 2 <= b <= 8]
        if bad:
            raise ValueError(f"allowed: integer widths from 2 to 8 (got {bad})")
        if len(set(v)) != len(v):
            raise ValueError(f"widths repeat: {list(v)}; list each width once")
        return tuple(sorted(v))


#: ``ignored_layers.block_ids`` entries: an index, or an inclusive range ``15-23``
BLOCK_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


class IgnoredLayersSection(Section):
    """llmc's top-level ``ignored_layers``: linears kept in float (high precision).

    A linear is kept in float when its block is in ``block_ids`` and its name within the
    block is one of ``layer_names`` (both needed), or when its full name is one of
    ``speical_names`` (llmc's spelling) / ``special_names``."""

    #: blocks whose ``layer_names`` stay in float: indices and inclusive ranges (``15-23``)
    block_ids: list[int | str] = Field(default_factory=list)
    #: linear names within a block (``self_attn.q_proj``), matched exactly
    layer_names: list[str] = Field(default_factory=list)
    #: full linear names (``model.layers.0.mlp.down_proj``), llmc's spelling
    speical_names: list[str] = Field(default_factory=list)
    #: the same as ``speical_names``, spelled correctly
    special_names: list[str] = Field(default_factory=list)

    @field_validator("block_ids")
    @classmethod
    def _ranges(cls, v: list[int | str]) -> list[int | str]:
        for i, item in enumerate(v):
            if isinstance(item, int):
                if item < 0:
                    raise ValueError(f"entry {i} ({item}): block indices are >= 0")
                continue
            m = BLOCK_RANGE.match(item)
            if m is None:
                raise ValueError(f"entry {i} ({item!r}): allowed: a block index (4) or an "
                                 "inclusive range start-end (15-23)")
            if m.group(2) is not None and int(m.group(1)) > int(m.group(2)):
                raise ValueError(f"entry {i} ({item!r}): a range start-end needs start <= end")
        return v

    @model_validator(mode="after")
    def _pairs(self) -> IgnoredLayersSection:
        if self.block_ids and not self.layer_names:
            raise ValueError("block_ids select the blocks whose layer_names stay in float; "
                             "give layer_names too (or full names in special_names)")
        if self.layer_names and not self.block_ids:
            raise ValueError("layer_names apply to the blocks in block_ids; give block_ids "
                             "too (or full names in special_names)")
        return self

    def blocks(self) -> list[int]:
        """``block_ids`` expanded (ranges inclusive), in order, without repeats."""
        out: list[int] = []
        for item in self.block_ids:
            if isinstance(item, int):
                ids = [item]
            else:
                m = BLOCK_RANGE.match(item)
                assert m is not None  # checked by the validator
                lo = int(m.group(1))
                ids = list(range(lo, int(m.group(2) or lo) + 1))
            out += [i for i in ids if i not in out]
        return out

    @property
    def full_names(self) -> list[str]:
        return list(dict.fromkeys([*self.speical_names, *self.special_names]))


class QuantSection(Section):
    #: algorithm name from ``llmcq.algorithms``, or a list run in order per block
    #: (for example [awq, gptq]).
    method: str | list[str]
    weight: WeightQuantSection | None = None
    act: ActQuantSection | None = None
    #: llmc's KV-cache quantization (:class:`KVCacheSection`)
    kvcache: KVCacheSection | None = None
    #: the algorithm's own keys; for a list of methods, one mapping per method name.
    special: dict[str, Any] = Field(default_factory=dict)
    #: feed each block the quantized outputs of the block before it (llmc semantics).
    quant_out: bool = False
    #: llmcq extension: record each quantized linear's and block's relative output error on
    #: the calibration inputs (results.json ``calibration_error``, the report's error plots);
    #: costs two extra block forwards per calibration batch and, briefly, a dequantized copy
    #: of the block's weights: False skips it (very large blocks, timing runs)
    calib_error: bool = True
    #: llmc's layer-wise mixed precision: ``setting_0``, ``setting_1``, ... each giving some
    #: linears their own weight/act grids or keeping them in float (``do_quant: False``)
    mix_bits: dict[str, MixBitsSetting] | None = None
    #: llmcq extension: search each linear's width for a target average number of bits
    #: (:class:`BitBudgetSection`)
    bit_budget: BitBudgetSection | None = None

    @property
    def methods(self) -> list[str]:
        return [self.method] if isinstance(self.method, str) else list(self.method)

    @model_validator(mode="after")
    def _something_to_do(self) -> QuantSection:
        if not self.methods:
            raise ValueError("quant.method is an empty list")
        return self

    @field_validator("mix_bits")
    @classmethod
    def _setting_names(cls, v: dict[str, MixBitsSetting] | None
                       ) -> dict[str, MixBitsSetting] | None:
        if v is None:
            return v
        expected = [f"setting_{i}" for i in range(len(v))]
        if sorted(v, key=_setting_index) != expected:
            raise ValueError(f"settings are named {', '.join(expected)} (llmc reads them by "
                             f"index, later ones after earlier ones); got {', '.join(v)}")
        return {k: v[k] for k in expected}


def _setting_index(name: str) -> tuple[int, str]:
    tail = name.removeprefix("setting_")
    return (int(tail), "") if tail.isdigit() else (1 << 30, name)


class SparseWeightSection(Section):
    #: fraction of each pruned linear's weights set to zero (unstructured masks)
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    #: llmcq: ``unstructured`` or ``N:M`` (at most N non-zeros in every M consecutive input
    #: weights of a row: ``2:4``, ``4:8``); with N:M the sparsity is ``1 - N/M``
    mask_structure: str = "unstructured"
    #: whole blocks to remove (ShortGPT)
    n_prune_layers: int | None = Field(None, ge=1)

    @field_validator("mask_structure")
    @classmethod
    def _structure(cls, v: str) -> str:
        from llmcq.sparsity import parse_structure

        try:
            return str(parse_structure(v))
        except ValueError:
            raise ValueError("allowed: unstructured, N:M with 1 <= N < M (2:4, 4:8)") from None


class SparseSection(Section):
    #: a sparse algorithm from ``llmcq.algorithms`` (kind "sparse"), or a list run in order
    method: str | list[str]
    weight: SparseWeightSection | None = None
    special: dict[str, Any] = Field(default_factory=dict)
    #: feed each block the pruned outputs of the block before it (llmc); False: the dense
    #: block's outputs
    sparsity_out: bool = False

    @model_validator(mode="after")
    def _something_to_do(self) -> SparseSection:
        if not self.methods:
            raise ValueError("sparse.method is an empty list")
        return self

    @property
    def methods(self) -> list[str]:
        return [self.method] if isinstance(self.method, str) else list(self.method)


#: a save flag of a plugin's backend: ``save_<backend name>`` (llmc's own are SAVE_FLAGS)
PLUGIN_FLAG_PREFIX = "save_"
#: llmc's save flags and the backend each selects.
SAVE_FLAGS = {
    "save_trans": "trans",
    "save_fp": "trans",  # llmc's older name of save_trans (TesseraQ's README configs)
    "save_fake": "fake",
    "save_vllm": "vllm",
    "save_sgl": "sglang",
    "save_lightllm": "lightllm",
    "save_autoawq": "autoawq",
    "save_mlcllm": "mlcllm",
    "save_trtllm": "trtllm",
    "save_autogptq": "gptq",
    "save_gguf": "gguf",
}


class SaveSection(Section):
    save_path: str = "./save"
    save_trans: bool = False
    #: llmc's older name of save_trans (the transformed float model)
    save_fp: bool = False
    save_fake: bool = False
    save_vllm: bool = False
    save_sgl: bool = False
    save_lightllm: bool = False
    save_autoawq: bool = False
    save_mlcllm: bool = False
    save_trtllm: bool = False
    save_autogptq: bool = False
    save_gguf: bool = False
    #: llmcq extension: backend names from ``llmcq.backends``, in addition to the flags.
    backends: list[str] = Field(default_factory=list)
    #: ``save_<name>: true`` for a backend llmc does not know (an installed plugin's, e.g.
    #: ``save_mixpack``): collected here from the section's other ``save_*`` keys, so a third
    #: party's backend gets a flag without a change to core; the backend must be installed
    plugin_flags: dict[str, bool] = Field(default_factory=dict)
    #: llmcq extension: replace existing outputs under save_path instead of refusing.
    overwrite: bool = False
    #: options per backend, e.g. ``trtllm_cfg: {tp_size: 1, pp_size: 1}``.
    trtllm_cfg: dict[str, Any] = Field(default_factory=dict)

    @staticmethod
    def collects_key(key: Any) -> bool:
        """Keys besides the fields this section takes: ``save_<backend>`` flags."""
        return isinstance(key, str) and key.startswith(PLUGIN_FLAG_PREFIX)

    @model_validator(mode="before")
    @classmethod
    def _plugin_flags(cls, data: Any) -> Any:
        """Move ``save_<name>`` keys that are not llmc's flags into ``plugin_flags``."""
        if not isinstance(data, dict):
            return data
        out = {k: v for k, v in data.items()
               if not (isinstance(k, str) and k.startswith(PLUGIN_FLAG_PREFIX)
                       and k not in cls.model_fields)}
        extra = {k: v for k, v in data.items() if k not in out}
        if extra:
            out["plugin_flags"] = {**dict(data.get("plugin_flags") or {}), **extra}
        return out

    @field_validator("plugin_flags")
    @classmethod
    def _plugin_flag_names(cls, v: dict[str, bool]) -> dict[str, bool]:
        for k in v:
            if not k.startswith(PLUGIN_FLAG_PREFIX) or len(k) == len(PLUGIN_FLAG_PREFIX):
                raise ValueError(f"{k!r} is not a save_<backend> flag")
        return v

    @staticmethod
    def flag_backend(flag: str) -> str:
        """The backend a flag selects: llmc's table, else ``save_<name>`` selects ``name``."""
        return SAVE_FLAGS.get(flag) or flag[len(PLUGIN_FLAG_PREFIX):]

    @property
    def backend_names(self) -> list[str]:
        """Selected backends in a stable order: llmc's flags first (llmc order), then the
        plugins' flags (as written), then the list."""
        names: list[str] = []
        for flag, backend in SAVE_FLAGS.items():
            if getattr(self, flag) and backend not in names:
                names.append(backend)
        for flag, on in self.plugin_flags.items():
            backend = self.flag_backend(flag)
            if on and backend not in names:
                names.append(backend)
        for b in self.backends:
            if b not in names:
                names.append(b)
        return names


class RunConfig(Section):
    base: BaseSection = Field(default_factory=BaseSection)
    model: ModelSection = Field(default_factory=ModelSection)
    calib: CalibSection | None = None
    #: one eval block, or a list of them (llmc accepts both).
    eval: list[EvalSection] = Field(default_factory=list)
    quant: QuantSection | None = None
    sparse: SparseSection | None = None
    save: SaveSection = Field(default_factory=SaveSection)
    #: llmc's linears kept in float (top level, as in llmc)
    ignored_layers: IgnoredLayersSection | None = None

    @field_validator("eval", mode="before")
    @classmethod
    def _eval_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict) else v
