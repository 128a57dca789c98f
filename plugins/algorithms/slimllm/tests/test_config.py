"""SliM-LLM's config: its spellings, the reference's defaults, and what is refused before any
model loads (each error names the key and what is allowed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError
from llmcq.plugins import registry
from llmcq.testing.paths import shipped_config
from llmcq_slimllm import SPEC, SliMLLMSpecial

REPO = Path(__file__).resolve().parents[4]
W2 = {"bit": 2, "symmetric": False, "granularity": "per_group", "group_size": 64}


def _cfg(data: Path, special: dict[str, Any] | None = None, *, method: str = "SliMLLM",
         weight: dict[str, Any] | None = None, save: dict[str, Any] | None = None,
         calib: bool = True) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model": {"type": "llama"},
        "quant": {"method": method, "special": special or {}, "weight": weight or W2},
        "save": {"save_path": "/tmp/llmcq-slimllm-never-written", **(save or {})}}
    if calib:
        cfg["calib"] = {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                        "n_samples": 16, "seq_len": 64, "preproc": "wikitext2_gptq"}
    return cfg


def test_reference_defaults() -> None:
    """run.py: --lambda_salience 1, --salient_block -1, --nonsalient_block -1, --percdamp
    0.01; the quantizer's range search (tau 0.1) is SQC, always on there."""
    sp = SliMLLMSpecial()
    assert (sp.lambda_salience, sp.salient_block, sp.nonsalient_block, sp.percdamp, sp.sqc,
            sp.actorder, sp.static_groups, sp.allocation_path, sp.save_allocation) == \
        (1.0, -1, -1, 0.01, True, False, False, None, None)


@pytest.mark.parametrize("name", ["slimllm", "SliMLLM", "slim_llm", "SliM-LLM", "SLIMLLM"])
def test_spellings(name: str, shared_data: Path) -> None:
    spec, _ = registry.load_spec("llmcq.algorithms", name, field="quant.method")
    assert spec is SPEC
    resolved = resolve_config(_cfg(shared_data, {"lambda_salience": 2}, method=name))
    assert resolved.steps[0].special.lambda_salience == 2.0


REFUSED = [
    ({}, {"bit": 2, "symmetric": False, "granularity": "per_channel"},
     "quant.weight.granularity", "per_group"),
    ({"salient_block": 2, "nonsalient_block": 1}, None, "quant.special.nonsalient_block",
     "2 (= salient_block)"),
    ({"salient_block": 2}, None, "quant.special.nonsalient_block", "2 (= salient_block)"),
    ({}, {**W2, "symmetric": True}, "quant.weight.symmetric", "False"),
    ({}, {**W2, "bit": 8}, "quant.weight.bit", "2-7"),
    ({"actorder": True}, None, "quant.special.actorder", "True with static_groups: True"),
    ({"salient_block": 1, "nonsalient_block": 1, "allocation_path": "a.pt"}, None,
     "quant.special.salient_block", "-1"),
    ({"nsamples": 128}, None, "quant.special.nsamples", "16"),
    ({}, {**W2, "calib_algo": "mse"}, "quant.weight.calib_algo", "minmax"),
    ({"sqc": False, "lambda_salience": 4}, None, "quant.special.lambda_salience", None),
    ({"salient_block": -2}, None, "quant.special.salient_block", None),
    ({"lambda_salience": -1}, None, "quant.special.lambda_salience", None),
    ({"lamda_salience": 2}, None, "quant.special.lamda_salience", "lambda_salience"),
]


@pytest.mark.parametrize(("special", "weight", "key", "allowed"), REFUSED)
def test_refused_naming_the_key(shared_data: Path, special: dict[str, Any],
                                weight: dict[str, Any] | None, key: str,
                                allowed: str | None) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(_cfg(shared_data, special, weight=weight))
    text = str(err.value)
    assert key in text, text
    if allowed is not None:
        assert allowed in text, text


@pytest.mark.parametrize(("special", "weight"), [
    ({"salient_block": 0, "nonsalient_block": 0}, {**W2, "bit": 8}),       # uniform 8 bits
    ({"salient_block": 0, "nonsalient_block": 0}, {**W2, "symmetric": True}),
    ({}, {**W2, "bit": 3, "symmetric": True}),                              # 2..4-bit groups
    ({"nsamples": 16, "sqc": False}, None),
    ({"actorder": True, "static_groups": True}, None),
    ({"static_groups": True}, None),
])
def test_accepted(shared_data: Path, special: dict[str, Any],
                  weight: dict[str, Any] | None) -> None:
    resolve_config(_cfg(shared_data, special, weight=weight))


def test_mixed_widths_refused_by_uniform_backends_with_the_hint(shared_data: Path) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(_cfg(shared_data, {}, weight={**W2, "bit": 4},
                            save={"save_vllm": True}))
    text = str(err.value)
    assert "per-group bit widths" in text and "salient_block: 0" in text, text
    # uniform widths (SQC alone) export anywhere the grid does
    resolve_config(_cfg(shared_data, {"salient_block": 0, "nonsalient_block": 0},
                        weight={**W2, "bit": 4}, save={"save_vllm": True}))
    # the fake-quant backend writes mixed widths, and the fractional zeros of 1-bit groups
    resolve_config(_cfg(shared_data, {}, save={"save_fake": True}))


def test_declares_fractional_zeros_only_where_one_bit_groups_exist(shared_data: Path) -> None:
    def produced(special: dict[str, Any], weight: dict[str, Any]) -> list[str]:
        resolved = resolve_config(_cfg(shared_data, special, weight=weight))
        return [f.name for f in resolved.features if f.source == "slimllm"]

    assert produced({}, W2) == ["group_bits", "fractional_zero"]
    assert produced({}, {**W2, "bit": 3}) == ["group_bits"]
    assert produced({"salient_block": 0, "nonsalient_block": 0}, W2) == []


@pytest.mark.parametrize("name", ["slimllm_w2g64.yaml", "slimllm_w3g64.yaml"])
def test_shipped_configs_validate(name: str, shared_data: Path) -> None:
    raw = shipped_config(REPO / "configs" / "slimllm" / name, shared_data)
    assert raw["quant"]["method"] == "SliMLLM"
    resolve_config(raw)


def test_mix_bits_settings_are_checked_at_their_keys(shared_data: Path) -> None:
    cfg = _cfg(shared_data, {})
    cfg["quant"]["mix_bits"] = {"setting_0": {"layer_name": ["down_proj"], "weight": {
        "bit": 2, "symmetric": True, "granularity": "per_group", "group_size": 64}}}
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg)
    assert "quant.mix_bits.setting_0.weight.symmetric" in str(err.value), str(err.value)
    cfg["quant"]["mix_bits"]["setting_0"]["weight"]["symmetric"] = False
    resolve_config(cfg)
