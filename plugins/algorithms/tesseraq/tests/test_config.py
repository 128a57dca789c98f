"""TesseraQ's config: llmc's keys and defaults (llmc's yml and the seed README's config
validate with only their paths changed), and what is refused before any model loads, each
refusal naming its key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError
from llmcq.plugins import registry
from llmcq.testing.paths import shipped_config
from llmcq_tesseraq import SCHEDULES, SPEC, TesseraQSpecial

REPO = Path(__file__).resolve().parents[4]

# the quant section of TesseraQ's README (the project's seed) and the sections around it,
# llmc's spelling and values; {..} are the paths filled in.
SEED_README = """
base:
    seed: &seed 42
model:
    type: Llama
    path: {model}
    torch_dtype: auto
calib:
    name: c4
    download: False
    path: {c4}
    n_samples: 512
    bs: 1
    seq_len: 2048
    preproc: c4_gptq
    seed: *seed
eval:
    eval_pos: [pretrain, transformed, fake_quant]
    name: wikitext2
    download: False
    path: {eval}
    bs: 1
    inference_per_block: False
    seq_len: 2048
save:
    save_fp: False
    save_lightllm: False
    save_fake: False
    save_path: {save}
quant:
    method: TesseraQ
    weight:
        bit: 2
        symmetric: False
        granularity: per_group
        group_size: 128
        calib_algo: minmax
    special:
        lr: 0.001
        iterations: 250
        wd: 0.0
        batch_size: 4
        deactive_amp: False
        aug_loss: False
        optimize_scale: True
        scale_lr: 0.001
        thresholds: [0.8, 0.65, 0.5, 0.43, 0.38, 0.34, 0.3, 0.27, 0.24, 0.21, 0.18, 0.15,
                     0.12, 0.10, 0.08, 0.06, 0.04, 0.02, 0.01, 0.005]
        weight_clip: True
        load_transform: True
        clip_version: v1
        reduce_memory: True
        scale_path: {awq}
        clip_path: {awq}
        online_rotate: False
        fp32_had: False
    quant_out: True
"""

# llmc's configs/quantization/methods/Tesseraq/tesseraq_w_only.yml (its quant section)
LLMC_YML_QUANT = """
method: TesseraQ
weight:
    bit: 4
    symmetric: False
    granularity: per_group
    group_size: 128
    calib_algo: learnable
    ste: True
special:
    lr: 0.0005
    iterations: 250
    wd: 0.0
    batch_size: 2
    deactive_amp: False
    aug_loss: False
    optimize_scale: True
    scale_lr: 0.0005
    thresholds: [0.75, 0.5, 0.375, 0.25, 0.125, 0.09, 0.06, 0.04, 0.02, 0.005]
    weight_clip: True
    load_transform: False
    reduce_memory: True
    clip_version: v1
    scale_path: {awq}
    clip_path: {awq}
quant_out: True
"""


def _cfg(data: Path, special: dict[str, Any] | None = None, *, method: Any = "TesseraQ",
         weight: dict[str, Any] | None = None, act: dict[str, Any] | None = None
         ) -> dict[str, Any]:
    q: dict[str, Any] = {"method": method, "special": special or {},
                         "weight": weight or {"bit": 2, "symmetric": False,
                                              "granularity": "per_group", "group_size": 64}}
    if act is not None:
        q["act"] = act
    return {"model": {"type": "llama"},  # no GGUF peek for the model type
            "calib": {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                      "n_samples": 4, "seq_len": 64, "preproc": "wikitext2_gptq"},
            "quant": q, "save": {"save_path": "/tmp/llmcq-tesseraq-never-written"}}


def _awq_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "awq"
    folder.mkdir()
    for name in ("scales.pth", "clips.pth"):
        (folder / name).write_bytes(b"")
    return folder


def test_llmc_defaults_and_spelling(shared_data: Path) -> None:
    sp = TesseraQSpecial()
    assert (sp.lr, sp.iterations, sp.wd, sp.batch_size, sp.deactive_amp, sp.aug_loss,
            sp.optimize_scale, sp.scale_lr, sp.weight_clip, sp.load_transform,
            sp.reduce_memory, sp.clip_version, sp.online_rotate, sp.fp32_had) == \
        (0.0005, 250, 0.0, 2, False, False, True, 0.0005, True, False, True, "v1", False,
         False)
    assert sp.schedule == SCHEDULES["llmc"] and sp.lr_schedule == "constant"
    assert TesseraQSpecial(thresholds="upstream").schedule == SCHEDULES["upstream"]
    for spelling in ("TesseraQ", "tesseraq", "Tesseraq"):
        spec, _ = registry.load_spec("llmcq.algorithms", spelling, field="quant.method")
        assert spec is SPEC
    resolved = resolve_config(_cfg(shared_data, {"wd": 0, "thresholds": [0.5, 0.1]}))
    assert resolved.steps[0].special.schedule == (0.5, 0.1)
    assert resolved.needs_calibration


def test_seed_readme_config_validates_with_paths_changed(tmp_path: Path, shared_data: Path,
                                                         smollm2_path: Path) -> None:
    text = SEED_README.format(model=smollm2_path, c4=shared_data / "c4",
                              eval=shared_data / "wikitext2" / "test.txt",
                              save=tmp_path / "save", awq=_awq_folder(tmp_path))
    resolved = resolve_config(yaml.safe_load(text))
    sp = resolved.steps[0].special
    assert isinstance(sp, TesseraQSpecial) and sp.schedule == SCHEDULES["upstream"]
    assert sp.load_transform and sp.weight_clip and sp.clip_version == "v1"


def test_llmc_yml_validates_with_paths_changed(tmp_path: Path, shared_data: Path) -> None:
    cfg = _cfg(shared_data)
    cfg["quant"] = yaml.safe_load(LLMC_YML_QUANT.format(awq=tmp_path))
    resolved = resolve_config(cfg)
    assert resolved.steps[0].special.schedule == SCHEDULES["llmc"]


@pytest.mark.parametrize("name", ["tesseraq_w2g64.yaml", "tesseraq_w3g64.yaml",
                                  "tesseraq_w4a4.yaml", "awq_tesseraq_step1_awq.yaml",
                                  "tesseraq_w2g64_load.yaml"])
def test_shipped_configs_validate(name: str, monkeypatch: pytest.MonkeyPatch,
                                  shared_data: Path) -> None:
    raw = shipped_config(REPO / "configs" / "tesseraq" / name, shared_data)
    methods = raw["quant"]["method"]
    installed = [i.name for i in registry.discover("llmcq.algorithms")]
    for m in [methods] if isinstance(methods, str) else methods:
        if m.lower() not in installed:
            pytest.skip(f"{m} plugin not installed")
    raw["save"]["save_path"] = "/tmp/llmcq-tesseraq-never-written"
    monkeypatch.chdir(REPO)  # the configs' paths are relative to the repository root
    resolve_config(raw)


@pytest.mark.parametrize("special,weight,act,key", [
    ({"online_rotate": True}, {}, None, "quant.special.online_rotate"),
    ({"fp32_had": True}, {}, None, "quant.special.fp32_had"),
    ({"thresholds": [0.5, 0.6]}, {}, None, "quant.special.thresholds"),
    ({"thresholds": [1.0, 0.5]}, {}, None, "quant.special.thresholds"),
    ({"thresholds": "paper"}, {}, None, "quant.special.thresholds"),
    ({"clip_version": "v3"}, {}, None, "quant.special.clip_version"),
    ({"clip_version": "v2"}, {}, None, "quant.special.clip_version"),
    ({"load_transform": True}, {}, None, "quant.special.scale_path"),
    ({"lr": 0}, {}, None, "quant.special.lr"),
    ({"batch_size": 0}, {}, None, "quant.special.batch_size"),
    ({"lr_schedule": "step"}, {}, None, "quant.special.lr_schedule"),
    ({"iteration": 3}, {}, None, "quant.special.iteration"),
    ({}, {"calib_algo": "mse"}, None, "quant.weight.calib_algo"),
    ({}, {"round_zp": False}, None, "quant.weight.round_zp"),
    ({}, {"granularity": "per_tensor", "group_size": -1}, None, "quant.special.weight_clip"),
    ({}, {"quant_type": "float-quant", "bit": "e4m3", "granularity": "per_channel",
          "group_size": -1, "symmetric": True}, None, "quant.weight.quant_type"),
    ({}, {}, {"bit": 8, "symmetric": True, "granularity": "per_tensor", "static": True},
     "quant.act.static"),
])
def test_refused_at_config_time(shared_data: Path, special: dict[str, Any],
                                weight: dict[str, Any], act: dict[str, Any] | None,
                                key: str) -> None:
    w = {"bit": 2, "symmetric": False, "granularity": "per_group", "group_size": 64, **weight}
    with pytest.raises(ConfigError) as err:
        resolve_config(_cfg(shared_data, special, weight=w, act=act))
    assert err.value.path.startswith(key), str(err.value)


def test_refusals_say_what_is_allowed(shared_data: Path) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(_cfg(shared_data, {"online_rotate": True}))
    assert "allowed: False" in str(err.value) and "rotations" in str(err.value)
    with pytest.raises(ConfigError) as err:
        resolve_config(_cfg(shared_data, {"clip_version": "v2"}))
    assert "allowed: v1" in str(err.value) and "clip_path" in str(err.value)


def test_recipe_paths_name_the_method(shared_data: Path, tmp_path: Path) -> None:
    if "awq" not in [i.name for i in registry.discover("llmcq.algorithms")]:
        pytest.skip("awq plugin not installed")
    cfg = _cfg(shared_data, method=["Awq", "TesseraQ"])
    cfg["quant"]["special"] = {"Awq": {"trans": True},
                               "TesseraQ": {"load_transform": True,
                                            "scale_path": str(_awq_folder(tmp_path))}}
    with pytest.raises(ConfigError) as err:  # a recipe's scales are folded already
        resolve_config(cfg)
    assert err.value.path == "quant.special.TesseraQ.load_transform"
    cfg["quant"]["method"] = ["TesseraQ", "Awq"]  # TesseraQ's codes are the result
    cfg["quant"]["special"] = {"Awq": {"trans": True}, "TesseraQ": {}}
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg)
    assert err.value.path == "quant.method[0]"
    # AWQ's clips handed to TesseraQ's clip_version v2 in one recipe
    cfg["quant"]["method"] = ["Awq", "TesseraQ"]
    cfg["quant"]["weight"]["calib_algo"] = "learnable"
    cfg["quant"]["special"] = {"Awq": {"trans": True, "weight_clip": True,
                                       "clip_version": "v2"},
                               "TesseraQ": {"clip_version": "v2"}}
    resolve_config(cfg)
