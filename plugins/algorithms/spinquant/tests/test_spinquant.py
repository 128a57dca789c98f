"""SpinQuant on tiny Llamas: the learned rotations stay orthogonal and keep the float
function, the training forward is the quantized model's loss, Cayley steps lower that loss
below the Hadamard start, the recipes with RTN and GPTQ run through the pipeline (records
with R4's Hadamard; R1/R2 alone export a plain checkpoint), bad keys are refused."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError, ConfigErrors
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.engine import deploy_fake_quant
from llmcq.pipeline.runner import run
from llmcq.plugins import registry
from llmcq.quant.rtn import rtn_records
from llmcq.quant.spec import ActQuantSpec, PerChannel, PerToken, WeightQuantSpec
from llmcq.quant.transform import online_transform_of
from llmcq.testing.tiny_models import tiny_llama_config
from llmcq.transforms.hadamard import hadamard_matrix
from llmcq_quarot.algorithm import attach_down_transforms, fuse_and_untie, plan_rotation
from llmcq_spinquant import SpinQuantSpecial
from llmcq_spinquant.algorithm import RotatedForward, SpinQuant, calibration_samples
from llmcq_spinquant.solver import orthogonality_error

W4 = {"bit": 4, "symmetric": True, "granularity": "per_channel"}
A4 = {"bit": 4, "symmetric": True, "granularity": "per_token"}
W4S = WeightQuantSpec(bits=4, symmetric=True, granularity=PerChannel())
A4S = ActQuantSpec(bits=4, symmetric=True, granularity=PerToken())
SMALL = {"nsamples": 8, "batch_size": 4, "micro_batch": 4}  # CPU schedule


def config(model: Path, data: Path, save: Path, method: Any, *, act: bool = True,
           special: dict[str, Any] | None = None, **save_keys: Any) -> dict[str, Any]:
    q: dict[str, Any] = {"method": method, "weight": W4}
    if act:
        q["act"] = A4
    if special is not None:
        q["special"] = special
    return {"base": {"seed": 0, "device": "cpu"},
            "model": {"type": "llama", "path": str(model)},
            "calib": {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                      "n_samples": 4, "seq_len": 64, "preproc": "wikitext2_gptq", "bs": 2,
                      "seed": 1},
            "quant": q, "save": {"save_path": str(save), **save_keys}}


def adapter() -> Any:
    spec, _ = registry.load_spec("llmcq.models", "llama", field="model.type")
    return spec.load_impl()(spec)


def tiny64(seed: int = 0) -> Any:
    """A float64 tiny Llama (GQA 4/2 heads, tied head) with norms away from 1."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=512))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08) if p.dim() >= 2 else p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model.double().eval()


def standin(cfg: dict[str, Any], tok: Any, *, steps: int, **special: Any) -> Any:
    """A run without the pipeline: the resolved config's calibration, W4A4 grids."""
    resolved = resolve_config(cfg, overwrite=True)
    return SimpleNamespace(
        adapter=adapter(), weight=W4S, act=A4S, device=torch.device("cpu"),
        config=resolved.config, resolved=resolved, token_source=lambda _d: tok,
        special=SpinQuantSpecial(steps=steps, **{**SMALL, **special}))


def spin(model: Any, run: Any) -> SpinQuant:
    algo = SpinQuant(run=run, step=SimpleNamespace(special=run.special))
    algo.transform_model(model)
    return algo


def ce(model: Any, ids: torch.Tensor) -> float:
    with torch.no_grad():
        lg = model(input_ids=ids, use_cache=False).logits.double()
    return float(torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]),
                                                   ids[:, 1:].reshape(-1)))


def rtn_deploy(model: Any) -> None:
    """What [SpinQuant, RTN] W4A4 deploys: min-max RTN records of every block linear with
    its online transform and per-token activations."""
    records = {}
    for i, blk in enumerate(model.model.layers):
        lins = {n: m for n, m in blk.named_modules() if isinstance(m, torch.nn.Linear)}
        for n, rec in rtn_records(lins, W4S).items():
            rec.input_transform = online_transform_of(lins[n])
            rec.act = A4S
            records[f"model.layers.{i}.{n}"] = rec
    deploy_fake_quant(model, records)


def test_learned_rotations_are_orthogonal_and_keep_the_float_function(
        tmp_path: Path, tiny_llama_dir: Path, shared_data: Path, tiny_tokenizer: Any) -> None:
    model = tiny64()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    r = standin(config(tiny_llama_dir, shared_data, tmp_path, ["SpinQuant", "RTN"]),
                tiny_tokenizer, steps=6)
    algo = spin(model, r)
    assert algo.facts["steps"] == 6 and algo.facts["r2_per_block"] == 2
    # learned: away from the Hadamard start, still orthogonal (R1 and every block's R2)
    assert float((algo.r1 - hadamard_matrix(64, torch.float64)).abs().max()) > 1e-3
    assert orthogonality_error(algo.r1) < 1e-10
    assert all(orthogonality_error(x) < 1e-10 for x in algo.r2)
    assert not torch.allclose(algo.r2[0], algo.r2[1])  # one R2 per block
    assert algo.facts["orthogonality_error"] < 1e-10
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False).logits
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 1e-4, rel  # float32 RMSNorm inside a float64 model: ~1e-7
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert all(online_transform_of(b.mlp.down_proj) is not None for b in model.model.layers)


def test_the_training_loss_is_the_quantized_models_loss(
        tmp_path: Path, tiny_llama_dir: Path, shared_data: Path, tiny_tokenizer: Any) -> None:
    """The on-the-fly forward (rotations applied to fake-quantized weights and activations)
    at the learned R1/R2 gives the cross-entropy of the model rotated in place and then
    quantized as the block loop does (RTN records, online R4, per-token activations)."""
    base = tiny64(1)
    r = standin(config(tiny_llama_dir, shared_data, tmp_path, ["SpinQuant", "RTN"]),
                tiny_tokenizer, steps=3)
    ids = torch.cat(calibration_samples(r, 4))
    learned = copy.deepcopy(base)
    algo = spin(learned, r)
    rtn_deploy(learned)
    quantized = ce(learned, ids)
    # the training forward on the fused, R4-folded model
    fwd_model = copy.deepcopy(base)
    plan = plan_rotation(fwd_model, r.adapter)
    fuse_and_untie(fwd_model, plan, torch.device("cpu"))
    attach_down_transforms(plan, 0, True, torch.device("cpu"))
    fwd = RotatedForward(fwd_model, plan, lambda n: W4S, lambda n: A4S, torch.float64)
    with torch.no_grad(), fwd.hooks(algo.r1):
        training = float(fwd.loss(fwd.params(algo.r1, algo.r2), ids))
    assert training == pytest.approx(quantized, rel=1e-6), (training, quantized)
    # and it is a quantized loss: the float model's differs
    assert abs(ce(base, ids) - quantized) > 1e-3


def test_cayley_steps_lower_the_quantized_loss_below_the_hadamard_start(
        tmp_path: Path, tiny_llama_dir: Path, shared_data: Path) -> None:
    """Through the pipeline, [SpinQuant, RTN] W4A4 with 0 steps (the Hadamard start, i.e.
    QuaRot) and with 10 Cayley SGD steps on the same 4 samples (every step sees the whole
    batch, so the steps descend one objective): the deployed quantized model's
    cross-entropy on those samples is lower after the steps. (With the gradient's sign
    flipped it rises: measured 6.425 -> 6.451, against 6.425 -> 6.370 here; with fresh
    samples at every step a random walk from the Hadamard start lowers it too.)"""
    model, tok = load_pretrained(ModelSource(tiny_llama_dir))
    losses = {}
    for steps in (0, 10):
        m = copy.deepcopy(model)
        cfg = config(tiny_llama_dir, shared_data, tmp_path / str(steps), ["SpinQuant", "RTN"],
                     special={"SpinQuant": {"steps": steps, "nsamples": 4, "batch_size": 4,
                                            "micro_batch": 4}, "RTN": {}})
        res = run(resolve_config(cfg), progress=False, model=m, tokenizer=tok)
        assert res["recipe"][0]["steps"] == steps
        assert steps == 0 or res["recipe"][0]["train_weights"] == "rtn"
        if steps == 0:
            resolved = resolve_config(cfg, overwrite=True)
            ids = torch.cat(calibration_samples(SimpleNamespace(
                config=resolved.config, resolved=resolved, token_source=lambda _d: tok), 4))
        losses[steps] = ce(m, ids)
    assert losses[10] < losses[0], losses


def test_recipes_with_gptq_and_the_offline_export(
        tmp_path: Path, tiny_llama_dir: Path, shared_data: Path) -> None:
    from transformers import AutoModelForCausalLM

    model, tok = load_pretrained(ModelSource(tiny_llama_dir))
    x = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = model(input_ids=x, use_cache=False).logits
    # [SpinQuant, GPTQ] W4A4: the records of down_proj carry R4's Hadamard
    m = copy.deepcopy(model)
    cfg = config(tiny_llama_dir, shared_data, tmp_path / "gptq", ["SpinQuant", "GPTQ"],
                 special={"SpinQuant": {"steps": 2, **SMALL}, "GPTQ": {"actorder": True}})
    res = run(resolve_config(cfg), progress=False, model=m, tokenizer=tok)
    step = res["recipe"][0]
    assert step["method"] == "spinquant" and step["online"] == {"hadamard(160 = 20 x 8)": 2}
    assert step["steps"] == 2 and step["samples"] == 8 and step["untied_embeddings"] is True
    # before GPTQ the rotations are learned with float weights (the reference's practice)
    assert step["train_weights"] == "none"
    for blk in m.model.layers:
        assert blk.mlp.down_proj.input_transform.describe() == "hadamard(160 = 20 x 8)"
        assert blk.self_attn.q_proj.input_transform is None
    # R1/R2 only (online_rotate: False): save_trans is a plain untied checkpoint with the
    # float logits, after learning
    m = copy.deepcopy(model)
    cfg = config(tiny_llama_dir, shared_data, tmp_path / "trans", ["SpinQuant", "RTN"],
                 act=False, special={"SpinQuant": {"steps": 2, "online_rotate": False, **SMALL},
                                     "RTN": {}}, save_trans=True)
    res = run(resolve_config(cfg), progress=False, model=m, tokenizer=tok)
    assert res["recipe"][0]["online"] == {}
    trans = AutoModelForCausalLM.from_pretrained(str(tmp_path / "trans" / "transformed_model"))
    assert trans.lm_head.weight is not trans.model.embed_tokens.weight
    with torch.no_grad():
        got = trans(input_ids=x, use_cache=False).logits
    torch.testing.assert_close(got, before, rtol=1e-4, atol=1e-4)


def _refusal(cfg: dict[str, Any]) -> str:
    with pytest.raises((ConfigError, ConfigErrors)) as info:
        resolve_config(cfg)
    return str(info.value)


def test_bad_keys_are_refused_at_config_time(tmp_path: Path, tiny_llama_dir: Path,
                                             shared_data: Path) -> None:
    def cfg(sp: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return config(tiny_llama_dir, shared_data, tmp_path / "o", ["SpinQuant", "RTN"],
                      special={"SpinQuant": sp, "RTN": {}}, **kw)

    msg = _refusal(cfg({"rotate_mode": "kronecker"}))
    assert "quant.special.SpinQuant.rotate_mode" in msg and "hadamard" in msg
    bad = {"learning_rate": 1.5, "lr": 0, "steps": -1, "nsamples": 0, "momentum": 1.0,
           "lr_schedule": "step"}
    msg = _refusal(cfg(bad))  # every bad key named at once
    for key in bad:
        assert f"quant.special.SpinQuant.{key}" in msg, (key, msg)
    assert "cosine" in msg
    msg = _refusal(cfg({"batch_size": 2, "micro_batch": 4}))
    assert "quant.special.SpinQuant.micro_batch" in msg and "<= batch_size (2)" in msg
    weight_only = cfg({"train_weight_quant": "none"})
    del weight_only["quant"]["act"]
    msg = _refusal(weight_only)
    assert "quant.special.SpinQuant.train_weight_quant" in msg and "quant.act" in msg
    # the online Hadamard cannot be written by save_fake
    msg = _refusal(cfg({}, save_fake=True))
    assert "online_rotate" in msg and "fake" in msg
    resolve_config(cfg({"online_rotate": False}, save_fake=True))
    # FP8 weights are not trained on
    fp8 = cfg({})
    fp8["quant"]["weight"] = {"bit": "e4m3", "quant_type": "float-quant", "symmetric": True,
                              "granularity": "per_channel"}
    del fp8["quant"]["act"]
    assert "quant.weight.quant_type" in _refusal(fp8)
    budget = cfg({})
    del budget["quant"]["act"]
    budget["quant"]["bit_budget"] = {"target": 3.0, "widths": [2, 4], "n_samples": 2}
    msg = _refusal(budget)
    assert "quant.bit_budget" in msg and "unrotated" in msg
    # training needs calibration text; steps: 0 (QuaRot's rotations) does not
    no_calib = cfg({})
    del no_calib["calib"]
    assert "calib" in _refusal(no_calib)
    del no_calib["quant"]["act"]
    no_calib["quant"]["special"]["SpinQuant"] = {"steps": 0}
    resolve_config(no_calib)
