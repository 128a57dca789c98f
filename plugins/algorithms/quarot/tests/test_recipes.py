"""QuaRot through the real run on the tiny Llama: [Quarot, RTN] and [Quarot, GPTQ] recipes,
records carrying R4's online Hadamard, exports of the offline rotations reloading in plain
transformers (untied head), config-time refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError, ConfigErrors
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.runner import run
from llmcq.quant.fake import FakeQuantLinear, set_module
from llmcq.quant.transform import online_transform_of
from llmcq_quarot import QuarotSpecial
from llmcq_quarot.algorithm import Quarot


def config(model: Path, data: Path, save: Path, method: Any, *, weight: dict[str, Any],
           act: dict[str, Any] | None = None, special: dict[str, Any] | None = None,
           **save_keys: Any) -> dict[str, Any]:
    q: dict[str, Any] = {"method": method, "weight": weight}
    if act is not None:
        q["act"] = act
    if special is not None:
        q["special"] = special
    return {"base": {"seed": 0, "device": "cpu"},
            "model": {"type": "llama", "path": str(model)},
            "calib": {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                      "n_samples": 4, "seq_len": 64, "preproc": "wikitext2_gptq", "bs": 2,
                      "seed": 1},
            "quant": q, "save": {"save_path": str(save), **save_keys}}


W4 = {"bit": 4, "symmetric": True, "granularity": "per_channel"}
W8 = {"bit": 8, "symmetric": True, "granularity": "per_channel"}
A4 = {"bit": 4, "symmetric": True, "granularity": "per_token"}
A8 = {"bit": 8, "symmetric": True, "granularity": "per_token"}
X = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(7))


def logits(model: Any, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture
def tiny(tiny_llama_dir: Path) -> tuple[Any, Any]:
    return load_pretrained(ModelSource(tiny_llama_dir))


def test_offline_rotation_exports_a_plain_untied_checkpoint(
        tmp_path: Path, tiny_llama_dir: Path, shared_data: Path, tiny: Any) -> None:
    from transformers import AutoModelForCausalLM

    model, tok = tiny
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the fixture ties them
    before = logits(model)
    cfg = config(tiny_llama_dir, shared_data, tmp_path / "out", ["Quarot", "RTN"], weight=W8,
                 special={"Quarot": {"online_rotate": False}, "RTN": {}},
                 save_trans=True, save_fake=True)
    res = run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
    step = res["recipe"][0]
    assert step["method"] == "quarot" and step["untied_embeddings"] is True
    assert step["online"] == {} and step["r1"].startswith("hadamard(64")
    trans_dir = tmp_path / "out" / "transformed_model"
    assert json.loads((trans_dir / "config.json").read_text())["tie_word_embeddings"] is False
    trans = AutoModelForCausalLM.from_pretrained(str(trans_dir))
    assert trans.lm_head.weight is not trans.model.embed_tokens.weight
    torch.testing.assert_close(logits(trans), before, rtol=1e-4, atol=1e-4)
    fake = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "fake_quant_model"))
    torch.testing.assert_close(logits(fake), logits(model), rtol=1e-5, atol=1e-5)
    assert rel(logits(fake), before) < 0.05  # W8 per channel


def test_online_transform_reaches_records_and_fake_quant(
        tmp_path: Path, tiny_llama_dir: Path, shared_data: Path, tiny: Any) -> None:
    model, tok = tiny
    before = logits(model)
    cfg = config(tiny_llama_dir, shared_data, tmp_path / "out", ["Quarot", "RTN"], weight=W8,
                 act=A8)
    ref = copy.deepcopy(model)
    res = run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
    assert res["recipe"][0]["online"] == {"hadamard(160 = 20 x 8)": 2}
    # the run's records: down_proj's carry the online Hadamard (160 = 20 x 8), no other
    from llmcq.pipeline.engine import deploy_fake_quant  # noqa: F401 - the model is deployed
    for i, blk in enumerate(model.model.layers):
        down = blk.mlp.down_proj
        assert isinstance(down, FakeQuantLinear) and down.input_transform is not None
        assert down.input_transform.describe() == "hadamard(160 = 20 x 8)"
        assert isinstance(blk.self_attn.q_proj, FakeQuantLinear)
        assert blk.self_attn.q_proj.input_transform is None
    assert rel(logits(model), before) < 0.05  # W8A8
    # without quantization the rotated model with the online transform in fake-quant form
    # is the float model: rotate a copy, swap every down_proj for a FakeQuantLinear holding
    # its float weight and the transform (what a lossless record deploys to)
    algo = Quarot(run=type("R", (), {"adapter": _adapter(), "device": torch.device("cpu"),
                                     "weight": None, "act": None})(),
                  step=type("S", (), {"special": QuarotSpecial()})())
    algo.transform_model(ref)
    for i, blk in enumerate(ref.model.layers):
        lin = blk.mlp.down_proj
        t = online_transform_of(lin)
        assert t is not None
        set_module(ref, f"model.layers.{i}.mlp.down_proj", FakeQuantLinear(
            lin.weight.detach().clone(), lin.bias, input_transform=t))
    torch.testing.assert_close(logits(ref), before, rtol=1e-4, atol=1e-4)


def _adapter() -> Any:
    from llmcq.plugins import registry

    spec, _ = registry.load_spec("llmcq.models", "llama", field="model.type")
    return spec.load_impl()(spec)


def _plant_outliers(model: Any) -> None:
    """Two residual channels 25x larger than the others (as in real LLMs' massive
    activations): through the embeddings and the writers' rows."""
    with torch.no_grad():
        for c in (3, 40):
            model.model.embed_tokens.weight[:, c] *= 25.0
            for blk in model.model.layers:
                blk.self_attn.o_proj.weight[c] *= 25.0
                blk.mlp.down_proj.weight[c] *= 25.0


def test_w4a4_rtn_after_quarot_beats_rtn_alone(tmp_path: Path, tiny_llama_dir: Path,
                                                shared_data: Path, tiny: Any) -> None:
    model, tok = tiny
    _plant_outliers(model)
    before = logits(model)
    errs = {}
    for name, method in (("rtn", "RTN"), ("quarot", ["Quarot", "RTN"])):
        m = copy.deepcopy(model)
        cfg = config(tiny_llama_dir, shared_data, tmp_path / name, method, weight=W4, act=A4)
        run(resolve_config(cfg), progress=False, model=m, tokenizer=tok)
        errs[name] = rel(logits(m), before)
    assert errs["quarot"] < 0.8 * errs["rtn"], errs  # measured 0.61 against 0.82


def test_gptq_after_quarot_sees_the_rotated_input(tmp_path: Path, tiny_llama_dir: Path,
                                                  shared_data: Path, tiny: Any) -> None:
    """[Quarot, GPTQ] W4A16: GPTQ's Hessians are collected on T(x) (the float model applies
    the online Hadamard), so its error on held-out text is below [Quarot, RTN]'s."""
    model, tok = tiny
    text = (shared_data / "wikitext2" / "test.txt").read_text()[:20_000]
    held = tok(text, return_tensors="pt").input_ids[:, :256].reshape(2, 128)
    before = logits(model, held)
    errs = {}
    for name, method, special in (
            ("rtn", ["Quarot", "RTN"], {"Quarot": {}, "RTN": {}}),
            ("gptq", ["Quarot", "GPTQ"], {"Quarot": {}, "GPTQ": {"actorder": True,
                                                                 "static_groups": True}})):
        m = copy.deepcopy(model)
        cfg = config(tiny_llama_dir, shared_data, tmp_path / name, method, weight=W4,
                     special=special)
        run(resolve_config(cfg), progress=False, model=m, tokenizer=tok)
        assert m.model.layers[0].mlp.down_proj.input_transform is not None
        errs[name] = rel(logits(m, held), before)
    assert errs["gptq"] < errs["rtn"], errs  # measured 0.285 against 0.320


# ------------------------------------------------------------------------- refusals

def _refusal(cfg: dict[str, Any]) -> str:
    with pytest.raises((ConfigError, ConfigErrors)) as info:
        resolve_config(cfg)
    return str(info.value)


def test_config_refusals(tmp_path: Path, tiny_llama_dir: Path, shared_data: Path) -> None:
    def cfg(**kw: Any) -> dict[str, Any]:
        return config(tiny_llama_dir, shared_data, tmp_path / "o", ["Quarot", "RTN"],
                      weight=W4, act=A4, **kw)

    msg = _refusal(cfg(special={"Quarot": {"rotate_mode": "kronecker"}, "RTN": {}}))
    assert "rotate_mode" in msg and "hadamard" in msg
    msg = _refusal(cfg(special={"Quarot": {"preprocess": True}, "RTN": {}}))
    assert "quant.special.Quarot.preprocess" in msg
    # save_fake cannot write the online Hadamard: refused naming online_rotate
    msg = _refusal(cfg(save_fake=True))
    assert "online_rotate" in msg and "fake" in msg
    resolve_config(cfg(save_fake=True, special={"Quarot": {"online_rotate": False},
                                                "RTN": {}}))
    budget = cfg()
    del budget["quant"]["act"]  # the search is weight-only
    budget["quant"]["bit_budget"] = {"target": 3.0, "widths": [2, 4], "n_samples": 2}
    msg = _refusal(budget)
    assert "quant.bit_budget" in msg and "unrotated" in msg
    # a family without rotation points (Gemma-2's sandwich norms)
    bad = cfg()
    bad["model"]["type"] = "gemma2"
    msg = _refusal(bad)
    assert "quant.method[0]" in msg and "residual-stream writers" in msg and "gemma2" in msg


def test_layernorm_model_is_refused_with_a_reason() -> None:
    from types import SimpleNamespace

    from llmcq.errors import PluginError

    fake = SimpleNamespace(layout=SimpleNamespace(rotation_blockers=()),
                           facts=lambda m: SimpleNamespace(final_norm_kind="layer"))
    algo = Quarot(run=SimpleNamespace(adapter=fake, weight=None, act=None),
                  step=SimpleNamespace(special=QuarotSpecial()))
    with pytest.raises(PluginError, match="LayerNorm"):
        algo.transform_model(torch.nn.Linear(2, 2))
