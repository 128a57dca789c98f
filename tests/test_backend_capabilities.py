"""Backends declare the record features they write (``BackendSpec.accepts``); core refuses
every other feature a run produces at config time, naming the field, the value, what the
backend writes and the producing algorithm's hint, and again at export time for records that
hold an undeclared feature (``check_records``). No backend reads ``quant.special``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from llmcq.api import BackendSpec
from llmcq.capabilities import RECORD_FEATURES, Feature, check_backend, check_records
from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError, PluginError
from llmcq.plugins import registry

BACKENDS = ("fake", "trans", "vllm", "sglang", "lightllm", "gptq", "autoawq", "mlcllm", "gguf",
            "trtllm")
#: the save flag selecting each backend
FLAGS = {"vllm": "save_vllm", "sglang": "save_sgl", "lightllm": "save_lightllm",
         "gptq": "save_autogptq", "autoawq": "save_autoawq", "mlcllm": "save_mlcllm",
         "gguf": "save_gguf", "trtllm": "save_trtllm", "fake": "save_fake",
         "trans": "save_trans"}
#: what each backend writes faithfully (read from each exporter; see the backends' READMEs)
EXPECTED = {
    "fake": set(RECORD_FEATURES) - {"input_transform", "kv_cache_quant"},
    "trans": set(RECORD_FEATURES) - {"input_transform"},
    "vllm": {"act_quant", "float_format", "layer_grids", "float_linears", "sparsity_mask",
             "kv_cache_quant"},
    "sglang": {"act_quant", "float_format", "layer_grids", "float_linears", "sparsity_mask",
               "kv_cache_quant"},
    "lightllm": {"act_quant", "sparsity_mask"},
    "gptq": {"g_idx"},
    "autoawq": set(),
    "mlcllm": set(),
    "gguf": {"fractional_zero", "layer_grids", "float_linears"},
    "trtllm": {"act_quant", "fractional_zero"},
}
#: quantized-stage formats that pack uniform integer grids (no mixed bits, no masks)
PACKED = ("vllm", "sglang", "lightllm", "gptq", "autoawq", "mlcllm", "gguf", "trtllm")


def spec(name: str) -> BackendSpec:
    s, _ = registry.load_spec("llmcq.backends", name, field="save.backends", kind=BackendSpec)
    assert isinstance(s, BackendSpec)
    return s


def refuse(name: str, features: list[Feature]) -> ConfigError:
    s = spec(name)
    with pytest.raises(ConfigError) as err:
        check_backend(s.name, s.accepts, features, path=f"save.{FLAGS[name]}",
                      accepts_detail=s.accepts_detail, reasons=s.refusals)
    return err.value


def accept(name: str, features: list[Feature]) -> None:
    s = spec(name)
    check_backend(s.name, s.accepts, features, path=f"save.{FLAGS[name]}",
                  accepts_detail=s.accepts_detail, reasons=s.refusals)


@pytest.mark.parametrize("name", BACKENDS)
def test_each_backend_declares_what_its_exporter_writes(name: str) -> None:
    s = spec(name)
    assert set(s.accepts) == EXPECTED[name]
    assert set(s.accepts) <= set(RECORD_FEATURES)
    assert set(s.refusals) <= set(RECORD_FEATURES) - set(s.accepts) | set(s.accepts_detail)


def test_no_backend_reads_another_plugins_settings() -> None:
    """Issue 13 §1: backends decide from capabilities, never from quant.special or names."""
    root = Path(__file__).resolve().parents[1] / "plugins" / "backends"
    sources = sorted(root.glob("*/src/**/*.py"))
    assert len(sources) >= 10
    # (static_groups is also a key of the GPTQ format's own quantize_config: not matched)
    pattern = re.compile(r"special_of|quant\.special|\.special\b|percdamp|actorder|"
                         r"\.methods\b|\.recipe\b")
    for path in sources:
        code = "\n".join(line for line in path.read_text().splitlines()
                         if not line.lstrip().startswith("#"))
        code = re.sub(r'"""(.|\n)*?"""', "", code)  # docstrings may name the concepts
        assert not pattern.search(code), (path, pattern.search(code))


# ------------------------------------------------------------------ check_backend, by feature

GROUP_BITS = Feature("group_bits", "quant.special.slim.mixed", True, source="slim",
                     hint="set mixed: False for one width per linear")
MASK_24 = Feature("sparsity_mask", "sparse.method", None, detail="2:4", source="sparse",
                  hint="export with save_fake (dense, zeros kept) or prune without quantizing "
                       "and export with save_trans")
G_IDX = Feature("g_idx", "quant.special.actorder", True, source="gptq",
                hint="set static_groups: True (act-order kept, groups contiguous) or "
                     "actorder: False")


@pytest.mark.parametrize("name", PACKED)
def test_mixed_per_group_bits_to_a_uniform_grid_format_is_refused(name: str) -> None:
    err = refuse(name, [GROUP_BITS])
    msg = str(err)
    assert err.path == "quant.special.slim.mixed", msg
    assert f"backend {name}" in msg and "bit widths" in msg
    assert "set mixed: False" in msg and "slim" in msg  # the producer's hint and name
    assert f"{name} writes:" in msg


def test_mixed_per_group_bits_are_accepted_by_fake_quant() -> None:
    accept("fake", [GROUP_BITS])


#: compressed-tensors writers store pruned weights as the codes of exact zero (llmcq_vllm.sparse)
MASKED_CT = ("vllm", "sglang", "lightllm")


@pytest.mark.parametrize("name", [n for n in PACKED if n not in MASKED_CT])
def test_a_sparsity_mask_to_a_dense_only_format_is_refused(name: str) -> None:
    err = refuse(name, [MASK_24])
    msg = str(err)
    assert err.path == "sparse.method" and "sparsity mask" in msg and "save_fake" in msg, msg


@pytest.mark.parametrize("name", ["fake", "trans", *MASKED_CT])
def test_a_sparsity_mask_is_accepted_by_dense_float_checkpoints(name: str) -> None:
    accept(name, [MASK_24])


@pytest.mark.parametrize("name", ["vllm", "sglang", "lightllm", "autoawq", "mlcllm", "gguf",
                                  "trtllm"])
def test_g_idx_to_a_format_without_it_is_refused(name: str) -> None:
    err = refuse(name, [G_IDX])
    msg = str(err)
    assert err.path == "quant.special.actorder" and "static_groups: True" in msg
    assert "g_idx" in msg


@pytest.mark.parametrize("name", ["gptq", "fake"])
def test_g_idx_is_accepted_where_it_is_written(name: str) -> None:
    accept(name, [G_IDX])


def test_trtllm_takes_dynamic_activations_only() -> None:
    dyn = Feature("act_quant", "quant.act", "a8 per_token dynamic sym", detail="dynamic",
                  source="quant.act")
    static = Feature("act_quant", "quant.act", "a8 per_tensor static sym", detail="static",
                     source="quant.act")
    accept("trtllm", [dyn])
    msg = str(refuse("trtllm", [static]))
    assert "only as: dynamic" in msg and "per token" in msg
    accept("vllm", [static])
    accept("lightllm", [static])


@pytest.mark.parametrize("name", ["gguf", "gptq", "autoawq"])
def test_weight_only_formats_refuse_activations_in_their_own_words(name: str) -> None:
    act = Feature("act_quant", "quant.act", "a8 per_token dynamic sym", detail="dynamic",
                  source="quant.act", hint="remove quant.act for a weight-only export")
    err = refuse(name, [act])
    assert err.path == "quant.act"
    assert spec(name).refusals["act_quant"] in str(err)


# ------------------------------------------------------------- through resolve_config

@pytest.fixture(scope="module")
def llama128(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Path:
    """A tiny Llama whose widths suit every packed format (multiples of 64 and 128)."""
    from llmcq.testing.tiny_models import save_tiny_model, tiny_family_config

    cfg = tiny_family_config("llama", vocab_size=len(tiny_tokenizer))
    for k, v in dict(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32).items():
        setattr(cfg, k, v)
    return save_tiny_model(tmp_path_factory.mktemp("llama128"), cfg, tiny_tokenizer)


def _gptq_config(model: Path, data: Path, save: Path, backend: str, *,
                 static_groups: bool, recipe: bool = False) -> dict[str, Any]:
    group = 32 if backend == "gguf" else 64
    special: dict[str, Any] = {"actorder": True, "static_groups": static_groups}
    quant: dict[str, Any] = {
        "method": "gptq", "special": special,
        "weight": {"bit": 4, "symmetric": True, "granularity": "per_group", "group_size": group}}
    if recipe:
        quant["method"] = ["awq", "gptq"]
        quant["special"] = {"awq": {"trans": True, "trans_version": "v2"}, "gptq": special}
    return {"base": {"seed": 0, "device": "cpu"}, "model": {"type": "llama", "path": str(model)},
            "calib": {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                      "n_samples": 4, "seq_len": 64, "preproc": "wikitext2_gptq", "bs": 2},
            "quant": quant, "save": {"save_path": str(save), FLAGS[backend]: True}}


@pytest.mark.parametrize("backend", ["vllm", "sglang", "gguf", "trtllm", "autoawq", "mlcllm"])
def test_gptq_act_order_with_dynamic_groups_fails_at_config_time_with_the_hint(
        backend: str, llama128: Path, shared_data: Path, tmp_path: Path) -> None:
    cfg = _gptq_config(llama128, shared_data, tmp_path / "o", backend, static_groups=False)
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg)
    msg = str(err.value)
    assert err.value.path == "quant.special.actorder", msg
    assert "static_groups: True" in msg and "g_idx" in msg and f"backend {backend}" in msg
    assert "gptq produces" in msg
    # act-order with static groups keeps groups contiguous: no g_idx, accepted
    resolve_config(_gptq_config(llama128, shared_data, tmp_path / "o", backend,
                                static_groups=True))


def test_gptq_act_order_with_dynamic_groups_is_accepted_by_the_gptq_format(
        llama128: Path, shared_data: Path, tmp_path: Path) -> None:
    resolved = resolve_config(_gptq_config(llama128, shared_data, tmp_path / "o", "gptq",
                                           static_groups=False))
    assert [f.name for f in resolved.features] == ["g_idx"]


def test_in_a_recipe_the_refusal_names_the_steps_own_key(llama128: Path, shared_data: Path,
                                                        tmp_path: Path) -> None:
    """The field comes from GPTQ's declaration, not from a backend guessing GPTQ's keys."""
    cfg = _gptq_config(llama128, shared_data, tmp_path / "o", "vllm", static_groups=False,
                       recipe=True)
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg)
    assert err.value.path == "quant.special.gptq.actorder", str(err.value)
    assert "static_groups: True" in str(err.value)


@pytest.mark.parametrize("backend", ["gptq", "gguf", "trtllm", "autoawq"])
def test_a_pruning_mask_with_quantization_to_a_dense_only_format_fails_at_config_time(
        backend: str, llama128: Path, shared_data: Path, tmp_path: Path) -> None:
    cfg = _gptq_config(llama128, shared_data, tmp_path / "o", backend, static_groups=True)
    cfg["quant"] = {"method": "rtn", "weight": cfg["quant"]["weight"]}
    del cfg["calib"]
    cfg["sparse"] = {"method": "magnitude", "weight": {"mask_structure": "2:4"}}
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg)
    msg = str(err.value)
    assert err.value.path == "sparse.method" and "sparsity mask" in msg, msg
    assert "save_fake" in msg
    cfg["save"] = {"save_path": str(tmp_path / "o"), "save_fake": True}
    resolve_config(cfg)  # the fake-quant checkpoint holds the zeros


# ------------------------------------------------------------------ check_records, export time

def _record(**kw: Any) -> Any:
    import torch
    from llmcq.quant.qparams import quantize_weight
    from llmcq.quant.record import make_record
    from llmcq.quant.spec import PerGroup, WeightQuantSpec

    spec4 = WeightQuantSpec(bits=4, symmetric=True, granularity=PerGroup(32))
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    q, qp = quantize_weight(w, spec4)
    return make_record(q, qp, spec4, **kw)


def test_check_records_refuses_an_undeclared_feature_at_export_time() -> None:
    import torch

    g_idx = (torch.arange(128) // 32).flip(0).to(torch.int32)
    records = {"model.layers.0.mlp.down_proj": _record(),
               "model.layers.0.mlp.up_proj": _record(g_idx=g_idx)}
    vllm = spec("vllm")
    with pytest.raises(PluginError) as err:
        check_records(vllm.name, vllm.accepts, records, plugin="llmcq-gptq")
    msg = str(err.value)
    assert err.value.where == "model.layers.0.mlp.up_proj" and err.value.stage == "export"
    assert "g_idx" in msg and "vllm" in msg and err.value.plugin == "llmcq-gptq"
    gptq = spec("gptq")
    check_records(gptq.name, gptq.accepts, records)  # the GPTQ format writes g_idx


@pytest.mark.parametrize("name", PACKED)
def test_each_packed_exporter_refuses_a_record_it_cannot_hold(name: str, tmp_path: Path) -> None:
    """The exporters agree with check_records when called directly: a mixed-bit record is
    refused before anything is written."""
    import torch

    bits = torch.full((64, 4), 4)
    bits[:, 0] = 2
    rec = _record()
    rec.qweight[:, :32] = rec.qweight[:, :32].clamp(-2, 1)
    rec.group_bits = bits
    assert "group_bits" in rec.features() and rec.problems() == []
    with pytest.raises(PluginError):
        check_records(name, spec(name).accepts, {"model.layers.0.mlp.up_proj": rec})
    pack = {"gptq": "llmcq_gptqformat.export:pack_record",
            "autoawq": "llmcq_autoawq.export:pack_record",
            "mlcllm": "llmcq_autoawq.export:pack_record",
            "gguf": "llmcq_gguf.export:pack_record"}.get(name)
    if pack is not None:
        import importlib

        module, _, fn = pack.partition(":")
        with pytest.raises(PluginError, match="group_bits"):
            getattr(importlib.import_module(module), fn)(rec)
