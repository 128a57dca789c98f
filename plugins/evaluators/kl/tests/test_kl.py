"""eval.type kl: the maths against torch, float vs itself, ordering by bit width, the
pipeline entries next to ppl, and config-time refusals."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.runner import run
from llmcq_kl.evaluate import FloatReference, compare, windows
from llmcq_kl.solver import HIST_EDGES, histogram, stored_log_probs, summarize, token_kl
from torch.nn import functional as F


def test_token_kl_is_torch_kl_div() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 7, 50, generator=g) * 3, torch.randn(3, 7, 50, generator=g) * 3
    ours = token_kl(stored_log_probs(a), stored_log_probs(b))
    # the same float16-rounded distributions, through torch's own KL
    lp = torch.log_softmax(stored_log_probs(a).float(), -1)
    lq = torch.log_softmax(stored_log_probs(b).float(), -1)
    ref = F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    # and the float32 KL, up to the float16 storage
    exact = F.kl_div(torch.log_softmax(b, -1), torch.log_softmax(a, -1), log_target=True,
                     reduction="none").sum(-1)
    assert float((ours - exact).abs().max()) < 1e-2 * float(exact.mean())
    assert torch.equal(token_kl(stored_log_probs(a), stored_log_probs(a)), torch.zeros(3, 7))


def test_summary_and_histogram() -> None:
    kl = np.random.default_rng(0).exponential(1e-3, size=10_001)
    top1 = np.arange(10_001) % 4 != 0
    s = summarize(kl, top1)
    assert s["kl_mean"] == pytest.approx(kl.mean())
    assert s["kl_median"] == pytest.approx(np.sort(kl)[5000])
    assert s["kl_p99"] == pytest.approx(np.sort(kl)[9900])
    assert s["top1"] == pytest.approx(top1.mean())
    h = histogram(np.concatenate([kl, [0.0, 5e3]]))
    assert sum(h["counts"]) == kl.size + 2 and h["edges"] == HIST_EDGES
    assert h["counts"][0] >= 1 and h["counts"][-1] == 1
    inside = (kl >= HIST_EDGES[30]) & (kl < HIST_EDGES[31])
    assert h["counts"][30] == int(inside.sum())


def _config(model: Path, data: Path, save: Path, bit: int | None,
            eval_pos: list[str]) -> dict[str, Any]:
    ev = {"name": "wikitext2", "path": str(data / "wikitext2" / "test.txt"), "seq_len": 64,
          "bs": 2, "num_samples": 5, "eval_pos": eval_pos}
    cfg: dict[str, Any] = {
        "base": {"seed": 0, "device": "cpu"},
        "model": {"type": "llama", "path": str(model)},
        "eval": [{**ev, "type": "ppl"}, {**ev, "type": "kl"}],
        "save": {"save_path": str(save)},
    }
    if bit is not None:
        cfg["quant"] = {"method": "rtn", "weight": {"bit": bit, "symmetric": False,
                                                    "granularity": "per_group",
                                                    "group_size": 16}}
    return cfg


def test_pipeline_kl_next_to_ppl_and_equals_torch(tmp_path: Path, tiny_llama_dir: Path,
                                                  shared_data: Path) -> None:
    model, tok = load_pretrained(ModelSource(tiny_llama_dir))
    float_model = copy.deepcopy(model)
    cfg = _config(tiny_llama_dir, shared_data, tmp_path / "w3", 3, ["pretrain", "fake_quant"])
    res = run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
    pre, fq = res["eval"]["pretrain"]["wikitext2"], res["eval"]["fake_quant"]["wikitext2"]
    assert pre["kl_mean"] == 0.0 and pre["kl_p99"] == 0.0 and pre["top1"] == 1.0
    assert "ppl" in fq and fq["tokens"] == 5 * 64
    assert sum(fq["kl_hist"]["counts"]) == fq["tokens"]
    assert fq["kl_mean"] > 0 and fq["top1"] < 1.0
    # direct float32 torch computation on the same windows
    wins = _run_windows(shared_data, tok)
    with torch.no_grad():
        lp = torch.log_softmax(float_model(input_ids=wins).logits.float(), -1)
        lq = torch.log_softmax(model(input_ids=wins).logits.float(), -1)
    kl = F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1).reshape(-1).numpy()
    top1 = (lp.argmax(-1) == lq.argmax(-1)).float().mean().item()
    assert fq["kl_mean"] == pytest.approx(kl.mean(), rel=2e-2)
    assert fq["kl_median"] == pytest.approx(np.median(kl), rel=5e-2)
    assert fq["top1"] == pytest.approx(top1, abs=2 / kl.size)


def _run_windows(data: Path, tok: Any) -> torch.Tensor:
    """The windows the run scores (the dataset's own evaluation ids)."""
    from llmcq.data.datasets import WIKITEXT2

    ids = WIKITEXT2.evaluation_ids(tok, str(data / "wikitext2" / "test.txt"), 64)
    return windows(ids, 64, 5)


def test_kl_orders_bit_widths(tmp_path: Path, tiny_llama_dir: Path, shared_data: Path) -> None:
    base, tok = load_pretrained(ModelSource(tiny_llama_dir))
    wins = _run_windows(shared_data, tok)
    _kl, _t, ref = compare(base, wins, None, bs=5, device=torch.device("cpu"), record=True)
    got = {}
    for bit in (8, 4, 3):
        model = copy.deepcopy(base)
        cfg = _config(tiny_llama_dir, shared_data, tmp_path / f"w{bit}", bit, ["pretrain"])
        cfg["eval"] = cfg["eval"][:1]
        run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
        kl, top1, _ = compare(model, wins, ref, bs=5, device=torch.device("cpu"))
        got[bit] = summarize(kl, top1)
    ref.close()
    assert got[8]["kl_mean"] < got[4]["kl_mean"] < got[3]["kl_mean"]
    assert got[8]["top1"] >= got[4]["top1"] >= got[3]["top1"]


def test_float_reference_on_disk_round_trips() -> None:
    ref = FloatReference(2, 3, 5)
    x = stored_log_probs(torch.randn(2, 3, 5))
    ref.write(0, x)
    assert torch.equal(ref.read(0, 2), x)
    folder = ref.dir
    ref.close()
    assert not folder.exists()


@pytest.mark.parametrize("change,field", [
    ({"eval_pos": ["fake_quant"]}, "eval.eval_pos"),
    ({"num_samples": None}, "eval.num_samples"),
    ({"inference_per_block": True}, "eval.inference_per_block"),
])
def test_config_refusals(tmp_path: Path, tiny_llama_dir: Path, shared_data: Path,
                         change: dict[str, Any], field: str) -> None:
    cfg = _config(tiny_llama_dir, shared_data, tmp_path / "x", 4, ["pretrain", "fake_quant"])
    cfg["eval"] = {**cfg["eval"][1], **change}
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg)
    assert field in str(err.value)
