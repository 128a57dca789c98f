"""AWQ's config: llmc's keys and defaults, the shipped configs, and every refusal at config
time (before a model is loaded)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from llmcq.api import AlgorithmSpec
from llmcq.config.loader import load_config, resolve_config
from llmcq.errors import ConfigError
from llmcq.plugins import registry
from llmcq.testing.paths import shipped_config
from llmcq_awq import SPEC, AwqSpecial

REPO = Path(__file__).resolve().parents[4]
CONFIGS = sorted((REPO / "configs" / "awq").glob("*.yaml"))


def base(data: Path, tmp: Path, **special: Any) -> dict[str, Any]:
    return {
        "model": {"type": "llama"},
        "calib": {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                  "n_samples": 4, "seq_len": 64, "preproc": "wikitext2_gptq"},
        "quant": {"method": "Awq",
                  "weight": {"bit": 3, "symmetric": False, "granularity": "per_group",
                             "group_size": 64},
                  "special": special},
        "save": {"save_path": str(tmp / "out")},
    }


def test_defaults_are_llmcs() -> None:
    s = AwqSpecial()
    assert (s.trans, s.trans_version, s.weight_clip, s.clip_version, s.clip_sym) == \
        (True, "v2", False, "v1", None)
    assert (s.save_scale, s.save_clip, s.do_gqa_trans, s.awq_bs, s.n_grid) == \
        (False, False, False, None, 20)
    assert SPEC.needs_calibration and SPEC.supports_act


def test_llmc_spelling_resolves(shared_data: Path, tmp_path: Path) -> None:
    resolved = resolve_config(base(shared_data, tmp_path, trans_version="v1", weight_clip=True,
                                   clip_sym=True))
    step = resolved.steps[0]
    assert step.spec.name == "awq" and step.special.trans_version == "v1"
    assert resolved.needs_calibration


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(config: Path, monkeypatch: pytest.MonkeyPatch,
                                  tmp_path: Path, shared_data: Path) -> None:
    monkeypatch.chdir(REPO)
    text = config.read_text()
    if "gptq" in text.lower() and not any(i.name == "gptq"
                                         for i in registry.discover("llmcq.algorithms")):
        pytest.skip("the gptq plugin is not installed")
    raw = shipped_config(config, shared_data)
    raw["save"]["save_path"] = str(tmp_path / "out")
    resolved = resolve_config(raw)
    names = [s.spec.name for s in resolved.steps]
    assert names[0] == "awq"
    assert resolved.steps[0].special.weight_clip


REFUSED = [
    ({"awq_bs": 4}, "quant.special.awq_bs", "calib.bs"),
    ({"trans_version": "v3"}, "quant.special.trans_version", "v1"),
    ({"n_grid": 0}, "quant.special.n_grid", "greater than or equal"),
    ({"wieght_clip": True}, "quant.special.wieght_clip", "weight_clip"),
    ({"save_scale": True}, "quant.special.scale_path", "folder for scales.pth"),
    ({"save_clip": True}, "quant.special.save_clip", "weight_clip"),
    ({"weight_clip": True, "save_clip": True}, "quant.special.clip_path", "clips.pth"),
    ({"trans": False, "load_scale": True, "scale_path": "."}, "quant.special.load_scale",
     "trans"),
    ({"load_scale": True, "scale_path": "/nonexistent/awq"}, "quant.special.scale_path",
     "no scales.pth"),
    ({"weight_clip": True, "load_clip": True, "clip_path": "/nonexistent/awq"},
     "quant.special.clip_path", "no clips.pth"),
    ({"weight_clip": True, "clip_version": "v2"}, "quant.special.clip_version", "save_clip"),
]


@pytest.mark.parametrize(("special", "path", "words"), REFUSED,
                         ids=[r[1].rsplit(".", 1)[1] + "-" + str(i) for i, r in
                              enumerate(REFUSED)])
def test_refused_at_config_time(shared_data: Path, tmp_path: Path, special: dict[str, Any],
                                path: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(base(shared_data, tmp_path, **special))
    assert err.value.path == path, str(err.value)  # the first problem reported
    assert words in str(err.value)


def test_paths_are_checked(shared_data: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        resolve_config(base(shared_data, tmp_path, save_scale=True, scale_path=str(a_file)))
    (tmp_path / "both").mkdir()
    with pytest.raises(ConfigError, match="written back unchanged"):
        (tmp_path / "both" / "scales.pth").write_bytes(b"")
        resolve_config(base(shared_data, tmp_path, save_scale=True, load_scale=True,
                            scale_path=str(tmp_path / "both")))
    ok = resolve_config(base(shared_data, tmp_path, save_scale=True,
                             scale_path=str(tmp_path / "new" / "scales")))
    assert ok.steps[0].special.save_scale


def test_learnable_and_clip_v2_need_a_following_step(shared_data: Path, tmp_path: Path) -> None:
    cfg = base(shared_data, tmp_path, weight_clip=True, clip_version="v2", save_clip=True,
               clip_path=str(tmp_path / "clips"))
    cfg["quant"]["weight"]["calib_algo"] = "learnable"
    with pytest.raises(ConfigError, match="quant.weight.calib_algo: awq alone"):
        resolve_config(copy.deepcopy(cfg))
    # llmc's two-step flow, step 1: awq alone saves v2 ranges for a later run (minmax here)
    step1 = copy.deepcopy(cfg)
    step1["quant"]["weight"]["calib_algo"] = "minmax"
    assert resolve_config(step1).steps[0].special.clip_version == "v2"
    in_recipe = copy.deepcopy(step1)  # in a recipe v2 hands them to a learnable quantizer
    in_recipe["quant"]["method"] = ["awq", "rtn"]
    in_recipe["quant"]["special"] = {"awq": in_recipe["quant"]["special"]}
    with pytest.raises(ConfigError, match="quant.weight.calib_algo: clip_version v2"):
        resolve_config(in_recipe)
    cfg["quant"]["method"] = ["awq", "rtn"]
    cfg["quant"]["special"] = {"awq": cfg["quant"]["special"]}
    with pytest.raises(ConfigError, match="rtn"):  # rtn itself refuses learnable
        resolve_config(copy.deepcopy(cfg))
    registry.register("llmcq.algorithms", AlgorithmSpec(
        name="learner", impl="x:y", weight_calib_algos=("learnable",)))
    try:
        cfg["quant"]["method"] = ["awq", "learner"]
        cfg["quant"]["special"]["awq"].pop("save_clip")
        resolved = resolve_config(copy.deepcopy(cfg))  # v2 hands its ranges to the learner
        assert resolved.steps[0].special.clip_version == "v2"
    finally:
        registry.unregister("llmcq.algorithms", "learner")


def test_per_method_special_mapping(shared_data: Path, tmp_path: Path) -> None:
    cfg = base(shared_data, tmp_path)
    cfg["quant"]["method"] = ["Awq", "RTN"]
    cfg["quant"]["special"] = {"Awq": {"weight_clip": True, "awq_bs": 2}}
    with pytest.raises(ConfigError, match=r"^quant.special.Awq.awq_bs"):
        resolve_config(copy.deepcopy(cfg))
    cfg["quant"]["special"] = {"Awq": {"weight_clip": True}}
    resolved = resolve_config(cfg)
    assert [s.spec.name for s in resolved.steps] == ["awq", "rtn"]
    assert resolved.steps[0].special.weight_clip


def test_load_only_needs_no_calibration(shared_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "scales.pth").write_bytes(b"")
    (folder / "clips.pth").write_bytes(b"")
    cfg = base(shared_data, tmp_path, load_scale=True, scale_path=str(folder),
               weight_clip=True, load_clip=True, clip_path=str(folder))
    del cfg["calib"]
    assert not resolve_config(cfg).needs_calibration
    cfg["quant"]["special"]["load_clip"] = False
    with pytest.raises(ConfigError, match="^calib: awq needs calibration"):
        resolve_config(cfg)
