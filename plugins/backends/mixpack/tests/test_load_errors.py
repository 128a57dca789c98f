"""What mixpack refuses, and how: settings it cannot write fail at config time naming the
key; a missing, damaged or inconsistent folder fails at load time naming the file, tensor
or module (never a model with wrong weights); a g_idx it cannot store fails the export."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError, ConfigErrors, PluginError
from llmcq_mixpack import load_model
from llmcq_mixpack import testing as MB
from llmcq_mixpack.export import export, file_digest
from llmcq_mixpack.format import MixPackFormatError
from safetensors.torch import load_file, save_file

LINEAR = "model.layers.0.mlp.down_proj"  # the first kind: mixed symmetric g48 (3 widths)


# ---------------------------------------------------------------------------- config time

def _config(model: Path, save: Path, weight: dict[str, Any], **sections: Any) -> dict[str, Any]:
    return {"base": {"device": "cpu"}, "model": {"type": "llama", "path": str(model)},
            "quant": {"method": "rtn", "weight": weight, **sections.pop("quant", {})},
            "save": {"save_path": str(save), "backends": ["mixpack"]}, **sections}


W3 = {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 48}


def _refusal(cfg: dict[str, Any]) -> ConfigError:
    with pytest.raises((ConfigError, ConfigErrors)) as err:
        resolve_config(cfg)
    exc = err.value
    return exc.errors[0] if isinstance(exc, ConfigErrors) else exc


def test_any_integer_grid_validates(tmp_path: Path, tiny_llama_dir: Path) -> None:
    for weight in (W3, {"bit": 8, "symmetric": True, "granularity": "per_tensor"},
                   {"bit": 2, "symmetric": True, "granularity": "per_channel"},
                   {**W3, "round_zp": False}):
        resolved = resolve_config(_config(tiny_llama_dir, tmp_path / "o", weight))
        assert [b.name for b in resolved.backends] == ["mixpack"]


def test_dynamic_per_token_integer_activations_validate(tmp_path: Path,
                                                        tiny_llama_dir: Path) -> None:
    for act in ({"bit": 8, "symmetric": True, "granularity": "per_token"},
                {"bit": 4, "symmetric": False, "granularity": "per_token"},
                {"bit": 8, "symmetric": True, "granularity": "per_token", "sym_range": "full"}):
        resolved = resolve_config(_config(tiny_llama_dir, tmp_path / "o", W3,
                                          quant={"act": act}))
        assert [b.name for b in resolved.backends] == ["mixpack"]


@pytest.mark.parametrize(("act", "path", "allowed"), [
    ({"bit": 8, "symmetric": True, "granularity": "per_tensor", "static": True},
     "quant.act", "dynamic"),
    ({"bit": 8, "symmetric": True, "granularity": "per_tensor"},
     "quant.act.granularity", "per_token"),
    ({"bit": 8, "symmetric": True, "granularity": "per_group", "group_size": 16},
     "quant.act.granularity", "per_token"),
])
def test_activation_settings_it_cannot_reproduce_are_refused_naming_the_key(
        tmp_path: Path, tiny_llama_dir: Path, act: dict[str, Any], path: str,
        allowed: str) -> None:
    with pytest.raises((ConfigError, ConfigErrors)) as info:
        resolve_config(_config(tiny_llama_dir, tmp_path / "o", W3, quant={"act": act}))
    errors = getattr(info.value, "errors", [info.value])  # static: also "add a calib section"
    ours = [e for e in errors if "backend mixpack (save.backends)" in str(e)]
    assert len(ours) == 1, str(info.value)
    assert ours[0].path == path and allowed in str(ours[0]), str(ours[0])


def test_fp8_activations_have_no_place_in_the_format() -> None:
    """Core refuses FP8 activations on an integer weight grid, and mixpack FP8 weights
    (``float_format``); the format's own check names the field too."""
    from llmcq.quant.spec import ActQuantSpec, PerToken
    from llmcq_mixpack.format import act_problem, read_act

    fp8 = ActQuantSpec(bits=8, symmetric=True, granularity=PerToken(), fmt="e4m3")
    assert act_problem(fp8) == ("fmt", "e4m3", ("int",))
    assert act_problem(ActQuantSpec(bits=6, symmetric=False)) is None
    with pytest.raises(MixPackFormatError, match="act fmt 'e4m3'.*allowed fmt: int"):
        read_act("here", fp8.to_dict())


def test_a_mix_bits_setting_with_static_activations_is_refused(tmp_path: Path,
                                                               tiny_llama_dir: Path) -> None:
    setting = {"layer_name": ["down_proj"], "do_quant": True, "weight": W3,
               "act": {"bit": 8, "symmetric": True, "granularity": "per_tensor"}}
    err = _refusal(_config(tiny_llama_dir, tmp_path / "o", W3, quant={
        "act": {"bit": 8, "symmetric": True, "granularity": "per_token"},
        "mix_bits": {"setting_0": setting}}))
    assert "mix_bits.setting_0" in err.path and "per_token" in str(err), str(err)


def test_fp8_is_refused_naming_the_key(tmp_path: Path, tiny_llama_dir: Path) -> None:
    fp8 = {"quant_type": "float-quant", "bit": "e4m3", "symmetric": True,
           "granularity": "per_channel"}
    err = _refusal(_config(tiny_llama_dir, tmp_path / "o", fp8))
    assert err.path == "quant.weight.quant_type" and "integer codes only" in str(err)


def test_a_sparsity_mask_is_refused_naming_the_key(tmp_path: Path,
                                                   tiny_llama_dir: Path) -> None:
    sparse = {"method": "magnitude", "weight": {"sparsity": 0.5}}
    err = _refusal(_config(tiny_llama_dir, tmp_path / "o", W3, sparse=sparse))
    assert err.path == "sparse.method" and "no mask" in str(err)


# ----------------------------------------------------------------------------- export time

def test_a_g_idx_with_uneven_groups_fails_the_export_naming_the_linear(
        tmp_path: Path, tiny_llama_dir: Path) -> None:
    model, tok, records = MB.fake_quantized(tiny_llama_dir)
    name = next(n for n, r in records.items() if r.g_idx is not None)
    g_idx = records[name].g_idx.clone()
    g_idx[g_idx == 0] = 1  # group 0 empty, group 1 twice as wide
    records[name].g_idx = g_idx
    with pytest.raises(PluginError, match=f"mixpack: {name} .*not all of group_size"):
        export(SimpleNamespace(tokenizer=tok), model, records, tmp_path)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------- load time

@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    model, tok, records = MB.fake_quantized(tiny_llama_dir)
    folder = tmp_path_factory.mktemp("mixpack") / "mixpack_model"
    folder.mkdir()
    export(SimpleNamespace(tokenizer=tok), model, records, folder)
    return folder


@pytest.fixture
def folder(tmp_path: Path, exported: Path) -> Path:
    """A fresh copy of the export, for a test to damage."""
    return Path(shutil.copytree(exported, tmp_path / "mixpack_model"))


def _qc(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def _rewrite(folder: Path, tensors: Callable[[dict[str, torch.Tensor]], None] | None = None,
             qc: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Change the stored tensors and/or quantization_config, keeping the recorded size and
    sha256 consistent (what a writer with a bug, not a damaged disk, produces)."""
    cfg = json.loads((folder / "config.json").read_text())
    if tensors is not None:
        path = folder / "model.safetensors"
        state = load_file(str(path))
        tensors(state)
        save_file(state, str(path), metadata={"format": "pt"})
        cfg["quantization_config"]["weight_files"]["model.safetensors"] = file_digest(path)
    if qc is not None:
        qc(cfg["quantization_config"])
    (folder / "config.json").write_text(json.dumps(cfg))


def _fails(folder: Path, match: str, **kwargs: Any) -> None:
    with pytest.raises(MixPackFormatError, match=match):
        load_model(folder, **kwargs)


def test_the_undamaged_copy_loads(folder: Path) -> None:
    assert type(load_model(folder).get_submodule(LINEAR)).__name__ == "MixPackLinear"


def test_missing_folder_config_or_header(folder: Path, tmp_path: Path) -> None:
    _fails(tmp_path / "nowhere", "is not a folder")
    (folder / "config.json").write_text("{not json")
    _fails(folder, "config.json is not valid JSON")
    (folder / "config.json").unlink()
    _fails(folder, "config.json is missing")


def test_not_mixpack_or_another_version(folder: Path) -> None:
    _rewrite(folder, qc=lambda q: q.update(format_version=3))
    _fails(folder, "format_version 3; this loader reads versions 1, 2")
    _rewrite(folder, qc=lambda q: q.update(quant_method="gptq"))
    _fails(folder, "quant_method is 'gptq', not 'llmcq_mixpack'")
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["quantization_config"]
    (folder / "config.json").write_text(json.dumps(cfg))
    _fails(folder, "no quantization_config; not a mixpack folder")


def test_weight_files_outside_the_folder_are_refused(folder: Path) -> None:
    _rewrite(folder, qc=lambda q: q.update(weight_files={"../model.safetensors": {}}))
    _fails(folder, "weight file '../model.safetensors' is not a .safetensors file of the "
           "folder")


def test_missing_truncated_or_damaged_weight_file(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # same size, one bit flipped
    path.write_bytes(bytes(data))
    _fails(folder, "sha256 differs")
    path.write_bytes(bytes(data[:-100]))
    _fails(folder, "bytes, config.json records .* \\(truncated or replaced\\)")
    path.unlink()
    _fails(folder, "weight file model.safetensors is missing")


def test_a_missing_tensor_is_named(folder: Path) -> None:
    _rewrite(folder, tensors=lambda t: t.pop(f"{LINEAR}.codes_b3"))
    _fails(folder, f"tensor {LINEAR}.codes_b3 is missing")


def test_a_missing_float_tensor_is_named(folder: Path) -> None:
    _rewrite(folder, tensors=lambda t: t.pop("model.norm.weight"))
    _fails(folder, "tensor model.norm.weight is missing")


def test_a_wrong_dtype_or_shape_is_named(folder: Path) -> None:
    _rewrite(folder, tensors=lambda t: t.update({f"{LINEAR}.scale": t[f"{LINEAR}.scale"].half()}))
    _fails(folder, f"tensor {LINEAR}.scale is float16 .*, expected float32")


def test_a_float_tensor_of_the_wrong_shape_is_named(folder: Path) -> None:
    _rewrite(folder, tensors=lambda t: t.update({"model.norm.weight": torch.ones(3)}))
    _fails(folder, "float tensors do not fit .*model.norm.weight")


def test_bits_past_the_last_code_are_corruption(folder: Path) -> None:
    name, width, n = next((name, b, n) for name, e in _qc(folder)["modules"].items()
                          for b, n in e["widths"].items() if n % 32)
    key = f"{name}.codes_b{width}"

    def set_padding(t: dict[str, torch.Tensor]) -> None:
        t[key][0, -1] |= 1 << 31  # the last code sits at bit n % 32 - 1 < 31

    _rewrite(folder, tensors=set_padding)
    _fails(folder, f"tensor {key} has bits set past its last code")


def test_an_invalid_bit_map_is_named(folder: Path) -> None:
    def nine(t: dict[str, torch.Tensor]) -> None:
        t[f"{LINEAR}.group_bits"][0, 0] = 9

    _rewrite(folder, tensors=nine)
    _fails(folder, f"tensor {LINEAR}.group_bits has widths outside 1..8")


def test_counts_that_disagree_with_the_bit_map_are_named(folder: Path) -> None:
    def swap(t: dict[str, torch.Tensor]) -> None:  # a valid width, but not the written one
        gb = t[f"{LINEAR}.group_bits"]
        gb[gb == 2] = 3

    _rewrite(folder, tensors=swap)
    _fails(folder, f"module {LINEAR}: code counts per width .* disagree with its bit map")


def test_a_column_order_that_is_not_a_permutation_is_named(folder: Path) -> None:
    name = next(n for n, e in _qc(folder)["modules"].items() if e["col_perm"])

    def repeat(t: dict[str, torch.Tensor]) -> None:
        t[f"{name}.col_perm"][0] = t[f"{name}.col_perm"][1]

    _rewrite(folder, tensors=repeat)
    _fails(folder, f"tensor {name}.col_perm is not a permutation")


def test_a_stray_tensor_or_an_unknown_module_is_named(folder: Path) -> None:
    _rewrite(folder, tensors=lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    _fails(folder, "tensor model.extra.weight belongs to no module of the model")

    def rename(q: dict[str, Any]) -> None:
        q["modules"]["model.layers.7.mlp.down_proj"] = q["modules"].pop(LINEAR)

    _rewrite(folder, tensors=lambda t: t.pop("model.extra.weight"), qc=rename)
    _fails(folder, "tensor model.layers.7.mlp.down_proj.scale is missing")


def test_a_module_the_config_does_not_build_is_named(folder: Path) -> None:
    def move(t: dict[str, torch.Tensor]) -> None:
        for key in [k for k in t if k.startswith(LINEAR + ".")]:
            t[key.replace(LINEAR, "model.layers.7.mlp.down_proj")] = t.pop(key)

    _rewrite(folder, tensors=move, qc=lambda q: q["modules"].update(
        {"model.layers.7.mlp.down_proj": q["modules"].pop(LINEAR)}))
    _fails(folder, "module model.layers.7.mlp.down_proj: the model config.json builds has no "
           "such module")


def test_an_entry_with_unknown_keys_is_named(folder: Path) -> None:
    _rewrite(folder, qc=lambda q: q["modules"][LINEAR].update(order="column-major"))
    _fails(folder, f"module {LINEAR}: entry keys")
