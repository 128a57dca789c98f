"""ABQ-LLM through ``run()`` on the tiny Llama (2 blocks, hidden 64, GQA 4/2 heads): the block
loss decreases, the exported fake-quant model reproduces the evaluated one, the compensation
fold is exact, and the attention probe's float map is transformers' eager attention."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.func import functional_call

import llmcq
from llmcq.config.loader import resolve_config
from llmcq.model.adapter import resolve_block
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.blockwise import Block, capture_block_inputs
from llmcq.pipeline.runner import run
from llmcq_abq import solver
from llmcq_abq.algorithm import ABQ, AttentionProbe
from llmcq_llama.adapter import LlamaAdapter

W4A4 = ({"bit": 4, "symmetric": False, "granularity": "per_channel",
         "calib_algo": "learnable", "ste": True},
        {"bit": 4, "symmetric": False, "granularity": "per_token", "ste": True})


def _cfg(model: Path, data: Path, save: Path, special: dict[str, Any]) -> dict[str, Any]:
    weight, act = W4A4
    return {
        "base": {"seed": 0, "device": "cpu"},
        "model": {"type": "llama", "path": str(model)},
        "calib": {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                  "n_samples": 8, "seq_len": 64, "preproc": "wikitext2_gptq", "bs": 2,
                  "seed": 1},
        "eval": {"eval_pos": [], "name": "wikitext2",
                 "path": str(data / "wikitext2" / "test.txt"), "seq_len": 64, "bs": 2,
                 "num_samples": 4},
        "quant": {"method": "ABQLLM", "weight": weight, "act": act, "special": special,
                  "quant_out": True},
        "save": {"save_path": str(save)},
    }


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path) -> tuple[Any, Any]:
    return load_pretrained(ModelSource(tiny_llama_dir))


def _block(model: Any, i: int) -> Block:
    adapter = LlamaAdapter()
    module = adapter.blocks(model)[i]
    return Block(i, f"model.layers.{i}", module,
                 resolve_block(module, adapter.block_layout(model, i),
                               where=f"model.layers.{i}"))


def _ids(n: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 500, (n, length), generator=torch.Generator().manual_seed(7))


def test_w4a4_run_loss_decreases_and_export_reproduces_the_evaluated_model(
        tmp_path: Path, tiny_llama_dir: Path, shared_data: Path,
        tiny: tuple[Any, Any]) -> None:
    from llmcq_fake import load_fake_quant

    model, tok = tiny
    m = copy.deepcopy(model)
    cfg = _cfg(tiny_llama_dir, shared_data, tmp_path / "out",
               {"epochs": 4, "lwc_lr": 0.05, "let_lr": 0.01, "alpha": 0.75})
    cfg["save"].update({"save_fake": True})
    res = run(resolve_config(cfg), progress=False, model=m, tokenizer=tok)
    step = res["recipe"][0]
    losses = step["block_loss"]
    assert len(losses) == 2 and all(last < first for first, last in losses), losses
    assert step["compensated_blocks"] == [0, 1]  # 2 blocks: all of them are first 3
    assert len(step["attn_kl"]) == 2 and all(v > 0 for v in step["attn_kl"])
    assert step["let_sites"][-1] == "mlp.up_proj -> mlp.down_proj"
    # the records are what the run evaluated: the exported fake-quant model has its logits
    fake = load_fake_quant(tmp_path / "out" / "fake_quant_model")
    x = _ids()
    with torch.no_grad():
        assert torch.equal(fake(input_ids=x).logits, m(input_ids=x).logits)


def test_compensation_and_attention_loss_switch_off(
        tmp_path: Path, tiny_llama_dir: Path, shared_data: Path,
        tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    m = copy.deepcopy(model)
    res = run(resolve_config(_cfg(tiny_llama_dir, shared_data, tmp_path / "o",
                                  {"epochs": 1, "compensation_layers": [0, 0],
                                   "attn_loss": False, "aug_loss": False})),
              progress=False, model=m, tokenizer=tok)
    step = res["recipe"][0]
    assert step["compensated_blocks"] == [] and step["attn_kl"] == []


def test_compensation_fold_is_exact(tiny: tuple[Any, Any]) -> None:
    model, _ = tiny
    m = copy.deepcopy(model)
    block = _block(m, 0)
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(3))
    inputs = capture_block_inputs(m, LlamaAdapter(), [_ids(2, 12)], torch.device("cpu"))
    kw = inputs.kwargs[0]
    down = block.linears()["mlp.down_proj"]
    a = torch.randn(down.out_features, 1, generator=torch.Generator().manual_seed(4))
    b = torch.randn(1, down.in_features, generator=torch.Generator().manual_seed(5))
    params = {n: p.detach() for n, p in block.module.named_parameters()}
    params["mlp.down_proj.weight"] = solver.compensated(params["mlp.down_proj.weight"], a, b)
    with torch.no_grad():
        trained = functional_call(block.module, params, (x,), kw)[0]
        ABQ.after_fold(SimpleNamespace(_comp={0: {"mlp.down_proj": (a, b)}}, _comp_done=[]),
                       block, {})
        folded = block.module(x, **kw)[0]
    assert torch.equal(trained, folded)


def test_attention_probe_float_map_is_transformers_eager_attention(
        tiny: tuple[Any, Any]) -> None:
    model, _ = tiny
    m = copy.deepcopy(model)
    ids = _ids(2, 16)
    inputs = capture_block_inputs(m, LlamaAdapter(), [ids], torch.device("cpu"))
    block = _block(m, 0)
    probe = AttentionProbe(block, (4, 2), {n: p.detach().float()
                                           for n, p in block.module.named_parameters()})
    got = probe.float_map(inputs.hidden[0], inputs.kwargs[0])
    m.set_attn_implementation("eager")
    with torch.no_grad():
        want = m(input_ids=ids, output_attentions=True).attentions[0].mean(dim=1)
    assert got.shape == want.shape == (2, 16, 16)
    assert torch.allclose(got, want.float(), atol=1e-6)


class _Records:
    """Keeps the run's records (read at evaluation)."""

    def __init__(self) -> None:
        self.records: dict[str, Any] = {}

    @llmcq.hookimpl
    def llmcq_evaluate(self, run: Any) -> list:
        self.records = dict(run.records)
        return []


def test_bit_balance_records_have_five_levels_and_log2_5_bits(
        tmp_path: Path, tiny_llama_dir: Path, shared_data: Path,
        tiny: tuple[Any, Any]) -> None:
    from llmcq_fake import load_fake_quant

    model, tok = tiny
    m = copy.deepcopy(model)
    cfg = _cfg(tiny_llama_dir, shared_data, tmp_path / "bb",
               {"epochs": 1, "bit_balance": True, "attn_loss": False})
    cfg["quant"]["weight"] = {"bit": 2, "symmetric": False, "granularity": "per_group",
                              "group_size": 16, "calib_algo": "learnable", "ste": True}
    del cfg["quant"]["act"]
    cfg["eval"]["eval_pos"] = ["fake_quant"]
    cfg["eval"]["num_samples"] = 1
    cfg["save"]["save_fake"] = True
    spy = _Records()
    res = run(resolve_config(cfg), progress=False, model=m, tokenizer=tok, extra_plugins=[spy])
    assert len(spy.records) == 14
    for name, rec in spy.records.items():
        assert rec.levels == 5 and rec.features() == ["grid_levels"] and not rec.problems()
        assert int(rec.qweight.max()) == 4, name  # the fifth level is used
        # the evaluated weight is the record's
        lin = m.get_submodule(name)
        assert torch.equal(lin.weight.float(), rec.dequantize().to(lin.weight.dtype).float())
    assert res["compression"]["weight_bits_mean"] == pytest.approx(math.log2(5), abs=1e-6)
    fake = load_fake_quant(tmp_path / "bb" / "fake_quant_model")
    x = _ids()
    with torch.no_grad():
        assert torch.equal(fake(input_ids=x).logits, m(input_ids=x).logits)
