"""HQQ through the pipeline on the tiny Llama, and its config checks."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import llmcq
from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.runner import run
from llmcq.quant.qparams import fake_quantize_weight
from llmcq.quant.record import QuantizedLinear
from llmcq.quant.spec import WeightQuantSpec
from llmcq.testing.paths import shipped_config

REPO = Path(__file__).resolve().parents[4]
W3G24 = {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 24,
         "round_zp": False}


def config(model: Path, data: Path, save: Path, weight: dict[str, Any] | None = None,
           **quant: Any) -> dict[str, Any]:
    q: dict[str, Any] = {"method": "HQQ", "weight": dict(weight or W3G24)}
    q.update(quant)
    return {
        "base": {"seed": 0, "device": "cpu"},
        "model": {"type": "llama", "path": str(model)},
        "eval": {"eval_pos": ["fake_quant"], "name": "wikitext2",
                 "path": str(data / "wikitext2" / "test.txt"), "seq_len": 64, "num_samples": 4},
        "quant": q,
        "save": {"save_path": str(save)},
    }


class Records:
    """Keeps the run's records (read at evaluation time)."""

    def __init__(self) -> None:
        self.records: dict[str, QuantizedLinear] = {}

    @llmcq.hookimpl
    def llmcq_evaluate(self, run: Any) -> list:
        self.records = dict(run.records)
        return []


def test_run_records_export_and_error_below_rtn(tmp_path: Path, tiny_llama_dir: Path,
                                                shared_data: Path) -> None:
    from transformers import AutoModelForCausalLM

    model, tok = load_pretrained(ModelSource(tiny_llama_dir))
    float_model = copy.deepcopy(model)
    cfg = config(tiny_llama_dir, shared_data, tmp_path / "out")
    cfg["save"]["save_fake"] = True
    spy = Records()
    res = run(resolve_config(cfg), progress=False, model=model, tokenizer=tok,
              extra_plugins=[spy])

    assert len(spy.records) == 2 * 7
    rtn = WeightQuantSpec(bits=3, symmetric=False,
                          granularity=next(iter(spy.records.values())).weight.granularity)
    for name, rec in spy.records.items():
        w = float_model.get_submodule(name).weight.detach().float()
        groups = -(-w.shape[1] // 24)  # 64 and 160 columns: a partial last group each
        assert rec.qweight.dtype == torch.uint8 and int(rec.qweight.max()) <= 7
        assert rec.scale.shape == rec.zero.shape == (w.shape[0], groups)
        assert not rec.zero_is_integral  # HQQ's fractional zero points
        hqq_err = (rec.dequantize() - w).abs().mean()
        rtn_err = (fake_quantize_weight(w, rtn) - w).abs().mean()
        assert hqq_err < 0.98 * rtn_err, (name, float(hqq_err), float(rtn_err))
        # the model computes with exactly the record's weight
        assert torch.equal(model.get_submodule(name).weight, rec.dequantize())

    (step,) = res["recipe"]
    assert step["method"] == "hqq" and step["quantizes"]
    assert step["hqq"]["layers"] == 14
    assert step["hqq"]["mean_abs_error"] < step["hqq"]["mean_abs_error_minmax"]
    assert res["eval"]["fake_quant"]["wikitext2"]["ppl"] > 1

    x = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "fake_quant_model"))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=x).logits, model(input_ids=x).logits)


def test_weight_activation_run(tmp_path: Path, tiny_llama_dir: Path, shared_data: Path) -> None:
    model, tok = load_pretrained(ModelSource(tiny_llama_dir))
    cfg = config(tiny_llama_dir, shared_data, tmp_path / "out",
                 weight={"bit": 4, "symmetric": False, "granularity": "per_channel",
                         "round_zp": False},
                 act={"bit": 8, "symmetric": True, "granularity": "per_token"})
    spy = Records()
    run(resolve_config(cfg), progress=False, model=model, tokenizer=tok, extra_plugins=[spy])
    rec = spy.records["model.layers.1.mlp.down_proj"]
    assert rec.act is not None and rec.act.bits == 8 and rec.scale.shape == (64, 1)


def test_data_free(tmp_path: Path, tiny_llama_dir: Path, shared_data: Path) -> None:
    resolved = resolve_config(config(tiny_llama_dir, shared_data, tmp_path))
    assert not resolved.needs_calibration
    assert resolved.steps[0].special.model_dump() == {
        "axis": 1, "lp_norm": 0.7, "beta": 10.0, "kappa": 1.01, "iters": 20,
        "early_stop": False}


@pytest.mark.parametrize(("change", "path", "text"), [
    ({"weight": {**W3G24, "symmetric": True}}, "quant.weight.symmetric", "asymmetric"),
    ({"weight": {k: v for k, v in W3G24.items() if k != "round_zp"}}, "quant.weight.round_zp",
     "fractional zero points"),
    ({"weight": {**W3G24, "calib_algo": "mse"}}, "quant.weight.calib_algo", "minmax"),
    ({"special": {"axis": 0}}, "quant.special.axis", "output channels"),
    ({"special": {"lp_norm": 1.5}}, "quant.special.lp_norm", "1"),
    ({"special": {"lp_norm": 0}}, "quant.special.lp_norm", "0"),
    ({"special": {"kappa": 0.9}}, "quant.special.kappa", "1"),
    ({"special": {"iters": 0}}, "quant.special.iters", "1"),
    ({"special": {"lpnorm": 0.7}}, "quant.special.lpnorm", "lp_norm"),
])
def test_unsupported_settings_fail_at_config_time(tmp_path: Path, tiny_llama_dir: Path,
                                                  shared_data: Path, change: dict[str, Any],
                                                  path: str, text: str) -> None:
    cfg = config(tiny_llama_dir, shared_data, tmp_path)
    cfg["quant"].update(change)
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg)
    assert err.value.path == path and text in str(err.value), str(err.value)


@pytest.mark.parametrize("name", ["hqq_w3g64.yaml", "hqq_w4g64.yaml"])
def test_shipped_configs_validate(name: str, monkeypatch: pytest.MonkeyPatch,
                                  shared_data: Path) -> None:
    monkeypatch.chdir(REPO)  # the configs' paths are relative to the repository root
    raw = shipped_config(REPO / "configs" / "hqq" / name, shared_data)
    resolved = resolve_config(raw)
    assert resolved.steps[0].spec.name == "hqq" and not resolved.needs_calibration
    assert resolved.config.quant is not None and resolved.config.quant.weight is not None
    assert resolved.config.quant.weight.round_zp is False


def llmc_hqq_w_only(model: Path, data: Path, save: Path) -> dict[str, Any]:
    """llmc's own ``configs/quantization/methods/HQQ/hqq_w_only.yml``, only its paths changed."""
    return {
        "base": {"seed": 42},
        "model": {"type": "Llama", "path": str(model), "torch_dtype": "auto"},
        "eval": {"eval_pos": ["pretrain", "fake_quant"], "name": "wikitext2", "download": False,
                 "path": str(data / "wikitext2" / "test.txt"), "seq_len": 2048, "bs": 1,
                 "inference_per_block": False},
        "quant": {"method": "HQQ",
                  "weight": {"bit": 4, "symmetric": False, "granularity": "per_group",
                             "group_size": 128, "round_zp": False},
                  "special": {"axis": 0, "lp_norm": 0.7, "beta": 10, "kappa": 1.01,
                              "iters": 20}},
        "save": {"save_fake": False, "save_path": str(save)},
    }


def test_llmcs_own_config_is_refused_at_config_time_with_the_measured_reason(
        tmp_path: Path, tiny_llama_dir: Path, shared_data: Path) -> None:
    from llmcq_hqq import AXIS0_MEASURED

    raw = llmc_hqq_w_only(tiny_llama_dir, shared_data, tmp_path / "out")
    with pytest.raises(ConfigError) as err:
        resolve_config(raw)
    e = err.value
    assert (e.path, e.value, e.allowed) == ("quant.special.axis", 0, "1"), str(e)
    text = str(e)
    assert "got 0" in text and "allowed: 1" in text and "bench/results/hqq_axis0.json" in text
    for _, axis0, axis1, rtn in AXIS0_MEASURED:
        assert all(f"{v:.2f}" in text for v in (axis0, axis1, rtn)), text
    assert not (tmp_path / "out").exists()  # nothing computed, nothing written
    raw["quant"]["special"]["axis"] = 1  # the one change that makes llmc's config run
    resolved = resolve_config(raw)
    assert resolved.steps[0].spec.name == "hqq" and resolved.steps[0].special.axis == 1


def test_the_refusal_quotes_the_committed_measurement() -> None:
    """The numbers in the refusal are bench/results/hqq_axis0.json's (scripts/axis0.py)."""
    from llmcq_hqq import AXIS0_MEASURED

    rows = json.loads((REPO / "bench" / "results" / "hqq_axis0.json").read_text())["rows"]
    ppl = {(r["setting"], r["variant"]): r["ppl"] for r in rows}
    for (label, axis0, axis1, rtn), setting in zip(AXIS0_MEASURED, ("w4g128", "w3g64"),
                                                    strict=True):
        assert label.startswith(f"W{setting[1]} g{setting[3:]}"), label
        assert round(ppl[setting, "ours_axis0"], 2) == axis0
        assert round(ppl[setting, "ours_axis1"], 2) == axis1
        assert round(ppl[setting, "rtn_axis1"], 2) == rtn
