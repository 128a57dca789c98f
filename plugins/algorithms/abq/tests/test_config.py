"""ABQ-LLM's config: the reference's keys and defaults, its names, and what is refused before
any model loads (each refusal names its key)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError
from llmcq.plugins import registry
from llmcq_abq import SPEC, AbqSpecial

LEARN = {"calib_algo": "learnable", "ste": True}
W4 = {"bit": 4, "symmetric": False, "granularity": "per_channel", **LEARN}
A8 = {"bit": 8, "symmetric": False, "granularity": "per_token", "ste": True}


def _cfg(data: Path, special: dict[str, Any] | None = None, *, method: Any = "ABQLLM",
         weight: dict[str, Any] | None = None, act: dict[str, Any] | None = None
         ) -> dict[str, Any]:
    q: dict[str, Any] = {"method": method, "special": special or {}, "weight": weight or W4}
    if act is not None:
        q["act"] = act
    return {"model": {"type": "llama"},
            "calib": {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                      "n_samples": 4, "seq_len": 64, "preproc": "wikitext2_gptq"},
            "quant": q, "save": {"save_path": "/tmp/llmcq-abq-never-written"}}


def test_reference_defaults_and_names(shared_data: Path) -> None:
    sp = AbqSpecial()
    assert (sp.epochs, sp.let_lr, sp.lwc_lr, sp.alpha, sp.wd, sp.aug_loss, sp.deactive_amp,
            sp.compensation_layers, sp.bit_balance, sp.let, sp.lwc, sp.attn_loss,
            sp.compensation_lr, sp.smooth_up_down) == \
        (10, 0.005, 0.01, 0.5, 0.0, True, True, (3, 4), False, True, True, True, 0.01, True)
    for name in ("abq", "ABQLLM", "abq_llm", "ABQ-LLM"):
        spec, _ = registry.load_spec("llmcq.algorithms", name, field="quant.method")
        assert spec is SPEC
    resolved = resolve_config(_cfg(shared_data, {"compensation_layers": [2, 1], "wd": 0}))
    assert resolved.steps[0].special.compensation_layers == (2, 1)
    assert resolved.needs_calibration


@pytest.mark.parametrize("wbits,abits", [(2, 8), (3, 8), (4, 4), (4, 8), (6, 6), (8, 8),
                                         (2, 16), (5, 5), (7, 4)])
def test_any_weight_bits_with_any_activation_bits(shared_data: Path, wbits: int,
                                                  abits: int) -> None:
    act = None if abits == 16 else {**A8, "bit": abits}  # A16: weight-only
    resolve_config(_cfg(shared_data, weight={**W4, "bit": wbits}, act=act))


@pytest.mark.parametrize("special,weight,act,key", [
    ({"epochs_": 2}, None, None, "quant.special.epochs_"),  # unknown key
    ({"compensation_layers": [-1, 4]}, None, None, "quant.special.compensation_layers"),
    ({"lwc": False, "let": False, "compensation_layers": [0, 0]}, None, None,
     "quant.special.epochs"),
    ({}, {**W4, "calib_algo": "minmax"}, None, "quant.weight.calib_algo"),
    ({"let": False}, None, None, "quant.special.smooth_up_down"),
    ({"compensation_lr": 0}, None, None, "quant.special.compensation_lr"),
    ({}, None, {**A8, "bit": 3}, "quant.act.bit"),
    ({}, None, {**A8, "granularity": "per_tensor"}, "quant.act.granularity"),
])
def test_refusals_name_the_key(shared_data: Path, special: dict[str, Any],
                               weight: dict[str, Any] | None, act: dict[str, Any] | None,
                               key: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(_cfg(shared_data, special, weight=weight, act=act))
    assert key in str(err.value), str(err.value)


def test_weight_bits_outside_2_to_8_refused(shared_data: Path) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(_cfg(shared_data, weight={**W4, "bit": 1}))
    assert "quant.weight.bit" in str(err.value)


def test_bit_balance_only_on_2_bit_asymmetric_weights(shared_data: Path) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(_cfg(shared_data, {"bit_balance": True}, weight={**W4, "bit": 3}))
    assert "quant.special.bit_balance" in str(err.value)
    resolve_config(_cfg(shared_data, {"bit_balance": True}, weight={**W4, "bit": 2}))


@pytest.mark.parametrize("flag", ["save_vllm", "save_autogptq"])
def test_bit_balance_refused_by_a_backend_that_stores_codes(shared_data: Path,
                                                            flag: str) -> None:
    cfg = _cfg(shared_data, {"bit_balance": True},
               weight={**W4, "bit": 2, "granularity": "per_group", "group_size": 64})
    cfg["save"][flag] = True
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg)
    assert "quant.special.bit_balance" in str(err.value), str(err.value)
    cfg["save"] = {"save_path": "/tmp/llmcq-abq-never-written", "save_fake": True}
    resolve_config(cfg)  # dequantized weights hold the 5-level grid
