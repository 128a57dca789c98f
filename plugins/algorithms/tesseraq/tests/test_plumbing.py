"""TesseraQ through ``run()`` on the tiny Llama (2 blocks, hidden 64, intermediate 160, GQA
4/2 heads): after the last stage every rounding variable is hard, the records hold exactly
the trained codes and tuned scales and the evaluated model computes with exactly their
dequantized weights; training lowers the block loss below round-to-nearest's; untrained
``[awq, tesseraq]`` is round-to-nearest of the weights clamped to AWQ's published ranges;
``[omniquant, tesseraq]`` clips with OmniQuant's; W4A4 trains with per-token activations.
(The trained ``[awq, tesseraq]`` recipe runs in test_two_step.py.)"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

import llmcq
from llmcq.config.loader import resolve_config
from llmcq.pipeline.runner import run
from llmcq.plugins import registry
from llmcq.quant.clip import apply_clip
from llmcq_tesseraq import solver
from llmcq_tesseraq.algorithm import TesseraQ

W2G24 = {"bit": 2, "symmetric": False, "granularity": "per_group", "group_size": 24}
W3SYM = {"bit": 3, "symmetric": True, "granularity": "per_channel"}
W4PC = {"bit": 4, "symmetric": False, "granularity": "per_channel"}
A4 = {"bit": 4, "symmetric": False, "granularity": "per_token", "ste": True}
SHORT = {"iterations": 6, "batch_size": 2, "lr": 0.01, "scale_lr": 0.005,
         "thresholds": [0.6, 0.3, 0.1], "weight_clip": False}


def _installed(name: str) -> bool:
    return name in [i.name for i in registry.discover("llmcq.algorithms")]


def _cfg(model: Path, data: Path, save: Path, special: dict[str, Any], *,
         method: Any = "tesseraq", weight: dict[str, Any] | None = None,
         act: dict[str, Any] | None = None, quant_out: bool = True) -> dict[str, Any]:
    q: dict[str, Any] = {"method": method, "weight": weight or W2G24, "special": special,
                         "quant_out": quant_out}
    if act is not None:
        q["act"] = act
    return {
        "base": {"seed": 0, "device": "cpu"},
        "model": {"type": "llama", "path": str(model)},
        "calib": {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                  "n_samples": 6, "seq_len": 32, "preproc": "wikitext2_gptq", "bs": 1,
                  "seed": 1},
        "eval": {"eval_pos": [], "name": "wikitext2",
                 "path": str(data / "wikitext2" / "test.txt"), "seq_len": 32,
                 "num_samples": 2},
        "quant": q,
        "save": {"save_path": str(save)},
    }


class _Spy:
    """The run's records and its recipe step's summary."""

    def __init__(self) -> None:
        self.records: dict[str, Any] = {}
        self.artefacts: Any = None

    @llmcq.hookimpl
    def llmcq_evaluate(self, run: Any) -> list:
        self.records = dict(run.records)
        self.artefacts = run.artefacts
        return []


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """The tiny blocks train faster on one thread than on two threads fighting over the
    cores (with each other and with other jobs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path) -> tuple[Any, Any]:
    from llmcq.model.loading import ModelSource, load_pretrained

    return load_pretrained(ModelSource(tiny_llama_dir))


def _run(cfg: dict[str, Any], model: Any, tok: Any) -> tuple[_Spy, dict[str, Any]]:
    spy = _Spy()
    cfg = copy.deepcopy(cfg)
    cfg["eval"]["eval_pos"] = ["fake_quant"]  # so the spy sees the records
    res = run(resolve_config(cfg), progress=False, model=model, tokenizer=tok,
              extra_plugins=[spy])
    return spy, res


def _capture(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Each linear's trained rounding (full name -> (LinearRounding, its state at the end of
    the last stage, its weight as the training saw it: clipped)), filled in as the run
    goes."""
    seen: dict[str, Any] = {}
    train = TesseraQ._train

    def spy(self: TesseraQ, block: Any, inputs: Any, targets: Any, state: Any,
            act: Any) -> None:
        weights = {n: lin.weight.data.clone() for n, lin in block.linears().items()}
        train(self, block, inputs, targets, state, act)
        seen.update({block.full_name(n): (t, t.state, weights[n]) for n, t in state.items()})

    monkeypatch.setattr(TesseraQ, "_train", spy)
    return seen


@pytest.mark.parametrize("weight", [W2G24, W3SYM], ids=["w2-asym-g24-partial", "w3-sym-pc"])
def test_hard_rounding_records_and_model_are_the_trained_ones(
        weight: dict[str, Any], tmp_path: Path, tiny_llama_dir: Path, shared_data: Path,
        tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    trained = _capture(monkeypatch)
    model = copy.deepcopy(tiny[0])
    out, res = _run(_cfg(tiny_llama_dir, shared_data, tmp_path, SHORT, weight=weight),
                    model, tiny[1])
    assert set(trained) == set(out.records) and len(trained) == 14
    spec = resolve_config(_cfg(tiny_llama_dir, shared_data, tmp_path / "spec", SHORT,
                               weight=weight)).specs.weight
    modules = dict(model.named_modules())
    last = SHORT["thresholds"][-1]
    for name, (t, stage_end, _w) in trained.items():
        rec = out.records[name]
        # the last stage left about `last` of the variables soft (llmc's quantile rule)
        n = stage_end.numel()
        assert abs(solver.hard_share(stage_end) - (1 - last)) <= 2 / n, name
        h = solver.final_rounding(t.r, stage_end)
        assert set(h.unique().tolist()) <= {0.0, 1.0}, name  # every variable hard
        # the record's codes are floor(W / s) + h + z, clamped; its scales the tuned ones
        assert torch.equal(rec.qweight.float(), solver.codes(t.base, h, t.zero, spec)), name
        assert torch.equal(rec.scale, solver.effective_scale(t.scale, t.nu)), name
        assert not torch.equal(rec.scale, t.scale), name  # the scales were tuned
        assert rec.problems() == [], name
        # the training forward with hard rounding is exactly the record's weight, and it is
        # the weight the evaluated (fake-quantized) model computes with
        t.state = h.to(torch.int8)
        assert torch.equal(t.weight(spec), rec.dequantize()), name
        assert torch.equal(modules[name].weight.data, rec.dequantize()), name
    summary = res["recipe"][0]
    assert summary["thresholds"] == SHORT["thresholds"]
    assert all(0 < c < 0.5 for c in summary["change_ratio"]), summary
    # on the calibration samples the learned rounding and scales beat round to nearest
    losses = summary["block_loss"]
    assert len(losses) == 2 and all(after < 0.9 * before for before, after in losses), losses


@pytest.mark.skipif(not _installed("awq"), reason="the awq plugin is not installed")
def test_awq_then_tesseraq_clips_with_awqs_ranges(tmp_path: Path, tiny_llama_dir: Path,
                                                  shared_data: Path,
                                                  tiny: tuple[Any, Any]) -> None:
    """Untrained, ``[awq (v2 clips), tesseraq (v2)]`` gives round-to-nearest of the
    AWQ-scaled weights clamped to AWQ's ranges: what AWQ alone with clip_version v1 (clamp)
    then core's round-to-nearest gives."""
    awq = {"trans": True, "trans_version": "v2", "weight_clip": True, "n_grid": 3}
    untrained = {**SHORT, "iterations": 0, "optimize_scale": False, "weight_clip": True,
                 "clip_version": "v2"}
    learn = {**W2G24, "calib_algo": "learnable"}
    recipe, _ = _run(_cfg(tiny_llama_dir, shared_data, tmp_path / "r", {
        "awq": {**awq, "clip_version": "v2"}, "tesseraq": untrained},
        method=["awq", "tesseraq"], weight=learn), copy.deepcopy(tiny[0]), tiny[1])
    alone, _ = _run(_cfg(tiny_llama_dir, shared_data, tmp_path / "a", {**awq,
                         "clip_version": "v1"}, method="awq"), copy.deepcopy(tiny[0]), tiny[1])
    assert set(recipe.records) == set(alone.records) and len(alone.records) == 14
    for name, a in alone.records.items():
        b = recipe.records[name]
        assert torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero), name
        assert torch.equal(a.qweight, b.qweight), name
    assert recipe.artefacts.get("clips", producer="awq")


@pytest.mark.skipif(not _installed("omniquant"), reason="the omniquant plugin is not installed")
def test_omniquant_then_tesseraq_reads_omniquants_clips(
        tmp_path: Path, tiny_llama_dir: Path, shared_data: Path, tiny: tuple[Any, Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    trained = _capture(monkeypatch)
    learn = {**W2G24, "calib_algo": "learnable", "ste": True}
    spy, res = _run(_cfg(tiny_llama_dir, shared_data, tmp_path, {
        "omniquant": {"epochs": 1, "lwc": True, "lwc_lr": 0.05},
        "tesseraq": {**SHORT, "weight_clip": True, "clip_version": "v2"}},
        method=["omniquant", "tesseraq"], weight=learn), copy.deepcopy(tiny[0]), tiny[1])
    clips = spy.artefacts.get("clips", producer="omniquant")
    assert len(clips) == 14 and len(spy.records) == 14
    spec = resolve_config(_cfg(tiny_llama_dir, shared_data, tmp_path / "spec",
                               SHORT)).specs.weight
    binding = 0
    for name, (t, _end, w) in trained.items():
        scale, zero = solver.grid_qparams(w, spec)
        if ".q_proj" in name or ".k_proj" in name:  # queries and keys keep min-max (llmc)
            assert torch.equal(scale, t.scale) and torch.equal(zero, t.zero), name
            continue
        # the grid is min-max of the weight clamped to OmniQuant's published range (OmniQuant
        # clamped it already: the published range is its learned one, not shrunk again)
        lo, hi = clips[name]
        clipped = apply_clip(w, lo, hi, spec)
        cscale, czero = solver.grid_qparams(clipped, spec)
        assert torch.equal(cscale, t.scale) and torch.equal(czero, t.zero), name
        assert torch.equal(cscale, scale), name
        # ... and narrower than the float weight's: OmniQuant's learned clipping took effect
        float_w = tiny[0].get_submodule(name).weight.data
        fscale, _ = solver.grid_qparams(float_w, spec)
        binding += int(not torch.equal(fscale, t.scale))
    assert binding > 0
    assert len(res["recipe"][1]["block_loss"]) == 2


def test_w4a4_trains_with_per_token_activations(tmp_path: Path, tiny_llama_dir: Path,
                                                shared_data: Path,
                                                tiny: tuple[Any, Any]) -> None:
    spy, res = _run(_cfg(tiny_llama_dir, shared_data, tmp_path, {**SHORT, "iterations": 8},
                         weight=W4PC, act=A4), copy.deepcopy(tiny[0]), tiny[1])
    assert all(r.act is not None and r.act.bits == 4 for r in spy.records.values())
    # the block loss with the learned rounding and scales below round-to-nearest's
    losses = res["recipe"][0]["block_loss"]
    assert len(losses) == 2 and all(b < 0.9 * a for a, b in losses), losses
