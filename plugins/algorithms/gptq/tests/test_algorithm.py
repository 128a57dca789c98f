"""GPTQ's plumbing on the tiny Llama: which model state feeds each Hessian (true-sequential
or not), shared Hessians, float weights untouched, OWQ records, recipes, config errors, and a
full ``run()`` whose fake-quantized export reloads with the same logits."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import llmcq
from llmcq.algorithm import Algorithm
from llmcq.api import AlgorithmSpec
from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError
from llmcq.model.adapter import resolve_block
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.blockwise import Block, capture_block_inputs
from llmcq.pipeline.runner import run
from llmcq.plugins import registry
from llmcq.quant.fake import fake_quantized
from llmcq.quant.qparams import QParams
from llmcq.quant.record import make_record
from llmcq.quant.spec import PerGroup, WeightQuantSpec
from llmcq_gptq import GPTQSpecial
from llmcq_gptq.algorithm import GPTQ, HessianBank
from llmcq_gptq.solver import accumulate_hessian, gptq_quantize

SPEC = WeightQuantSpec(bits=3, symmetric=False, granularity=PerGroup(24))  # 64 = 24+24+16


@pytest.fixture
def tiny(tiny_llama_dir: Path) -> tuple[Any, Any]:
    return load_pretrained(ModelSource(tiny_llama_dir))


@pytest.fixture
def block0(tiny: tuple[Any, Any]) -> tuple[Block, Any]:
    model, _ = tiny
    mspec, _ = registry.load_spec("llmcq.models", "llama", field="model.type")
    adapter = mspec.load_impl()(mspec)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 500, (2, 32), generator=g) for _ in range(3)]
    inputs = capture_block_inputs(model, adapter, batches, torch.device("cpu"))
    module = adapter.blocks(model)[0]
    block = Block(0, "model.layers.0", module,
                  resolve_block(module, adapter.block_layout(model, 0), where="model.layers.0"))
    return block, inputs


def make_algo(**special: Any) -> GPTQ:
    run_ctx = SimpleNamespace(weight=SPEC, act=None)
    step = SimpleNamespace(special=GPTQSpecial(**special))
    return GPTQ(run=run_ctx, step=step)  # type: ignore[arg-type]


def manual_hessian(block: Block, inputs: Any, linear: nn.Module) -> torch.Tensor:
    """Brute force: every input row the linear sees, stacked, then 2 X^T X / n."""
    xs: list[torch.Tensor] = []
    handle = linear.register_forward_hook(lambda _m, a, _o: xs.append(a[0].reshape(
        -1, a[0].shape[-1]).double()))
    try:
        inputs.forward(block.module)
    finally:
        handle.remove()
    x = torch.cat(xs)
    return (2 * x.T @ x / x.shape[0]).float()


def expected_records(block: Block, inputs: Any, *, true_sequential: bool,
                     **kw: Any) -> dict[str, torch.Tensor]:
    """Dequantized weights GPTQ should give, from Hessians computed by brute force."""
    out: dict[str, torch.Tensor] = {}
    fq: dict[str, Any] = {}
    hessians = {name: manual_hessian(block, inputs, g.linears[name])
                for g in block.groups for name in list(g.linears)[:1]}
    for group in block.groups:
        first = list(group.linears)[0]
        if true_sequential:
            with fake_quantized(block.module, fq):
                H = manual_hessian(block, inputs, group.linears[first])
        else:
            H = hessians[first]
        W = torch.cat([lin.weight.data for lin in group.linears.values()])
        res = gptq_quantize(W, H, SPEC, return_dequant=True, **kw)
        r0 = 0
        for name, lin in group.linears.items():
            rows = slice(r0, r0 + lin.weight.shape[0])
            r0 = rows.stop
            out[name] = res.w_hat[rows]
            fq[name] = make_record(res.q[rows], QParams(res.scale[rows], res.zero[rows]), SPEC,
                                   bias=lin.bias, g_idx=res.g_idx)
    return out


@pytest.mark.parametrize("true_sequential", [True, False])
def test_hessians_come_from_the_right_model_state(block0: tuple[Block, Any],
                                                  true_sequential: bool) -> None:
    block, inputs = block0
    before = {k: v.clone() for k, v in block.module.state_dict().items()}
    algo = make_algo(true_sequential=true_sequential, actorder=True)
    algo.calibrate(block, inputs)
    records = algo.quantize(block, inputs)
    assert set(records) == set(block.linears())
    for k, v in block.module.state_dict().items():  # float weights never change
        assert torch.equal(v, before[k]), k

    want = expected_records(block, inputs, true_sequential=true_sequential, actorder=True)
    other = expected_records(block, inputs, true_sequential=not true_sequential, actorder=True)
    for name, rec in records.items():
        torch.testing.assert_close(rec.dequantize(), want[name], rtol=0, atol=1e-4)
    # the first group sees the float block either way; the last one does not
    assert torch.allclose(records["self_attn.q_proj"].dequantize(),
                          other["self_attn.q_proj"], atol=1e-4)
    assert not torch.allclose(records["mlp.down_proj"].dequantize(), other["mlp.down_proj"],
                              atol=1e-3)
    assert records["self_attn.q_proj"].g_idx is not None  # act-order without static groups


def test_shared_inputs_share_one_hessian(block0: tuple[Block, Any]) -> None:
    block, inputs = block0
    bank = HessianBank()
    inputs.observe(block.module, block.linears(), bank)
    bank.close()
    assert bank.slots(list(block.linears())) == [
        ("self_attn.q_proj", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
        ("self_attn.o_proj", ["self_attn.o_proj"]),
        ("mlp.gate_proj", ["mlp.gate_proj", "mlp.up_proj"]),
        ("mlp.down_proj", ["mlp.down_proj"])]
    assert bank.n["self_attn.q_proj"] == inputs.n_tokens
    torch.testing.assert_close(bank.H["mlp.down_proj"],
                               manual_hessian(block, inputs, block.module.mlp.down_proj),
                               rtol=1e-4, atol=1e-5)


def test_distinct_inputs_get_their_own_hessians() -> None:
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    bank = HessianBank()
    x = torch.randn(5, 4)
    for _ in range(2):
        bank("a", x, None)
        bank("b", x.clone(), None)  # equal values, another tensor: not shared
    bank.close()
    assert bank.slots(["a", "b"]) == [("a", ["a"]), ("b", ["b"])]
    H = torch.zeros(4, 4)
    accumulate_hessian(H, 0, torch.cat([x, x]))
    torch.testing.assert_close(bank.H["b"], H)
    del a, b


def test_owq_records_keep_float_columns(block0: tuple[Block, Any]) -> None:
    block, inputs = block0
    algo = make_algo(owq=True, n_outs=[2, 2, 2, 3, 2, 2, 5], fp_dtype="float16")
    algo.calibrate(block, inputs)
    records = algo.quantize(block, inputs)
    for name, n in zip(block.linears(), [2, 2, 2, 3, 2, 2, 5]):
        idx, values = records[name].float_columns
        assert idx.numel() == n and values.dtype == torch.float16
        assert torch.equal(records[name].dequantize()[:, idx], values.float())
    assert algo.summary()["owq_float_columns"] == 18
    wrong = make_algo(owq=True, n_outs=[2, 2])
    wrong.calibrate(block, inputs)
    with pytest.raises(ConfigError, match="n_outs"):
        wrong.quantize(block, inputs)


# ------------------------------------------------------------------------- through run()

def config(model: Path, data: Path, save: Path, special: dict[str, Any] | None = None,
           method: Any = "GPTQ") -> dict[str, Any]:
    return {
        "base": {"seed": 0, "device": "cpu"},
        "model": {"type": "llama", "path": str(model)},
        "calib": {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                  "n_samples": 4, "seq_len": 64, "preproc": "wikitext2_gptq", "bs": 2,
                  "seed": 1},
        "eval": {"eval_pos": ["fake_quant"], "name": "wikitext2",
                 "path": str(data / "wikitext2" / "test.txt"), "seq_len": 64, "bs": 2,
                 "num_samples": 4},
        "quant": {"method": method,
                  "weight": {"bit": 3, "symmetric": False, "granularity": "per_group",
                             "group_size": 24},
                  "special": special or {}},
        "save": {"save_path": str(save)},
    }


class Grab:
    def __init__(self) -> None:
        self.records: dict[str, Any] = {}

    @llmcq.hookimpl
    def llmcq_evaluate(self, run: Any) -> list:
        self.records = dict(run.records)
        return []


def test_run_exports_and_reloads(tmp_path: Path, tiny_llama_dir: Path, shared_data: Path,
                                 tiny: Any) -> None:
    from transformers import AutoModelForCausalLM

    model, tok = tiny
    cfg = config(tiny_llama_dir, shared_data, tmp_path / "out",
                 {"actorder": True, "static_groups": False, "percdamp": 0.01,
                  "blocksize": 128, "true_sequential": True})
    cfg["save"]["save_fake"] = True
    grab = Grab()
    res = run(resolve_config(cfg), progress=False, model=model, tokenizer=tok,
              extra_plugins=[grab])
    assert res["quantized_linears"] == 14
    assert res["recipe"][0]["method"] == "gptq" and res["recipe"][0]["cholesky_retries"] == 0
    assert res["eval"]["fake_quant"]["wikitext2"]["ppl"] > 1
    assert all(r.g_idx is not None for r in grab.records.values())
    x = torch.randint(0, 500, (1, 24), generator=torch.Generator().manual_seed(3))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "fake_quant_model"))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=x).logits, model(input_ids=x).logits)
    w = reloaded.model.layers[1].mlp.up_proj.weight
    assert torch.equal(w, grab.records["model.layers.1.mlp.up_proj"].dequantize())


def test_run_owq_and_static_groups(tmp_path: Path, tiny_llama_dir: Path, shared_data: Path,
                                   tiny: Any) -> None:
    model, tok = tiny
    cfg = config(tiny_llama_dir, shared_data, tmp_path / "out",
                 {"owq": True, "owq_ratio": 0.05, "actorder": True, "static_groups": True})
    grab = Grab()
    run(resolve_config(cfg), progress=False, model=model, tokenizer=tok, extra_plugins=[grab])
    rec = grab.records["model.layers.0.mlp.down_proj"]
    assert rec.g_idx is None and rec.float_columns[0].numel() == 8  # 5% of 160
    assert grab.records["model.layers.0.self_attn.q_proj"].float_columns[0].numel() == 3


class Doubler(Algorithm):
    """A recipe step that doubles up_proj's weight (to see what GPTQ calibrates on)."""

    def transform(self, block: Any, inputs: Any) -> None:
        block.module.mlp.up_proj.weight.data *= 2


def test_gptq_after_a_transform_sees_the_transformed_weights(
        tmp_path: Path, tiny_llama_dir: Path, shared_data: Path, tiny: Any) -> None:
    registry.register("llmcq.algorithms", AlgorithmSpec(name="doubler",
                                                        impl=f"{__name__}:Doubler"))
    try:
        model, tok = tiny
        original = copy.deepcopy(model.model.layers[0].mlp.up_proj.weight.data)
        cfg = config(tiny_llama_dir, shared_data, tmp_path / "out",
                     {"gptq": {"true_sequential": False}}, method=["doubler", "gptq"])
        grab = Grab()
        res = run(resolve_config(cfg), progress=False, model=model, tokenizer=tok,
                  extra_plugins=[grab])
        assert [s["quantizes"] for s in res["recipe"]] == [False, True]
        w_hat = grab.records["model.layers.0.mlp.up_proj"].dequantize()
        c = float((w_hat * original).sum() / original.square().sum())  # w_hat ~ c * W
        assert 1.8 < c < 2.2, c
    finally:
        registry.unregister("llmcq.algorithms", "doubler")


@pytest.mark.parametrize("special, weight, match", [
    ({"owq": True}, {}, "n_outs"),
    ({"owq": True, "n_outs": [1] * 7, "owq_ratio": 0.1}, {}, "exactly one"),
    ({"n_outs": [1] * 7}, {}, "owq: True"),
    ({"percdamp": -1}, {}, "percdamp"),
    ({"blocksize": 0}, {}, "blocksize"),
    ({"act_order": True}, {}, "act_order"),
    ({}, {"calib_algo": "learnable"}, "calib_algo"),
])
def test_config_errors(tmp_path: Path, tiny_llama_dir: Path, shared_data: Path,
                       special: dict[str, Any], weight: dict[str, Any], match: str) -> None:
    cfg = config(tiny_llama_dir, shared_data, tmp_path / "out", special)
    cfg["quant"]["weight"].update(weight)
    with pytest.raises(ConfigError, match=match):
        resolve_config(cfg)


def test_calibration_is_required(tmp_path: Path, tiny_llama_dir: Path,
                                 shared_data: Path) -> None:
    cfg = config(tiny_llama_dir, shared_data, tmp_path / "out")
    del cfg["calib"]
    with pytest.raises(ConfigError, match="calib"):
        resolve_config(cfg)
