"""llmc's MixPrecision and ``mix_bits`` configs (``configs/mix_bits/llmc/``, llmc's files with
only their paths changed) validate with only the model path changed, on tiny models of their
families with as many blocks as the configs name (DeepSeek-V2 for MixPrecision, a 32-block
Llama for ``down_proj#...-31``), and run there; the run uses a small calibration set and one
evaluation window (``--set`` overrides) to stay fast. The two static configs use
``calib_algo: static_hist``, which llmcq does not implement: refused at that key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmcq.config.loader import apply_overrides, parse_overrides, resolve_config
from llmcq.errors import ConfigError
from llmcq.pipeline.runner import run
from llmcq.testing.paths import shipped_config
from llmcq.testing.tiny_models import save_tiny_model, tiny_family_config

REPO = Path(__file__).resolve().parents[1]
LLMC = REPO / "configs" / "mix_bits" / "llmc"
#: config -> (tiny family, blocks): as many blocks as its block indices need
MODELS = {"rtn_w_a.yml": ("deepseek_v2", 24), "awq_w_a.yml": ("deepseek_v2", 24),
          "awq_w_only_mix_bits_1.yml": ("llama", 2), "awq_w_a_mix_bits.yml": ("llama", 2),
          "awq_w_only_mix_bits_2.yml": ("llama", 32)}
STATIC = ["rtn_w_a_static.yml", "awq_w_a_static.yml"]
#: what keeps the runs short on 2 CPU cores (not needed for validation)
QUICK = ["calib.n_samples=4", "calib.seq_len=32", "eval.seq_len=64", "eval.num_samples=1"]


def test_every_llmc_config_is_here() -> None:
    assert sorted(p.name for p in LLMC.glob("*.yml")) == sorted([*MODELS, *STATIC])


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> dict:
    out = {}
    for family, blocks in sorted(set(MODELS.values())):
        config = tiny_family_config(family, len(tiny_tokenizer))
        config.num_hidden_layers = blocks
        folder = tmp_path_factory.mktemp(f"{family}-{blocks}")
        out[(family, blocks)] = save_tiny_model(folder, config, tiny_tokenizer)
    return out


def llmc_config(name: str, model: Path, shared: Path, save: Path, family: str) -> dict:
    """llmc's file with its paths pointed here (and llmc's model.type placeholder named)."""
    raw = shipped_config(LLMC / name, shared)
    raw["model"]["path"] = str(model)
    if raw["model"]["type"] == "model_type":  # llmc's template placeholder
        raw["model"]["type"] = family
    raw["save"]["save_path"] = str(save)
    return raw


@pytest.mark.parametrize("name", list(MODELS))
def test_llmc_config_validates_and_runs(name: str, tiny_models: dict, shared_data: Path,
                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    family, blocks = MODELS[name]
    raw = llmc_config(name, tiny_models[(family, blocks)], shared_data, tmp_path / "out",
                      family)
    resolved = resolve_config(raw)
    assert resolved.specs.layers is not None
    quick = [o for o in QUICK if "calib" in raw or not o.startswith("calib.")]
    quick = resolve_config(apply_overrides(raw, parse_overrides(quick)))
    res = run(quick, progress=False)
    layers = res["layers"]
    assert sum(v["linears"] for v in layers.values()) == res["quantized_linears"] + sum(
        v["linears"] for v in layers.values() if v["grid"] == "float")
    if name in ("rtn_w_a.yml", "awq_w_a.yml"):
        # blocks 4, 5, 6, 15-23: q_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj; and one
        # full name
        assert layers["ignored_layers"]["linears"] == 12 * 4 + 1
    elif name == "awq_w_only_mix_bits_2.yml":
        assert layers["quant.mix_bits.setting_0"]["linears"] == 8  # down_proj#0-1-2-3-28-...
        assert layers["quant.mix_bits.setting_1"] == {"linears": 32, "grid": "float"}
    else:
        assert layers["quant.mix_bits.setting_0"]["linears"] == 2  # every down_proj
    assert res["eval"]["fake_quant"]


@pytest.mark.parametrize("name", STATIC)
def test_llmc_static_hist_configs_are_refused_at_their_key(name: str, tiny_models: dict,
                                                          shared_data: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.chdir(REPO)
    raw = llmc_config(name, tiny_models[("deepseek_v2", 24)], shared_data, tmp_path / "o",
                      "deepseek_v2")
    with pytest.raises(ConfigError) as err:
        resolve_config(raw)
    assert err.value.path == "quant.act.calib_algo" and "minmax" in str(err.value)
