"""Config validation: llmc configs run with only paths changed; every mistake is caught before
a model loads, with the key path, the value, what is allowed and the closest key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmcq.config.loader import apply_overrides, load_config, parse_overrides, resolve_config
from llmcq.errors import ConfigError, OutputExistsError, PluginLoadError

# llmc's configs/quantization/methods/RTN/rtn_w_only.yml and rtn_w_a.yml with the paths
# filled in (their comments dropped); the keys are llmc's, spelled as llmc spells them.
LLMC_RTN_W_ONLY = """
base:
    seed: &seed 42
model:
    type: Llama
    path: {model}
    torch_dtype: auto
eval:
    eval_pos: [pretrain, fake_quant]
    name: wikitext2
    download: False
    path: {eval}
    seq_len: 2048
    bs: 1
    inference_per_block: False
quant:
    method: RTN
    weight:
        bit: 4
        symmetric: False
        granularity: per_group
        group_size: 128
save:
    save_fake: False
    save_path: {save}
"""

LLMC_GPTQ_STYLE_CALIB = """
base:
    seed: &seed 0
model:
    type: Llama
    path: {model}
    torch_dtype: auto
calib:
    name: wikitext2
    download: False
    n_samples: 128
    path: {calib}
    bs: 1
    seq_len: 2048
    preproc: wikitext2_gptq
    seed: *seed
eval:
    eval_pos: [fake_quant]
    name: wikitext2
    download: False
    path: {eval}
    bs: 1
    seq_len: 2048
    inference_per_block: False
quant:
    method: Naive
    weight:
        bit: 8
        symmetric: True
        granularity: per_channel
        group_size: -1
    act:
        bit: 8
        symmetric: True
        granularity: per_tensor
        static: True
    quant_out: True
save:
    save_trans: False
    save_fake: True
    save_path: {save}
"""


@pytest.fixture
def paths(tmp_path: Path, shared_data: Path, smollm2_path: Path) -> dict[str, str]:
    return {"model": str(smollm2_path), "eval": str(shared_data / "wikitext2" / "test.txt"),
            "calib": str(shared_data / "wikitext2" / "valid.txt"),
            "save": str(tmp_path / "save")}


def _raw(template: str, paths: dict[str, str]) -> dict[str, Any]:
    return yaml.safe_load(template.format(**paths))


def _error(raw: dict[str, Any], **kw: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        resolve_config(raw, **kw)
    return info.value


def test_llmc_configs_validate_with_paths_changed(paths: dict[str, str]) -> None:
    r = resolve_config(_raw(LLMC_RTN_W_ONLY, paths))
    assert r.model[0].name == "llama" and [s.spec.name for s in r.steps] == ["rtn"]
    assert not r.needs_calibration and r.backends == []
    r = resolve_config(_raw(LLMC_GPTQ_STYLE_CALIB, paths))
    assert r.needs_calibration  # static activations need calibration data
    assert r.calib is not None and r.calib[0].name == "wikitext2"
    assert [b.name for b in r.backends] == ["fake"]


def test_model_type_may_be_omitted_for_the_bundled_model(paths: dict[str, str]) -> None:
    raw = _raw(LLMC_RTN_W_ONLY, paths)
    del raw["model"]["type"], raw["model"]["path"]
    r = resolve_config(raw)
    assert r.model[0].name == "llama" and r.source.gguf_file.endswith(".gguf")


@pytest.mark.parametrize("path, bad, suggestion", [
    (("quant", "wieght"), "wieght", "weight"),
    (("quant", "weight", "bits"), "bits", "bit"),
    (("eval", "seqlen"), "seqlen", "seq_len"),
    (("base", "sed"), "sed", "seed"),
])
def test_unknown_key_names_path_and_suggests(paths: dict[str, str], path: tuple[str, ...],
                                             bad: str, suggestion: str) -> None:
    raw = _raw(LLMC_RTN_W_ONLY, paths)
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = 1
    err = _error(raw)
    assert err.path == ".".join(path)
    assert f"did you mean {suggestion!r}" in str(err)
    assert "unknown key" in str(err)


def test_unknown_top_level_section(paths: dict[str, str]) -> None:
    raw = _raw(LLMC_RTN_W_ONLY, paths)
    raw["qaunt"] = raw.pop("quant")
    err = _error(raw)
    assert err.path == "qaunt" and "'quant'" in str(err)


@pytest.mark.parametrize("key, value, expect", [
    ("bit", "four", "valid integer"),
    ("bit", 9, "less than or equal to 8"),
    ("bit", 1, "greater than or equal to 2"),
    ("symmetric", "yes", "valid boolean"),
    ("granularity", "per_chanel", "per_channel"),
    ("sym_range", "wide", "'restricted' or 'full'"),
])
def test_bad_weight_values(paths: dict[str, str], key: str, value: Any, expect: str) -> None:
    raw = _raw(LLMC_RTN_W_ONLY, paths)
    raw["quant"]["weight"][key] = value
    err = _error(raw)
    assert err.path == f"quant.weight.{key}"
    assert repr(value) in str(err) and expect in str(err)


def test_full_sym_range_needs_a_symmetric_grid(paths: dict[str, str]) -> None:
    raw = _raw(LLMC_RTN_W_ONLY, paths)
    raw["quant"]["weight"].update(symmetric=False, sym_range="full")
    err = _error(raw)
    assert err.path == "quant.weight" and "sym_range" in str(err) and "symmetric" in str(err)


def test_per_group_needs_group_size(paths: dict[str, str]) -> None:
    raw = _raw(LLMC_RTN_W_ONLY, paths)
    raw["quant"]["weight"]["group_size"] = -1
    err = _error(raw)
    assert err.path == "quant.weight" and "group_size" in str(err)


def test_static_act_must_be_per_tensor(paths: dict[str, str]) -> None:
    raw = _raw(LLMC_GPTQ_STYLE_CALIB, paths)
    raw["quant"]["act"]["granularity"] = "per_token"
    err = _error(raw)
    assert err.path == "quant.act" and "per_tensor" in str(err)


def test_unknown_method_lists_installed_and_suggests(paths: dict[str, str]) -> None:
    raw = _raw(LLMC_RTN_W_ONLY, paths)
    raw["quant"]["method"] = "RTM"
    err = _error(raw)
    assert err.path == "quant.method" and "rtn" in str(err.allowed)
    assert "did you mean 'rtn'" in str(err)


@pytest.mark.parametrize("spelling", ["RTN", "rtn", "Naive", "NAIVE"])
def test_llmc_method_spellings(paths: dict[str, str], spelling: str) -> None:
    raw = _raw(LLMC_RTN_W_ONLY, paths)
    raw["quant"]["method"] = spelling
    assert resolve_config(raw).steps[0].spec.name == "rtn"


def test_unknown_special_key(paths: dict[str, str]) -> None:
    raw = _raw(LLMC_RTN_W_ONLY, paths)
    raw["quant"]["special"] = {"actorder": True}
    err = _error(raw)
    assert err.path == "quant.special.actorder" and "unknown key" in str(err)


@pytest.mark.parametrize("section, key", [("eval", "path"), ("model", "path")])
def test_missing_file(paths: dict[str, str], tmp_path: Path, section: str, key: str) -> None:
    raw = _raw(LLMC_RTN_W_ONLY, paths)
    raw[section][key] = str(tmp_path / "nope" / "missing.txt")
    err = _error(raw)
    assert err.path == f"{section}.{key}" and "no such file" in str(err)


def test_missing_calib_file(paths: dict[str, str], tmp_path: Path) -> None:
    raw = _raw(LLMC_GPTQ_STYLE_CALIB, paths)
    raw["calib"]["path"] = str(tmp_path / "missing.txt")
    assert _error(raw).path == "calib.path"


def test_static_act_without_calib(paths: dict[str, str]) -> None:
    raw = _raw(LLMC_GPTQ_STYLE_CALIB, paths)
    del raw["calib"]
    err = _error(raw)
    assert err.path == "calib" and "calibration" in str(err)


def test_downloads_refused(paths: dict[str, str]) -> None:
    raw = _raw(LLMC_GPTQ_STYLE_CALIB, paths)
    raw["calib"]["download"] = True
    assert _error(raw).path == "calib.download"


def test_unknown_preproc(paths: dict[str, str]) -> None:
    raw = _raw(LLMC_GPTQ_STYLE_CALIB, paths)
    raw["calib"]["preproc"] = "wikitext_gptq"
    err = _error(raw)
    assert err.path == "calib.preproc" and "wikitext2_gptq" in str(err)


def test_llmc_feature_not_supported_yet(paths: dict[str, str]) -> None:
    raw = _raw(LLMC_RTN_W_ONLY, paths)
    raw["quant"]["quant_objects"] = ["language"]
    err = _error(raw)
    assert err.path == "quant.quant_objects" and "not supported" in str(err)


def test_fake_quant_position_needs_quant(paths: dict[str, str]) -> None:
    raw = _raw(LLMC_RTN_W_ONLY, paths)
    del raw["quant"]
    assert _error(raw).path == "eval.eval_pos"


def test_backend_not_installed(paths: dict[str, str]) -> None:
    raw = _raw(LLMC_RTN_W_ONLY, paths)
    raw["save"]["backends"] = ["no-such-engine"]
    err = _error(raw)
    assert err.path == "save.backends" and "fake" in str(err.allowed)


def test_outputs_in_the_way_are_refused_before_loading(paths: dict[str, str]) -> None:
    raw = _raw(LLMC_RTN_W_ONLY, paths)
    raw["save"]["save_fake"] = True
    existing = Path(paths["save"]) / "fake_quant_model"
    existing.mkdir(parents=True)
    (existing / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError):
        resolve_config(copy.deepcopy(raw))
    resolve_config(copy.deepcopy(raw), overwrite=True)  # told to: fine
    assert (existing / "keep.txt").read_text() == "precious"  # validation touches nothing


def test_overrides_parse_as_yaml_and_apply(paths: dict[str, str]) -> None:
    raw = _raw(LLMC_RTN_W_ONLY, paths)
    ov = parse_overrides(["quant.weight.bit=3", "quant.weight.symmetric=true",
                          "eval.eval_pos=[fake_quant]", "base.device=cpu"])
    cfg = resolve_config(apply_overrides(raw, ov)).config
    assert cfg.quant.weight.bit == 3 and cfg.quant.weight.symmetric is True
    assert cfg.eval[0].eval_pos == ["fake_quant"]
    with pytest.raises(ConfigError):
        parse_overrides(["quant.weight.bit"])


def test_plugin_load_error_is_not_a_traceback(paths: dict[str, str]) -> None:
    from llmcq.api import AlgorithmSpec
    from llmcq.plugins import registry

    registry.register("llmcq.algorithms", AlgorithmSpec(name="ghost", impl="no_such_mod:X"))
    try:
        raw = _raw(LLMC_RTN_W_ONLY, paths)
        raw["quant"]["method"] = "ghost"
        r = resolve_config(raw)  # the spec loads; the implementation is imported at run time
        with pytest.raises(PluginLoadError, match="no_such_mod"):
            r.steps[0].spec.load_impl()
    finally:
        registry.unregister("llmcq.algorithms", "ghost")


# ------------------------------------------------------------------ through the command line

def _write(tmp_path: Path, raw: dict[str, Any]) -> str:
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(raw))
    return str(p)


@pytest.mark.parametrize("mutate, needle", [
    (lambda r: r["quant"].__setitem__("wieght", r["quant"].pop("weight")),
     "quant.wieght: unknown key"),
    (lambda r: r["quant"]["weight"].__setitem__("bit", 12), "quant.weight.bit"),
    (lambda r: r["eval"].__setitem__("path", "/nonexistent/wiki.txt"),
     "eval.path: no such file or folder"),
    (lambda r: r["quant"].__setitem__("method", "gptqq"), "quant.method"),
])
def test_cli_user_errors_exit_2_without_traceback(llmcq_cli: Any, tmp_path: Path,
                                                  paths: dict[str, str], mutate: Any,
                                                  needle: str) -> None:
    raw = _raw(LLMC_RTN_W_ONLY, paths)
    mutate(raw)
    cfg = _write(tmp_path, raw)
    for command in ("validate", "run"):
        res = llmcq_cli(command, cfg)
        assert res.returncode == 2, res
        assert needle in res.stderr and "Traceback" not in res.output


def test_cli_missing_config_file(llmcq_cli: Any, tmp_path: Path) -> None:
    res = llmcq_cli("validate", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2 and "config file not found" in res.stderr
    assert "Traceback" not in res.output


def test_cli_invalid_yaml(llmcq_cli: Any, tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("quant:\n  method: [rtn\n")
    res = llmcq_cli("validate", str(p))
    assert res.returncode == 2 and "invalid YAML" in res.stderr


def test_cli_validate_ok_and_set(llmcq_cli: Any, tmp_path: Path, paths: dict[str, str]) -> None:
    cfg = _write(tmp_path, _raw(LLMC_RTN_W_ONLY, paths))
    res = llmcq_cli("validate", cfg, "--set", "quant.weight.bit=3")
    assert res.returncode == 0, res
    assert "w3 g128 asym" in res.stdout and "config OK" in res.stdout


def test_load_config_reads_file(tmp_path: Path, paths: dict[str, str]) -> None:
    cfg = _write(tmp_path, _raw(LLMC_RTN_W_ONLY, paths))
    r = load_config(cfg, ["quant.weight.group_size=64"])
    assert r.config.quant.weight.group_size == 64 and r.config_path == cfg


def test_llmc_save_fp_is_save_trans(tmp_path: Path) -> None:
    """llmc's older flag name (TesseraQ's README configs) selects the trans backend once."""
    from llmcq.config.schema import SaveSection

    assert SaveSection(save_fp=True).backend_names == ["trans"]
    assert SaveSection(save_fp=True, save_trans=True, save_fake=True).backend_names == \
        ["trans", "fake"]
    assert SaveSection().backend_names == []
