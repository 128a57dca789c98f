"""AutoRound's config: auto-round's keys and defaults, its spellings, and what is refused
before any model loads (each error names the key)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError
from llmcq.plugins import registry
from llmcq.testing.paths import shipped_config
from llmcq_autoround import SPEC, AutoRoundSpecial, default_lr

REPO = Path(__file__).resolve().parents[4]
W3 = {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 64}


def _cfg(data: Path, special: dict[str, Any] | None = None, *, method: Any = "AutoRound",
         weight: dict[str, Any] | None = None, act: dict[str, Any] | None = None,
         quant_out: bool = True, calib: bool = True) -> dict[str, Any]:
    q: dict[str, Any] = {"method": method, "special": special or {}, "weight": weight or W3,
                         "quant_out": quant_out}
    if act is not None:
        q["act"] = act
    cfg: dict[str, Any] = {"model": {"type": "llama"}, "quant": q,
                           "save": {"save_path": "/tmp/llmcq-autoround-never-written"}}
    if calib:
        cfg["calib"] = {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                        "n_samples": 16, "seq_len": 64, "preproc": "wikitext2_gptq"}
    return cfg


def test_auto_round_defaults() -> None:
    """auto-round 0.15.1: AutoRound(iters=None -> SignRoundConfig.iters 200, batch_size=8,
    seed=42, nsamples=128, seqlen=2048), SignRoundConfig(lr=None -> 1/iters, minmax_lr=None ->
    lr, enable_minmax_tuning=True, not_use_best_mse=False, enable_quanted_input=True,
    gradient_accumulate_steps=1), amp True."""
    sp = AutoRoundSpecial()
    assert (sp.iters, sp.lr, sp.minmax_lr, sp.batch_size, sp.gradient_accumulate_steps,
            sp.enable_minmax_tuning, sp.not_use_best_mse, sp.enable_quanted_input, sp.amp,
            sp.seed, sp.nsamples, sp.seqlen) == \
        (200, None, None, 8, 1, True, False, True, True, 42, None, None)
    assert sp.rates(4) == (1 / 200, 1 / 200)
    assert AutoRoundSpecial(lr=0.01).rates(4) == (0.01, 0.01)
    assert AutoRoundSpecial(lr=0.01, minmax_lr=0.02).rates(3) == (0.01, 0.02)
    # auto-round's low-bit heuristic: 2 / iters for <= 3 bits from 1000 iterations on
    assert default_lr(1000, 3) == 2 / 1000 and default_lr(1000, 4) == 1 / 1000
    assert default_lr(999, 2) == 1 / 999 and default_lr(0, 4) == 0.0


@pytest.mark.parametrize("name", ["AutoRound", "autoround", "auto_round", "auto-round",
                                  "SignRound"])
def test_spellings(name: str, shared_data: Path) -> None:
    spec, _ = registry.load_spec("llmcq.algorithms", name, field="quant.method")
    assert spec is SPEC
    resolved = resolve_config(_cfg(shared_data, {"iters": 5, "lr": 1}, method=name))
    assert resolved.steps[0].special.lr == 1.0  # an int for a float
    assert resolved.needs_calibration


def test_iters_zero_needs_no_calibration(shared_data: Path) -> None:
    resolved = resolve_config(_cfg(shared_data, {"iters": 0}, calib=False))
    assert not resolved.needs_calibration


def test_nsamples_and_seqlen_may_repeat_the_calib_section(shared_data: Path) -> None:
    resolve_config(_cfg(shared_data, {"nsamples": 16, "seqlen": 64}))


@pytest.mark.parametrize("name", ["autoround_w3g64.yaml", "autoround_w2g64.yaml",
                                  "autoround_w4g64_sym.yaml"])
def test_shipped_configs_validate(name: str, monkeypatch: pytest.MonkeyPatch,
                                  shared_data: Path) -> None:
    raw = shipped_config(REPO / "configs" / "autoround" / name, shared_data)
    raw["save"]["save_path"] = "/tmp/llmcq-autoround-never-written"
    monkeypatch.chdir(REPO)
    resolved = resolve_config(raw)
    sp = resolved.steps[0].special
    assert sp.iters == 200 and sp.batch_size == 8 and resolved.config.quant.quant_out


@pytest.mark.parametrize("special,weight,act,quant_out,key,allowed", [
    ({}, {"calib_algo": "mse"}, None, True, "quant.weight.calib_algo", "minmax"),
    ({}, {"round_zp": False}, None, True, "quant.weight.round_zp", "True"),
    ({}, {}, {"bit": 8, "symmetric": True, "granularity": "per_token"}, True, "quant.act",
     None),
    ({}, {"quant_type": "float-quant", "bit": "e4m3", "symmetric": True,
          "granularity": "per_channel", "group_size": -1}, None, True,
     "quant.weight.quant_type", "int-quant"),
    ({}, {}, None, False, "quant.special.enable_quanted_input", "False"),
    ({"enable_quanted_input": False}, {}, None, True, "quant.special.enable_quanted_input",
     "True"),
    ({"nsamples": 128}, {}, None, True, "quant.special.nsamples", "16"),
    ({"seqlen": 2048}, {}, None, True, "quant.special.seqlen", "64"),
    ({"iters": -1}, {}, None, True, "quant.special.iters", None),
    ({"lr": 0}, {}, None, True, "quant.special.lr", None),
    ({"minmax_lr": -1.0}, {}, None, True, "quant.special.minmax_lr", None),
    ({"batch_size": 0}, {}, None, True, "quant.special.batch_size", None),
    ({"momentum": 0.9}, {}, None, True, "quant.special.momentum", None),
    ({"bits": 4}, {}, None, True, "quant.special.bits", None),
])
def test_refused_at_config_time(shared_data: Path, special: dict[str, Any],
                                weight: dict[str, Any], act: dict[str, Any] | None,
                                quant_out: bool, key: str, allowed: str | None) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(_cfg(shared_data, special, weight={**W3, **weight}, act=act,
                            quant_out=quant_out))
    assert err.value.path.startswith(key), str(err.value)
    if allowed is not None:
        assert allowed in str(err.value), str(err.value)


def test_weight_only_error_says_so(shared_data: Path) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(_cfg(shared_data, act={"bit": 8, "symmetric": True,
                                              "granularity": "per_token"}))
    assert "weight-only" in str(err.value)
