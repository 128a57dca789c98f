"""Every quantizing algorithm honours per-linear settings on the tiny Llama: the linears a
``quant.mix_bits`` setting names are quantized on that setting's grids (codes, record spec,
activation settings, a weight error of that width), the others on the global ones; the
linears kept in float (``ignored_layers``, ``do_quant: False``) get no record and end the run
bit-identical to the checkpoint; results.json's mean bits is the exact weighted mean."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

import llmcq
from llmcq.config.loader import resolve_config
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.runner import run
from llmcq.quant.fake import FakeQuantLinear
from llmcq.quant.spec import ActQuantSpec, WeightQuantSpec

W4 = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32}
W8 = {"bit": 8, "symmetric": True, "granularity": "per_channel"}
A8 = {"bit": 8, "symmetric": True, "granularity": "per_token"}
A6 = {"bit": 6, "symmetric": True, "granularity": "per_token"}

#: kept in float: every o_proj (do_quant: False) and block 0's down_proj (ignored_layers)
FLOAT = {"model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj",
         "model.layers.0.mlp.down_proj"}
#: on setting_0's grids
WIDE = {"model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"}
#: on setting_2's grids (W-A methods only: no act in the setting, so their inputs stay float)
NO_ACT = {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
          "model.layers.0.self_attn.v_proj"}

#: method -> (special, global weight, setting_0's weight, global act, setting_0's act)
CASES: dict[str, tuple[Any, dict, dict, dict | None, dict | None]] = {
    "rtn": ({}, W4, W8, None, None),
    "gptq": ({"true_sequential": True}, W4, W8, None, None),
    "awq": ({"trans_version": "v2", "weight_clip": True, "n_grid": 4}, W4, W8, None, None),
    "awq_v1": ({"trans_version": "v1", "weight_clip": False, "n_grid": 4}, W4,
               {**W4, "bit": 8, "group_size": 64}, None, None),
    "hqq": ({"iters": 4}, {**W4, "round_zp": False},
            {**W4, "bit": 8, "round_zp": False}, None, None),
    "omniquant": ({"epochs": 1, "lwc": True, "let": True}, {**W4, "calib_algo": "learnable"},
                  {**W8, "calib_algo": "learnable"}, None, None),
    "tesseraq": ({"iterations": 2, "batch_size": 2, "thresholds": [0.5], "weight_clip": True},
                 W4, W8, None, None),
    "autoround": ({"iters": 4, "batch_size": 2, "enable_quanted_input": False}, W4, W8,
                  None, None),
    "smoothquant": ({"alpha": 0.5, "true_sequential": True}, W8,
                    {**W8, "bit": 4}, A8, A6),
    "osplus": ({"search_steps": 4, "true_sequential": True}, W8, {**W8, "bit": 4}, A8, A6),
    "omniquant_wa": ({"epochs": 1, "lwc": True, "let": True}, {**W8, "calib_algo": "learnable"},
                     {**W8, "bit": 4, "calib_algo": "learnable"}, A8, A6),
    "abq_wa": ({"epochs": 1}, {**W8, "calib_algo": "learnable"},
               {**W8, "bit": 4, "calib_algo": "learnable"}, A8, A6),
    "awq+gptq": ({"awq": {"trans_version": "v2", "weight_clip": True, "n_grid": 4},
                  "gptq": {}}, W4, W8, None, None),
}


def method_of(case: str) -> str | list[str]:
    if case == "awq+gptq":
        return ["awq", "gptq"]
    return case.removesuffix("_v1").removesuffix("_wa")


class Snapshot:
    """The float weights each block's quantizer saw (after every transform)."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}

    @llmcq.hookimpl(wrapper=True)
    def llmcq_quantize(self, block: Any) -> Any:
        for n, lin in block.linears().items():
            self.weights[block.full_name(n)] = lin.weight.detach().float().clone()
        return (yield)


class Records:
    @llmcq.hookimpl
    def llmcq_evaluate(self, run: Any) -> list:
        self.records = dict(run.records)
        return []


def run_case(case: str, model_dir: Path, data: Path, out: Path) -> tuple[Any, Any, Any, Any]:
    special, w, w_set, a, a_set = CASES[case]
    setting0: dict[str, Any] = {"layer_name": ["gate_proj#1", "up_proj#1"], "weight": w_set}
    if a_set is not None:
        setting0["act"] = a_set
    mix = {"setting_0": setting0, "setting_1": {"layer_name": ["o_proj"], "do_quant": False}}
    if a is not None:  # W-A methods: a setting without act leaves its inputs in float
        mix["setting_2"] = {"layer_name": ["q_proj#0", "k_proj#0", "v_proj#0"],
                            "weight": {**w, "bit": 6}}
    quant = {"method": method_of(case), "weight": w, "special": special, "mix_bits": mix}
    if a is not None:
        quant["act"] = a
    cfg = {"base": {"seed": 0, "device": "cpu"},
           "model": {"type": "llama", "path": str(model_dir)},
           "calib": {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                     "n_samples": 4, "seq_len": 32, "preproc": "wikitext2_gptq", "bs": 2,
                     "seed": 1},
           "eval": {"eval_pos": ["fake_quant"], "name": "wikitext2",
                    "path": str(data / "wikitext2" / "test.txt"), "seq_len": 32,
                    "num_samples": 1},
           "quant": quant,
           "ignored_layers": {"block_ids": [0], "layer_names": ["mlp.down_proj"]},
           "save": {"save_path": str(out)}}
    model, tok = load_pretrained(ModelSource(model_dir))
    original = copy.deepcopy(model.state_dict())
    snap, recs = Snapshot(), Records()
    results = run(resolve_config(cfg), progress=False, model=model, tokenizer=tok,
                  extra_plugins=[snap, recs])
    return results, recs.records, snap.weights, (model, original)


def spec_of(section: dict) -> WeightQuantSpec:
    from llmcq.config.schema import WeightQuantSection

    return WeightQuantSpec.from_section(WeightQuantSection.model_validate(section))


def act_of(section: dict | None) -> ActQuantSpec | None:
    from llmcq.config.schema import ActQuantSection

    return None if section is None else \
        ActQuantSpec.from_section(ActQuantSection.model_validate(section))


def rel_error(rec: Any, w: torch.Tensor) -> float:
    return float((rec.dequantize().float() - w).norm() / w.norm())


@pytest.mark.parametrize("case", list(CASES))
def test_each_linear_is_quantized_on_its_own_grid(case: str, tiny_llama_dir: Path,
                                                  shared_data: Path, tmp_path: Path) -> None:
    special, w, w_set, a, a_set = CASES[case]
    results, records, seen, (model, original) = run_case(case, tiny_llama_dir, shared_data,
                                                         tmp_path / "out")
    everything = set(seen)
    assert len(everything) == 14
    assert set(records) == everything - FLOAT

    g, s = spec_of(w), spec_of(w_set)
    s6 = spec_of({**w, "bit": 6})
    for name, rec in records.items():
        want = s if name in WIDE else s6 if (a is not None and name in NO_ACT) else g
        assert rec.weight == want, name
        want_act = act_of(a_set) if name in WIDE else None if name in NO_ACT else act_of(a)
        assert rec.act == want_act, name
        q = rec.qweight.to(torch.int64)
        assert int(q.min()) >= want.qmin and int(q.max()) <= want.qmax, name
        if want.bits == 8:  # the codes use the width: a 4-bit grid cannot hold them
            assert int(q.max() - q.min()) > 15, name

    # the widths show in the error against the weights each quantizer saw
    err = {n: rel_error(r, seen[n]) for n, r in records.items()}
    narrow = [err[n] for n in records if records[n].weight.bits == min(g.bits, s.bits)]
    wide = [err[n] for n in records if records[n].weight.bits == max(g.bits, s.bits)]
    assert max(wide) * 4 < min(narrow), (case, err)

    # linears kept in float: no record, a plain linear in the fake-quant model, the
    # checkpoint's weights bit for bit
    for name in FLOAT:
        module = model.get_submodule(name)
        assert not isinstance(module, FakeQuantLinear), name
        assert torch.equal(module.weight, original[f"{name}.weight"]), name
    assert any(isinstance(model.get_submodule(n), FakeQuantLinear) for n in records)

    # mean bits: every recorded linear at its own width, float linears not counted
    bits = sum(r.weight.bits * r.qweight.numel() for r in records.values())
    weights = sum(r.qweight.numel() for r in records.values())
    comp = results["compression"]
    assert comp["weight_bits_mean"] == round(bits / weights, 6)
    assert comp["params_quantized"] == weights and comp["linears_quantized"] == 11
    assert results["layers"]["ignored_layers"]["linears"] == 1
    assert results["layers"]["quant.mix_bits.setting_1"] == {"linears": 2, "grid": "float"}
    assert results["layers"]["quant.mix_bits.setting_0"]["linears"] == 2


def test_mean_bits_of_a_known_mix_is_exact(tiny_llama_dir: Path, shared_data: Path,
                                           tmp_path: Path) -> None:
    """Hand-computed: down_proj (64 x 160) of both blocks at 8 bits, every o_proj (64 x 64)
    float, the other 10 linears at 3 bits."""
    cfg = {"base": {"device": "cpu"}, "model": {"type": "llama", "path": str(tiny_llama_dir)},
           "quant": {"method": "rtn", "weight": {**W4, "bit": 3},
                     "mix_bits": {"setting_0": {"layer_name": ["down_proj"], "weight": W8},
                                  "setting_1": {"layer_name": ["o_proj"], "do_quant": False}}},
           "save": {"save_path": str(tmp_path / "out")}}
    res = run(resolve_config(cfg), progress=False)
    per_block_3 = 64 * 64 + 32 * 64 * 2 + 160 * 64 * 2  # q, k, v, gate, up
    per_block_8 = 64 * 160
    expected = (2 * per_block_3 * 3 + 2 * per_block_8 * 8) / (2 * per_block_3 + 2 * per_block_8)
    assert res["compression"]["weight_bits_mean"] == round(expected, 6) == 4.315789
    assert res["compression"]["params_quantized"] == 2 * (per_block_3 + per_block_8)
