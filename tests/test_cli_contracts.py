"""Command-line and config contracts of issue 13: ``plugins --describe`` and summaries,
every config error reported at once, ``save_path`` that is a file, checkpoints without a
tokenizer, random ids bounded by the embedding, ``model.type`` given as a Hugging Face
model type, YAML lists for tuple keys, ``--no-progress`` silencing library bars."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmcq.api import AlgorithmSpec
from llmcq.config.loader import resolve_config
from llmcq.config.schema import SpecialConfig
from llmcq.errors import ConfigError, ConfigErrors
from llmcq.plugins import registry

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "chat_template.jinja")


def _write(tmp: Path, cfg: dict[str, Any], name: str = "c.yaml") -> str:
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _rtn(model: Path, save: Path) -> dict[str, Any]:
    return {"base": {"seed": 0, "device": "cpu"}, "model": {"type": "llama", "path": str(model)},
            "quant": {"method": "rtn", "weight": {"bit": 4, "symmetric": True,
                                                  "granularity": "per_channel"}},
            "save": {"save_path": str(save)}}


def test_describe_lists_keys_docs_and_declarations(llmcq_cli: Any) -> None:
    res = llmcq_cli("plugins", "--describe", "GPTQ")
    assert res.returncode == 0, res
    out = res.stdout
    assert "static_groups: bool = False" in out
    assert "fix every group's grid on the original column order" in out  # the #: doc
    assert "uses_masks: True" in out and "'produces': ['g_idx']" in out
    res = llmcq_cli("plugins", "--describe", "vllm", "--json")
    rows = json.loads(res.stdout)
    assert rows[0]["kind"] == "backend" and "act_quant" in rows[0]["declares"]["accepts"]
    assert "g_idx" not in rows[0]["declares"]["accepts"]
    res = llmcq_cli("plugins", "--describe", "gtpq")
    assert res.returncode == 2 and "did you mean 'gptq'" in res.stderr
    listing = llmcq_cli("plugins").stdout
    assert "Hessian-based error-compensating" in listing  # each plugin's summary


def test_validate_reports_every_error(llmcq_cli: Any, tmp_path: Path,
                                      tiny_llama_dir: Path) -> None:
    cfg = _rtn(tiny_llama_dir, tmp_path / "o")
    cfg["quant"]["weight"]["bitt"] = 3           # unknown key
    cfg["quant"]["weight"]["symmetric"] = "yes"  # wrong type
    cfg["quant"]["method"] = "gtpq"              # unknown algorithm... reported with the rest
    cfg["eval"] = {"name": "wikitext2", "path": str(tmp_path / "missing.txt")}
    res = llmcq_cli("validate", _write(tmp_path, cfg))
    assert res.returncode == 2, res
    err = res.stderr
    assert "problems in the config" in err
    assert "quant.weight.bitt" in err and "quant.weight.symmetric" in err
    cfg["quant"]["weight"].pop("bitt")
    cfg["quant"]["weight"]["symmetric"] = True
    res = llmcq_cli("validate", _write(tmp_path, cfg))
    assert res.returncode == 2
    assert "quant.method" in res.stderr and "eval.path" in res.stderr  # both plugin-level
    assert "Traceback" not in res.stderr


def test_save_path_that_is_a_file_is_refused_before_anything_runs(
        llmcq_cli: Any, tmp_path: Path, tiny_llama_dir: Path) -> None:
    target = tmp_path / "a_file"
    target.write_text("keep me")
    for save in (target, target / "sub"):
        cfg = _rtn(tiny_llama_dir, save)
        res = llmcq_cli("validate", _write(tmp_path, cfg))
        assert res.returncode == 2 and "save.save_path" in res.stderr, res
        res = llmcq_cli("run", _write(tmp_path, cfg))
        assert res.returncode == 2 and "Traceback" not in res.stderr
    assert target.read_text() == "keep me"


@pytest.fixture
def no_tokenizer_dir(tmp_path: Path, tiny_tokenizer: Any) -> Path:
    """A tiny Llama whose embedding (300 rows) is smaller than the tokenizer's vocabulary
    (512), saved without tokenizer files."""
    from llmcq.testing.tiny_models import save_tiny_model, tiny_llama_config

    folder = save_tiny_model(tmp_path / "m", tiny_llama_config(vocab_size=300), tiny_tokenizer)
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    return folder


def test_checkpoint_without_tokenizer_runs_on_random_ids(llmcq_cli: Any, tmp_path: Path,
                                                         no_tokenizer_dir: Path) -> None:
    cfg = _rtn(no_tokenizer_dir, tmp_path / "o")
    cfg["quant"]["method"] = "gptq"
    cfg["calib"] = {"name": "random", "n_samples": 4, "seq_len": 32, "seed": 3}
    cfg["eval"] = {"eval_pos": ["pretrain", "fake_quant"], "name": "random", "seq_len": 32,
                   "num_samples": 2}
    cfg["save"].update({"save_fake": True})
    res = llmcq_cli("run", _write(tmp_path, cfg))
    assert res.returncode == 0, res
    assert "without tokenizer files" in res.stderr
    out = tmp_path / "o" / "fake_quant_model"
    assert (out / "config.json").is_file() and not (out / "tokenizer.json").exists()
    r = json.loads((tmp_path / "o" / "results.json").read_text())
    assert r["eval"]["fake_quant"]["random"]["ppl"] > 1


def test_random_ids_stay_inside_the_embedding(tiny_tokenizer: Any, tmp_path: Path,
                                              no_tokenizer_dir: Path) -> None:
    """With the tokenizer present (512 ids) and an embedding of 300 rows, every drawn id
    indexes the embedding."""
    from llmcq.pipeline.runner import run

    tiny_tokenizer.save_pretrained(str(no_tokenizer_dir))
    cfg = _rtn(no_tokenizer_dir, tmp_path / "o")
    cfg["quant"]["method"] = "gptq"
    cfg["calib"] = {"name": "random", "n_samples": 8, "seq_len": 64, "seed": 0}
    out = run(resolve_config(cfg), progress=False)
    assert out["calibration"]["tokens"] == 8 * 64
    from llmcq.config.schema import CalibSection
    from llmcq.data.datasets import RANDOM

    ids = RANDOM.calibration_ids(300, CalibSection(name="random", n_samples=8, seq_len=64))
    assert max(max(s) for s in ids) < 300 and min(min(s) for s in ids) >= 0


def test_model_type_given_as_a_hf_model_type(tmp_path: Path, tiny_tokenizer: Any) -> None:
    """``model.type: granite``: no family adapter is named so, but the checkpoint is a
    granite one, which the automatic adapter serves."""
    from transformers import GraniteConfig

    from llmcq.testing.tiny_models import save_tiny_model

    gcfg = GraniteConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         logits_scaling=4.0)
    folder = save_tiny_model(tmp_path / "g", gcfg, tiny_tokenizer)
    cfg = _rtn(folder, tmp_path / "o")
    cfg["model"]["type"] = "granite"
    resolved = resolve_config(cfg)
    assert resolved.model[0].name == "auto"
    assert any("granite" in n and "auto" in n for n in resolved.notes)
    cfg["model"]["type"] = "granit"  # a typo is still an error with the closest name
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg)
    assert err.value.path == "model.type"


def test_tuple_keys_accept_yaml_lists(tmp_path: Path, tiny_llama_dir: Path) -> None:
    class TupleSpecial(SpecialConfig):
        #: layers to skip
        skip: tuple[int, ...] = ()
        pair: tuple[str, int] | None = None

    spec = AlgorithmSpec(name="tuple_demo", impl="llmcq_rtn.algorithm:RTN",
                         special=TupleSpecial)
    registry.register("llmcq.algorithms", spec)
    try:
        cfg = _rtn(tiny_llama_dir, tmp_path / "o")
        cfg["quant"].update(method="tuple_demo", special={"skip": [1, 2], "pair": ["a", 3]})
        resolved = resolve_config(yaml.safe_load(yaml.safe_dump(cfg)))
        special = resolved.steps[0].special
        assert special.skip == (1, 2) and special.pair == ("a", 3)
        cfg["quant"]["special"] = {"skip": ["x"]}
        with pytest.raises(ConfigErrors) as err:
            resolve_config(cfg)
        assert "quant.special.skip" in str(err.value)
    finally:
        registry.unregister("llmcq.algorithms", "tuple_demo")


def test_no_progress_silences_library_bars(llmcq_cli: Any, tmp_path: Path,
                                           tiny_llama_dir: Path, shared_data: Path) -> None:
    cfg = _rtn(tiny_llama_dir, tmp_path / "o")
    cfg["eval"] = {"eval_pos": ["fake_quant"], "name": "wikitext2", "seq_len": 32,
                   "path": str(shared_data / "wikitext2" / "test.txt"), "num_samples": 2}
    cfg["save"]["save_fake"] = True
    res = llmcq_cli("run", _write(tmp_path, cfg), "--no-progress")
    assert res.returncode == 0, res
    assert "it/s" not in res.stderr and "Loading weights" not in res.stderr, res.stderr
    shutil.rmtree(tmp_path / "o")


@pytest.mark.parametrize("family", ["granite", "olmo2"])
def test_tokenizer_less_checkpoints_run_through_auto(family: str, tmp_path: Path,
                                                     tiny_tokenizer: Any) -> None:
    """The issue's cases: tiny Granite and OLMo2 folders without tokenizer files, through
    the automatic adapter, calibrated on random ids with no text evaluation."""
    import transformers

    from llmcq.pipeline.runner import run
    from llmcq.testing.tiny_models import save_tiny_model

    cls = {"granite": "GraniteConfig", "olmo2": "Olmo2Config"}[family]
    cfg_model = getattr(transformers, cls)(vocab_size=400, hidden_size=64, intermediate_size=96,
                                           num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2)
    folder = save_tiny_model(tmp_path / family, cfg_model, tiny_tokenizer)
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    cfg = _rtn(folder, tmp_path / "o")
    cfg["model"]["type"] = "auto"
    cfg["quant"]["method"] = "gptq"
    cfg["calib"] = {"name": "random", "n_samples": 2, "seq_len": 32}
    cfg["save"]["save_trans"] = True
    out = run(resolve_config(cfg), progress=False)
    assert out["quantized_linears"] == 2 * 7
    assert not (tmp_path / "o" / "transformed_model" / "tokenizer.json").exists()
