"""OmniQuant's config: llmc's keys and defaults, and what is refused before any model loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError
from llmcq.plugins import registry
from llmcq.testing.paths import shipped_config
from llmcq_omniquant import SPEC, OmniQuantSpecial

REPO = Path(__file__).resolve().parents[4]


def _cfg(data: Path, special: dict[str, Any] | None = None, *, method: Any = "OmniQuant",
         weight: dict[str, Any] | None = None, act: dict[str, Any] | None = None
         ) -> dict[str, Any]:
    q: dict[str, Any] = {"method": method, "special": special or {},
                         "weight": weight or {"bit": 3, "symmetric": False,
                                              "granularity": "per_group", "group_size": 64,
                                              "calib_algo": "learnable", "ste": True}}
    if act is not None:
        q["act"] = act
    return {"model": {"type": "llama"},  # no GGUF peek for the model type
            "calib": {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                      "n_samples": 4, "seq_len": 64, "preproc": "wikitext2_gptq"},
            "quant": q, "save": {"save_path": "/tmp/llmcq-omniquant-never-written"}}


def test_llmc_defaults_and_spelling(shared_data: Path) -> None:
    sp = OmniQuantSpecial()
    assert (sp.lwc, sp.let, sp.lwc_lr, sp.let_lr, sp.use_shift, sp.alpha, sp.deactive_amp,
            sp.epochs, sp.wd, sp.aug_loss, sp.search_clip_init) == \
        (True, False, 0.01, 0.005, False, 0.5, True, 20, 0.0, False, False)
    spec, _ = registry.load_spec("llmcq.algorithms", "OmniQuant", field="quant.method")
    assert spec is SPEC
    resolved = resolve_config(_cfg(shared_data, {"wd": 0, "epochs": 2}))  # int for a float
    assert resolved.steps[0].special.wd == 0.0
    assert resolved.needs_calibration


@pytest.mark.parametrize("name", ["omniq_w3g64.yaml", "omniq_w4a4.yaml", "omniq_w6a6.yaml",
                                  "awq_omniq_w3g64.yaml"])
def test_shipped_configs_validate(name: str, monkeypatch: pytest.MonkeyPatch,
                                  shared_data: Path) -> None:
    path = REPO / "configs" / "omniquant" / name
    raw = shipped_config(path, shared_data)
    if isinstance(raw["quant"]["method"], list):
        for m in raw["quant"]["method"]:
            if m.lower() != "omniquant" and m.lower() not in [
                    i.name for i in registry.discover("llmcq.algorithms")]:
                pytest.skip(f"{m} plugin not installed")
    raw["save"]["save_path"] = "/tmp/llmcq-omniquant-never-written"
    monkeypatch.chdir(REPO)  # the configs' paths are relative to the repository root
    resolve_config(raw)


@pytest.mark.parametrize("special,weight,act,key", [
    ({"lwc": True}, {"calib_algo": "minmax"}, None, "quant.weight.calib_algo"),
    ({}, {"calib_algo": "mse"}, None, "quant.weight.calib_algo"),
    ({"lwc": False, "let": False, "epochs": 5}, {}, None, "quant.special.epochs"),
    ({"lwc": False, "let": True, "search_clip_init": True}, {"calib_algo": "minmax"}, None,
     "quant.special.search_clip_init"),
    ({"search_clip_init": True}, {"granularity": "per_tensor", "group_size": -1}, None,
     "quant.special.search_clip_init"),
    ({"smooth_up_down": True}, {}, None, "quant.special.smooth_up_down"),
    ({"use_shift": True}, {}, None, "quant.special.use_shift"),
    ({"let": True, "search_scale_init": True}, {}, None, "quant.special.search_scale_init"),
    ({"search_clip_init": True, "load_clip": True}, {}, None, "quant.special.load_clip"),
    ({"clip_path": "/tmp/clips"}, {}, None, "quant.special.clip_path"),
    ({"let": True, "scale_path": "/tmp/scales"}, {}, None, "quant.special.scale_path"),
    ({"alpha": 1.5}, {}, None, "quant.special.alpha"),
    ({"lwc_lr": 0}, {}, None, "quant.special.lwc_lr"),
    ({"epoch": 3}, {}, None, "quant.special.epoch"),
    ({}, {}, {"bit": 8, "symmetric": True, "granularity": "per_tensor", "static": True},
     "quant.act.static"),
])
def test_refused_at_config_time(shared_data: Path, special: dict[str, Any],
                                weight: dict[str, Any], act: dict[str, Any] | None,
                                key: str) -> None:
    w = {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 64,
         "calib_algo": "learnable", "ste": True, **weight}
    with pytest.raises(ConfigError) as err:
        resolve_config(_cfg(shared_data, special, weight=w, act=act))
    assert err.value.path.startswith(key), str(err.value)


def test_recipe_paths_name_the_method(shared_data: Path) -> None:
    if "awq" not in [i.name for i in registry.discover("llmcq.algorithms")]:
        pytest.skip("awq plugin not installed")
    cfg = _cfg(shared_data, method=["awq", "omniquant"])
    cfg["quant"]["special"] = {"omniquant": {"search_scale_init": True}}
    with pytest.raises(ConfigError) as err:  # search_scale_init needs let
        resolve_config(cfg)
    assert err.value.path == "quant.special.omniquant.search_scale_init"
    cfg["quant"]["special"] = {"awq": {"trans": True},
                               "omniquant": {"let": True, "search_scale_init": True,
                                             "search_clip_init": True}}
    resolve_config(cfg)
