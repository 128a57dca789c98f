"""Every adapter is checked as ``auto`` is (issue 13, section 12), and adapters are judged by
the layout facts they provide, never by algorithm names:

* a hand-written adapter that forgets its family's logit scaling (Granite's
  ``logits_scaling``) or soft-capping (Gemma 2) is refused before a per-block evaluation,
  with the reason; the same adapter with the head fixed runs, and per-block perplexity then
  equals the whole-model one;
* a third-party algorithm declaring ``layout_needs=("scaling_pairs",)`` runs on
  ``model.type: auto`` for a model whose pairs auto verifies, and is refused, naming the
  unverified parts, for one where it cannot (Qwen2-MoE's shared expert reads the router's
  norm); an adapter whose spec does not provide a fact is refused at config time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from llmcq.algorithm import Algorithm
from llmcq.api import AlgorithmSpec, ModelSpec
from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError, PluginError
from llmcq.model.adapter import ModelAdapter
from llmcq.model.layout import llama_like_layout, prenorm_block
from llmcq.model.loading import ModelSource
from llmcq.pipeline.runner import run
from llmcq.plugins import registry
from llmcq.testing.tiny_models import save_tiny_model, tiny_family_config
from llmcq.transforms.scaling import fold_scale


class ForgetfulGranite(ModelAdapter):
    """Granite described as Llama: forgets ``logits / config.logits_scaling``."""

    layout = llama_like_layout()


class FixedGranite(ForgetfulGranite):
    def head_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return super().head_logits(model, hidden) / model.config.logits_scaling


class ForgetfulGemma(ModelAdapter):
    """Gemma 2 without its final logit soft-capping."""

    layout = llama_like_layout(prenorm_block(mlp_norm="pre_feedforward_layernorm"),
                               final_norm_kind="rms_offset")


class PairMover(Algorithm):
    """A third-party transform: moves a fixed scale through every norm -> linears pair."""

    def transform(self, block: Any, inputs: Any) -> None:
        for g in block.groups:
            if g.prev_op is not None and g.spec.prev_kind == "norm":
                width = next(iter(g.linears.values())).in_features
                fold_scale(g, torch.linspace(0.5, 2.0, width))


ADAPTERS = {"forgetful_granite": ForgetfulGranite, "fixed_granite": FixedGranite,
            "forgetful_gemma": ForgetfulGemma}


@pytest.fixture
def registered() -> Iterator[None]:
    for name, cls in ADAPTERS.items():
        registry.register("llmcq.models", ModelSpec(name=name, impl=f"{__name__}:{cls.__name__}"))
    registry.register("llmcq.models", ModelSpec(name="no_facts", provides=frozenset(),
                                                impl=f"{__name__}:ForgetfulGranite"))
    registry.register("llmcq.algorithms", AlgorithmSpec(
        name="pairmover", impl=f"{__name__}:PairMover", layout_needs=("scaling_pairs",)))
    yield
    for name in (*ADAPTERS, "no_facts"):
        registry.unregister("llmcq.models", name)
    registry.unregister("llmcq.algorithms", "pairmover")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Any:
    from transformers import GraniteConfig

    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            v = len(tiny_tokenizer)
            if kind == "granite":
                cfg = GraniteConfig(vocab_size=v, hidden_size=64, intermediate_size=96,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, logits_scaling=4.0,
                                    embedding_multiplier=2.0, residual_multiplier=0.5,
                                    attention_multiplier=0.25, bos_token_id=0, eos_token_id=0,
                                    pad_token_id=0)
            else:
                cfg = tiny_family_config(kind, vocab_size=v)
                if kind == "gemma2":
                    cfg.final_logit_softcapping = 5.0
            made[kind] = save_tiny_model(tmp_path_factory.mktemp(f"chk-{kind}"), cfg,
                                         tiny_tokenizer, perturb_vectors=True)
        return made[kind]

    return get


def config(folder: Path, save: Path, model_type: str, shared_data: Path, *,
           method: str = "rtn", per_block: bool = False) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "base": {"seed": 0, "device": "cpu"},
        "model": {"type": model_type, "path": str(folder)},
        "quant": {"method": method, "weight": {"bit": 4, "symmetric": False,
                                               "granularity": "per_group", "group_size": 16}},
        "save": {"save_path": str(save)},
    }
    if per_block:
        cfg["eval"] = {"eval_pos": ["pretrain"], "name": "wikitext2",
                       "path": str(shared_data / "wikitext2" / "test.txt"), "seq_len": 32,
                       "bs": 2, "num_samples": 4, "inference_per_block": per_block}
    return cfg


def _run(cfg: dict[str, Any], adapter_name: str) -> dict[str, Any]:
    spec, _ = registry.load_spec("llmcq.models", adapter_name, field="model.type")
    adapter = spec.load_impl()(spec, None)  # type: ignore[attr-defined]
    model, tok = adapter.load(ModelSource(Path(cfg["model"]["path"])))
    return run(resolve_config(cfg), progress=False, model=model.float(), tokenizer=tok)


@pytest.mark.parametrize("kind,forgetful", [("granite", "forgetful_granite"),
                                            ("gemma2", "forgetful_gemma")])
def test_an_adapter_that_forgets_the_logit_scaling_is_refused(
        kind: str, forgetful: str, folders: Any, tmp_path: Path, shared_data: Path,
        registered: None) -> None:
    folder = folders(kind)
    with pytest.raises(PluginError) as err:
        _run(config(folder, tmp_path / "a", forgetful, shared_data, per_block=True), forgetful)
    msg = str(err.value)
    assert f"model adapter {forgetful!r}" in msg
    assert "block-wise logits" in msg and "logit scaling or soft-capping" in msg
    assert "inference_per_block" in msg
    # without per-block evaluation the head is never used: the run goes through
    res = _run(config(folder, tmp_path / "b", forgetful, shared_data), forgetful)
    assert res["quantized_linears"] == 14


def test_the_fixed_adapter_runs_and_per_block_equals_whole_model(
        folders: Any, tmp_path: Path, shared_data: Path, registered: None) -> None:
    folder = folders("granite")
    per = _run(config(folder, tmp_path / "a", "fixed_granite", shared_data, per_block=True),
               "fixed_granite")
    whole_cfg = config(folder, tmp_path / "b", "fixed_granite", shared_data, per_block=True)
    whole_cfg["eval"]["inference_per_block"] = False
    whole = _run(whole_cfg, "fixed_granite")
    assert per["eval"]["pretrain"]["wikitext2"]["ppl"] == \
        pytest.approx(whole["eval"]["pretrain"]["wikitext2"]["ppl"], rel=1e-4)
    # auto applies config.logits_scaling itself and passes the same check
    res = _run(config(folder, tmp_path / "c", "auto", shared_data, per_block=True), "auto")
    assert res["eval"]["pretrain"]["wikitext2"]["ppl"] == \
        pytest.approx(whole["eval"]["pretrain"]["wikitext2"]["ppl"], rel=1e-4)


def test_a_third_party_algorithm_with_layout_needs_on_auto(
        folders: Any, tmp_path: Path, shared_data: Path, registered: None) -> None:
    from llmcq.testing.tiny_models import auto_model_class

    folder = folders("qwen2")
    cfg = config(folder, tmp_path / "ok", "auto", shared_data, method="pairmover")
    cfg["save"]["save_trans"] = True
    spec, _ = registry.load_spec("llmcq.models", "auto", field="model.type")
    adapter = spec.load_impl()(spec, None)  # type: ignore[attr-defined]
    model, tok = adapter.load(ModelSource(folder))
    model.float()
    x = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=x).logits
    norm_before = model.model.layers[0].input_layernorm.weight.clone()
    res = run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
    assert res["quantized_linears"] == 14
    trans = auto_model_class(model.config).from_pretrained(str(tmp_path / "ok" /
                                                               "transformed_model")).float()
    with torch.no_grad():
        got = trans(input_ids=x).logits
    assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    assert not torch.allclose(trans.model.layers[0].input_layernorm.weight, norm_before)

    # auto cannot verify Qwen2-MoE's shared-expert pair: refused, naming it
    with pytest.raises(ConfigError) as err:
        _run(config(folders("qwen2_moe"), tmp_path / "no", "auto", shared_data,
                    method="pairmover"), "auto")
    msg = str(err.value)
    assert "pairmover needs producer -> linears pairs" in msg
    assert "model adapter 'auto' does not provide" in msg
    assert "mlp.shared_expert.gate_proj, mlp.shared_expert.up_proj: their input is " \
           "post_attention_layernorm's output" in msg

    # an adapter whose spec provides no such fact is refused at config time, before loading
    with pytest.raises(ConfigError, match="model adapter 'no_facts' does not provide"):
        resolve_config(config(folder, tmp_path / "cfg", "no_facts", shared_data,
                              method="pairmover"))
