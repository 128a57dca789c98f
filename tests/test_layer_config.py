"""Per-linear settings at config time and at model load: llmc's ``quant.mix_bits`` and
``ignored_layers`` parse with llmc's spellings and meaning, every mistake names its key, each
setting's grids go through the checks the global ones do (algorithms, backends), and names
that match no linear fail once the model is loaded, before any block runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import llmcq
from llmcq.api import AlgorithmSpec
from llmcq.config.loader import parse_run_config, resolve_config
from llmcq.errors import ConfigError
from llmcq.layers import LayerRules
from llmcq.plugins import registry
from llmcq.quant.spec import PerChannel, PerGroup, WeightQuantSpec
from llmcq.specs import RunSpecs

W4 = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32}
W8 = {"bit": 8, "symmetric": True, "granularity": "per_channel"}
#: the linears of a tiny Llama block (relative names), as the adapter's groups list them
LLAMA = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def config(model: Path | None = None, out: Path | None = None, **extra: Any) -> dict[str, Any]:
    quant = {"method": "rtn", "weight": dict(W4)}
    quant.update(extra.pop("quant", {}))
    cfg: dict[str, Any] = {"base": {"device": "cpu"}, "quant": quant, **extra}
    if model is not None:
        cfg["model"] = {"type": "llama", "path": str(model)}
    if out is not None:
        cfg.setdefault("save", {})["save_path"] = str(out)
    return cfg


def error_of(raw: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        resolve_config(raw) if "model" in raw else parse_run_config(raw)
    return err.value


def rules(raw: dict[str, Any]) -> LayerRules:
    specs = RunSpecs.from_config(parse_run_config(raw))
    assert specs.layers is not None
    return specs.layers


# ------------------------------------------------------------------ schema: keys and values

def test_llmc_spellings_parse() -> None:
    cfg = parse_run_config(config(
        quant={"mix_bits": {"setting_0": {"layer_name": ["down_proj#0-1-2-3-28-29-30-31"],
                                          "do_quant": True, "weight": dict(W8)},
                            "setting_1": {"layer_name": ["o_proj"], "do_quant": False}}},
        ignored_layers={"block_ids": [4, 5, 6, "15-23"], "layer_names": ["self_attn.q_proj"],
                        "speical_names": ["model.layers.0.mlp.down_proj"]}))
    assert cfg.ignored_layers is not None and cfg.quant is not None
    assert cfg.ignored_layers.blocks() == [4, 5, 6, *range(15, 24)]
    assert cfg.ignored_layers.full_names == ["model.layers.0.mlp.down_proj"]
    assert list(cfg.quant.mix_bits or {}) == ["setting_0", "setting_1"]


@pytest.mark.parametrize("mix, key, words", [
    ({"setting_1": {"layer_name": ["o_proj"], "do_quant": False}}, "quant.mix_bits",
     "setting_0"),
    ({"setting_0": {"layer_name": ["o_proj#1-x"], "do_quant": False}},
     "quant.mix_bits.setting_0.layer_name", "NAME#i-j-k"),
    ({"setting_0": {"layer_name": [], "do_quant": False}},
     "quant.mix_bits.setting_0.layer_name", "empty"),
    ({"setting_0": {"layer_name": ["o_proj"]}}, "quant.mix_bits.setting_0",
     "needs a weight section"),
    ({"setting_0": {"layer_name": ["o_proj"], "do_quant": False, "weight": W8}},
     "quant.mix_bits.setting_0", "remove weight"),
    ({"setting_0": {"layer_name": ["o_proj"], "weight": {**W8, "bitt": 3}}},
     "quant.mix_bits.setting_0.weight.bitt", "did you mean 'bit'"),
    ({"setting_0": {"layer_names": ["o_proj"], "do_quant": False}},
     "quant.mix_bits.setting_0.layer_names", "did you mean 'layer_name'"),
])
def test_mix_bits_mistakes_name_their_key(mix: dict, key: str, words: str) -> None:
    err = error_of(config(quant={"mix_bits": mix}))
    assert key in str(err) and words in str(err), str(err)


@pytest.mark.parametrize("ignored, key, words", [
    ({"block_ids": ["23-15"], "layer_names": ["mlp.down_proj"]}, "ignored_layers.block_ids",
     "start <= end"),
    ({"block_ids": ["4-"], "layer_names": ["mlp.down_proj"]}, "ignored_layers.block_ids",
     "inclusive range"),
    ({"block_ids": [-1], "layer_names": ["mlp.down_proj"]}, "ignored_layers.block_ids", ">= 0"),
    ({"block_ids": [1]}, "ignored_layers", "give layer_names"),
    ({"layer_names": ["mlp.down_proj"]}, "ignored_layers", "give block_ids"),
    ({"block_id": [1], "layer_names": ["x"]}, "ignored_layers.block_id",
     "did you mean 'block_ids'"),
])
def test_ignored_layers_mistakes_name_their_key(ignored: dict, key: str, words: str) -> None:
    err = error_of(config(ignored_layers=ignored))
    assert key in str(err) and words in str(err), str(err)


def test_ignored_layers_needs_a_quant_section(tiny_llama_dir: Path, tmp_path: Path) -> None:
    raw = config(tiny_llama_dir, tmp_path, ignored_layers={"special_names": ["x"]})
    del raw["quant"]
    err = error_of(raw)
    assert str(err).startswith("ignored_layers:") and "no quant section" in str(err)


# ------------------------------------------------------------------ llmc's matching rules

def test_entries_match_text_within_the_block_name_and_listed_blocks() -> None:
    r = rules(config(quant={"mix_bits": {
        "setting_0": {"layer_name": ["down_proj#0-3"], "weight": W8},
        "setting_1": {"layer_name": ["o_proj"], "do_quant": False}}}))
    w8 = WeightQuantSpec(bits=8, symmetric=True, granularity=PerChannel())
    w4 = WeightQuantSpec(bits=4, symmetric=False, granularity=PerGroup(32))
    # '#0-3' lists blocks 0 and 3 (llmc splits on '-'): not a range
    assert [r.spec_for(i, "mlp.down_proj", "").weight for i in range(4)] == [w8, w4, w4, w8]
    assert r.spec_for(2, "self_attn.o_proj", "").keeps_float
    assert r.spec_for(2, "self_attn.o_proj", "").origin == "quant.mix_bits.setting_1"
    assert r.spec_for(2, "self_attn.q_proj", "").weight == w4


def test_first_mentioned_entry_wins_and_a_repeated_one_takes_the_later_setting() -> None:
    """llmc's per-block table: texts ordered by first mention, valued by the last."""
    r = rules(config(quant={"mix_bits": {
        "setting_0": {"layer_name": ["proj", "down_proj"], "weight": W8},
        "setting_1": {"layer_name": ["down_proj"], "do_quant": False},
        "setting_2": {"layer_name": ["proj"], "weight": {**W8, "bit": 6}}}}))
    # 'proj' was mentioned first: every projection takes its last setting (setting_2)
    assert r.spec_for(0, "mlp.down_proj", "").origin == "quant.mix_bits.setting_2"
    r = rules(config(quant={"mix_bits": {
        "setting_0": {"layer_name": ["down_proj"], "weight": W8},
        "setting_1": {"layer_name": ["proj"], "do_quant": False}}}))
    assert r.spec_for(0, "mlp.down_proj", "").origin == "quant.mix_bits.setting_0"
    assert r.spec_for(0, "mlp.up_proj", "").keeps_float


def test_weight_and_act_replace_the_global_ones() -> None:
    act = {"bit": 4, "symmetric": False, "granularity": "per_token"}
    r = rules(config(quant={"method": "rtn", "act": act, "mix_bits": {
        "setting_0": {"layer_name": ["down_proj"], "weight": W8,
                      "act": {"bit": 8, "symmetric": True, "granularity": "per_token"}},
        "setting_1": {"layer_name": ["o_proj"], "weight": {"bit": 6, "symmetric": True}}}}))
    down, o, q = (r.spec_for(0, n, "") for n in ("mlp.down_proj", "self_attn.o_proj",
                                                  "self_attn.q_proj"))
    assert (down.act.bits, down.act.symmetric) == (8, True)  # type: ignore[union-attr]
    # no act in the setting: that linear's input stays float (llmc), not the global A4
    assert o.act is None and o.weight is not None and o.weight.bits == 6
    # not merged: the setting's weight has its own defaults (per_channel), not g32
    assert isinstance(o.weight.granularity, PerChannel)
    assert q.act is not None and q.act.bits == 4


def test_ignored_layers_pair_block_ids_with_exact_names_and_win_over_mix_bits() -> None:
    r = rules(config(quant={"mix_bits": {"setting_0": {"layer_name": ["proj"], "weight": W8}}},
                     ignored_layers={"block_ids": [1, "3-4"], "layer_names": ["mlp.down_proj"],
                                     "special_names": ["model.layers.0.self_attn.q_proj"]}))
    full = "model.layers.{}.{}"
    kept = {(i, n) for i in range(6) for n in LLAMA
            if r.spec_for(i, n, full.format(i, n)).keeps_float}
    assert kept == {(1, "mlp.down_proj"), (3, "mlp.down_proj"), (4, "mlp.down_proj"),
                    (0, "self_attn.q_proj")}
    # exact names: 'down_proj' alone is not 'mlp.down_proj'
    r = rules(config(ignored_layers={"block_ids": [0], "layer_names": ["down_proj"]}))
    assert not r.spec_for(0, "mlp.down_proj", "x").keeps_float


# ------------------------------------------------------------------ names against the model

@pytest.mark.parametrize("extra, key, words", [
    ({"quant": {"mix_bits": {"setting_0": {"layer_name": ["down_prj"], "weight": W8}}}},
     "quant.mix_bits.setting_0.layer_name[0]", "did you mean 'mlp.down_proj'"),
    ({"quant": {"mix_bits": {"setting_0": {"layer_name": ["o_proj", "down_proj#1-2"],
                                           "weight": W8}}}},
     "quant.mix_bits.setting_0.layer_name[1]", "the model has 2 blocks (0-1)"),
    ({"ignored_layers": {"block_ids": ["0-5"], "layer_names": ["mlp.down_proj"]}},
     "ignored_layers.block_ids", "the model has 2 blocks"),
    ({"ignored_layers": {"block_ids": [0], "layer_names": ["down_proj"]}},
     "ignored_layers.layer_names[0]", "did you mean 'mlp.down_proj'"),
    ({"ignored_layers": {"speical_names": ["model.layers.0.mlp.down_prj"]}},
     "ignored_layers.speical_names[0]", "did you mean 'model.layers.0.mlp.down_proj'"),
])
def test_names_that_match_no_linear_fail_before_any_block_runs(
        extra: dict, key: str, words: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    from llmcq.pipeline.runner import run

    class Spy:
        calls = 0

        @llmcq.hookimpl
        def llmcq_calibrate(self) -> None:
            Spy.calls += 1

    raw = config(tiny_llama_dir, tmp_path / "out", **extra)
    resolved = resolve_config(raw)  # names are matched once the model is loaded
    with pytest.raises(ConfigError) as err:
        run(resolved, progress=False, extra_plugins=[Spy()])
    msg = str(err.value)
    assert key in msg and words in msg, msg
    assert Spy.calls == 0
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ each setting's grids

def test_each_settings_grid_goes_through_the_algorithms_checks(tiny_llama_dir: Path,
                                                               tmp_path: Path) -> None:
    hqq = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32,
           "round_zp": False}
    raw = config(tiny_llama_dir, tmp_path, quant={"method": "hqq", "weight": hqq, "mix_bits": {
        "setting_0": {"layer_name": ["o_proj"], "weight": {**hqq, "bit": 8}},
        "setting_1": {"layer_name": ["down_proj"], "weight": W8}}})
    err = error_of(raw)
    assert str(err).startswith("quant.mix_bits.setting_1.weight.symmetric:"), str(err)
    assert "HQQ" in str(err)


def test_each_settings_grid_goes_through_the_backends_checks(tiny_llama_dir: Path,
                                                             tmp_path: Path) -> None:
    raw = config(tiny_llama_dir, tmp_path, quant={"mix_bits": {
        "setting_0": {"layer_name": ["down_proj"], "weight": {**W8, "bit": 3}}}},
        save={"save_vllm": True})
    err = error_of(raw)
    assert str(err).startswith("quant.mix_bits.setting_0.weight.bit:"), str(err)
    assert "vllm" in str(err) and "4, 8" in str(err)


@pytest.mark.parametrize("flag", ["save_autogptq", "save_autoawq", "save_trtllm"])
def test_uniform_grid_backends_refuse_per_linear_settings(flag: str, tiny_llama_dir: Path,
                                                          tmp_path: Path) -> None:
    raw = config(tiny_llama_dir, tmp_path, quant={"weight": {**W4, "bit": 4, "group_size": 64},
                                                  "mix_bits": {"setting_0": {
                                                      "layer_name": ["down_proj"],
                                                      "weight": {**W4, "group_size": 64,
                                                                 "bit": 8}}}},
                 ignored_layers={"block_ids": [0], "layer_names": ["mlp.up_proj"]},
                 save={flag: True})
    err = error_of(raw)
    msg = str(err)
    assert "quant.mix_bits.setting_0: backend" in msg and "different grids" in msg, msg
    assert "ignored_layers: backend" in msg and "kept in float" in msg, msg
    assert "save_fake or save_vllm" in msg


def test_an_algorithm_that_does_not_honour_per_linear_settings_is_refused(
        tiny_llama_dir: Path, tmp_path: Path) -> None:
    registry.register("llmcq.algorithms", AlgorithmSpec(
        name="uniform_only", impl="llmcq_rtn.algorithm:RTN"))
    try:
        raw = config(tiny_llama_dir, tmp_path, quant={"method": "uniform_only"},
                     ignored_layers={"block_ids": [0], "layer_names": ["mlp.up_proj"]})
        err = error_of(raw)
    finally:
        registry.unregister("llmcq.algorithms", "uniform_only")
    assert str(err).startswith("ignored_layers: uniform_only (quant.method) does not honour "
                               "per-linear settings"), str(err)
    assert registry.load_spec("llmcq.algorithms", "rtn", field="quant.method",
                              kind=AlgorithmSpec)[0].per_layer_specs


def test_vllm_refuses_fused_linears_on_different_grids_at_load(tiny_llama_dir: Path,
                                                                tmp_path: Path) -> None:
    from llmcq.pipeline.runner import run

    raw = config(tiny_llama_dir, tmp_path / "out", quant={"mix_bits": {
        "setting_0": {"layer_name": ["q_proj#1"], "weight": W8}}}, save={"save_vllm": True})
    with pytest.raises(ConfigError) as err:
        run(resolve_config(raw), progress=False)
    msg = str(err.value)
    assert msg.startswith("quant.mix_bits.setting_0: vllm (save.save_vllm): vLLM runs "
                          "model.layers.1.self_attn.q_proj, model.layers.1.self_attn.k_proj, "
                          "model.layers.1.self_attn.v_proj as one fused layer"), msg
    assert not (tmp_path / "out").exists()


def test_validate_lists_each_setting(llmcq_cli: Any, tiny_llama_dir: Path, tmp_path: Path) -> None:
    import yaml

    raw = config(tiny_llama_dir, tmp_path / "out", quant={"mix_bits": {
        "setting_0": {"layer_name": ["down_proj#0-1"], "weight": W8},
        "setting_1": {"layer_name": ["o_proj"], "do_quant": False}}},
        ignored_layers={"block_ids": ["0-1"], "layer_names": ["mlp.up_proj", "mlp.gate_proj"]})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = llmcq_cli("validate", str(path))
    assert res.returncode == 0, res
    assert "  quant.mix_bits.setting_0: w8 per_channel sym (down_proj#0-1)" in res.stdout
    assert "  quant.mix_bits.setting_1: float (o_proj)" in res.stdout
    assert "  ignored_layers: float (2 name(s) in 2 block(s), 0 full name(s))" in res.stdout
    assert "records: float_linears, layer_grids" in res.stdout


def test_a_plan_set_by_a_program_decides_each_linear() -> None:
    """What a bit-budget search builds on: a LayerPlan given to the specs directly."""
    from dataclasses import replace

    from llmcq.errors import LlmcqError
    from llmcq.layers import LayerPlan, LayerSpec

    w4, w2 = spec_w(4), spec_w(2)
    specs = RunSpecs(weight=w4)
    assert not specs.per_layer and specs.weight_for("model.layers.0.mlp.up_proj") == w4
    planned = replace(specs, plan=LayerPlan({"model.layers.0.mlp.up_proj":
                                             LayerSpec(w2, None, "budget")}))
    assert planned.per_layer and planned.weight_for("model.layers.0.mlp.up_proj") == w2
    with pytest.raises(KeyError, match="not a quantizable linear"):
        planned.weight_for("lm_head")
    unbound = RunSpecs.from_config(parse_run_config(config(
        ignored_layers={"block_ids": [0], "layer_names": ["mlp.up_proj"]})))
    with pytest.raises(LlmcqError, match="once the model is loaded"):
        unbound.weight_for("model.layers.0.mlp.up_proj")


def spec_w(bits: int) -> WeightQuantSpec:
    return WeightQuantSpec(bits=bits, symmetric=False, granularity=PerGroup(32))
