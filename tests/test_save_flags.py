"""``save_<name>: true`` selects an installed backend that llmc's flag table does not know
(a plugin's, here mixpack) with errors naming the flag; llmc's own flags are unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmcq.config.loader import resolve_config
from llmcq.config.schema import SaveSection
from llmcq.errors import ConfigError
from llmcq.plugins import registry


def _cfg(model: Path, save: dict[str, Any]) -> dict[str, Any]:
    return {"model": {"type": "llama", "path": str(model)},
            "quant": {"method": "rtn", "weight": {"bit": 4, "symmetric": False,
                                                  "granularity": "per_group", "group_size": 32}},
            "save": save}


def test_plugin_flags_are_collected_in_order() -> None:
    s = SaveSection.model_validate({"save_path": "x", "save_mixpack": True, "save_fake": True,
                                    "save_other": False, "backends": ["vllm"]})
    assert s.plugin_flags == {"save_mixpack": True, "save_other": False}
    assert s.backend_names == ["fake", "mixpack", "vllm"]
    assert SaveSection.flag_backend("save_autogptq") == "gptq"  # llmc's table first
    assert SaveSection.flag_backend("save_mixpack") == "mixpack"


@pytest.mark.skipif("mixpack" not in [i.name for i in registry.discover("llmcq.backends")],
                    reason="the mixpack backend plugin is not installed")
def test_plugin_flag_selects_the_backend(tiny_llama_dir: Path, tmp_path: Path) -> None:
    r = resolve_config(_cfg(tiny_llama_dir, {"save_path": str(tmp_path / "o"),
                                             "save_mixpack": True}))
    assert [(b.name, b.field) for b in r.backends] == [("mixpack", "save.save_mixpack")]


@pytest.mark.parametrize("save, where, words", [
    ({"save_nosuch": True}, "save.save_nosuch", "unknown name in llmcq.backends"),
    ({"save_mixpack": "yes"}, "save.save_mixpack", "valid boolean"),
    ({"savefake": True}, "save.savefake", "unknown key"),
])
def test_bad_flags_name_the_key(tiny_llama_dir: Path, tmp_path: Path, save: dict[str, Any],
                                where: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(_cfg(tiny_llama_dir, {"save_path": str(tmp_path / "o"), **save}))
    assert where in str(err.value) and words in str(err.value)
