"""SliM-LLM's plumbing on the tiny Llama: whole runs whose mean width is exactly the budget,
the KL search against brute force, a fixed k, and the allocation file (ours and the
reference's format) reproducing a run's records."""

from __future__ import annotations

import copy
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import llmcq
from llmcq.config.loader import resolve_config
from llmcq.errors import DataError
from llmcq.model.adapter import resolve_block
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.blockwise import Block, capture_block_inputs
from llmcq.pipeline.runner import run
from llmcq.plugins import registry
from llmcq.quant.qparams import fake_quantize_weight
from llmcq.quant.spec import PerGroup, WeightQuantSpec
from llmcq_slimllm import SliMLLMSpecial
from llmcq_slimllm.algorithm import SliMLLM
from llmcq_slimllm.solver import (
    allocate,
    binarize_qparams,
    cholesky_diagonal,
    group_salience,
    search_ks,
)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path) -> tuple[Any, Any]:
    return load_pretrained(ModelSource(tiny_llama_dir))


class Capture:
    """Keeps every block's records (a wrapper around the quantize stage)."""

    def __init__(self) -> None:
        self.records: dict[str, Any] = {}

    @llmcq.hookimpl(wrapper=True)
    def llmcq_quantize(self, run: Any, step: Any, block: Any, inputs: Any) -> Any:
        out = yield
        self.records.update({block.full_name(n): r for n, r in (out or {}).items()})
        return out


def slim_run(tiny: tuple[Any, Any], save: Path, *, bits: int, group: int,
             extra: dict[str, Any] | None = None, **special: Any
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    model, tok = tiny
    cfg = {"base": {"seed": 0, "device": "cpu"}, "model": {"type": "llama"},
           "calib": {"name": "random", "n_samples": 4, "seq_len": 48, "bs": 2, "seed": 3},
           "quant": {"method": "SliMLLM", "special": special, "quant_out": True,
                     "weight": {"bit": bits, "symmetric": False, "granularity": "per_group",
                                "group_size": group}},
           "save": {"save_path": str(save)}, **(extra or {})}
    if "mix_bits" in cfg:
        cfg["quant"]["mix_bits"] = cfg.pop("mix_bits")
    cap = Capture()
    res = run(resolve_config(cfg), progress=False, model=copy.deepcopy(model), tokenizer=tok,
              extra_plugins=[cap])
    return res, cap.records


def column_mean(widths: torch.Tensor, in_features: int, g: int) -> Fraction:
    cols = [min(g, in_features - g * i) for i in range(widths.numel())]
    pairs = zip(widths.tolist(), cols, strict=True)
    return Fraction(sum(int(b) * c for b, c in pairs), in_features)


@pytest.mark.parametrize(("bits", "group", "special"), [
    (2, 8, {}), (3, 24, {}), (2, 8, {"actorder": True, "static_groups": True})])
def test_mean_width_is_exactly_the_budget(tiny: tuple[Any, Any], tmp_path: Path, bits: int,
                                          group: int, special: dict[str, Any]) -> None:
    res, records = slim_run(tiny, tmp_path / "out", bits=bits, group=group, **special)
    assert res["compression"]["weight_bits_mean"] == bits  # exactly, not approximately
    assert len(records) == 14
    mixed = 0
    for name, rec in records.items():
        gb = rec.group_bits
        assert gb is not None and bool((gb == gb[:1]).all()), name  # one width per group
        widths = gb[0]
        assert column_mean(widths, rec.in_features, group) == bits, name  # SBA keeps the mean
        assert int((widths == bits + 1).sum()) == int((widths == bits - 1).sum()), name
        if rec.in_features % group:
            assert int(widths[-1]) == bits, name  # a partial group stays at the budget
        assert rec.problems() == [] and rec.g_idx is None, name
        mixed += rec.mixed_bits
    assert mixed == 14  # the search tries k >= 1 only, as the reference
    summary = res["recipe"][0]
    assert summary["method"] == "slimllm" and sum(summary["k_per_linear"].values()) == 14
    assert not summary["rtn_fallbacks"] and not summary["uncalibrated_linears"]


def test_each_linear_on_its_own_grid_with_mix_bits(tiny: tuple[Any, Any],
                                                   tmp_path: Path) -> None:
    """llmc's mix_bits and ignored_layers: down_proj of block 1 at a 3-bit budget (groups of
    16), o_proj of block 0 kept in float; the rest at 2 bits, groups of 8."""
    mix = {"mix_bits": {"setting_0": {"layer_name": ["down_proj#1"], "weight": {
        "bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 16}}},
        "ignored_layers": {"block_ids": [0], "layer_names": ["self_attn.o_proj"]}}
    res, records = slim_run(tiny, tmp_path / "out", bits=2, group=8, extra=mix)
    assert "model.layers.0.self_attn.o_proj" not in records and len(records) == 13
    down = records["model.layers.1.mlp.down_proj"]
    assert down.weight.bits == 3 and down.group_bits.shape == (64, 10)
    assert column_mean(down.group_bits[0], 160, 16) == 3 and down.mixed_bits
    for name, rec in records.items():
        if name != "model.layers.1.mlp.down_proj":
            assert rec.weight.bits == 2 and column_mean(rec.group_bits[0], rec.in_features,
                                                        8) == 2, name
    n = {name: rec.out_features * rec.in_features for name, rec in records.items()}
    mean = Fraction(sum(v * (3 if "1.mlp.down" in k else 2) for k, v in n.items()), sum(n.values()))
    assert Fraction(res["compression"]["weight_bits_mean"]).limit_denominator(10**6) == mean


def test_allocation_file_round_trip(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    path = tmp_path / "alloc" / "w2g8.pt"
    first, rec1 = slim_run(tiny, tmp_path / "a", bits=2, group=8, save_allocation=str(path))
    assert first["recipe"][0]["allocation_written"] == str(path)
    saved = torch.load(path, weights_only=True)
    assert sorted(saved) == [0, 1] and all(isinstance(b, int) for b in saved)
    for name, rec in rec1.items():  # the file holds the records' widths
        block, rel = int(name.split(".")[2]), ".".join(name.split(".")[3:])
        assert saved[block][rel] == rec.group_bits[0].tolist(), name
    second, rec2 = slim_run(tiny, tmp_path / "b", bits=2, group=8,
                            allocation_path=str(path))
    assert second["recipe"][0]["allocation_loaded"] == str(path)
    assert second["recipe"][0]["k_per_linear"] == {}  # no search ran
    assert rec1.keys() == rec2.keys()
    for name in rec1:
        a, b = rec1[name], rec2[name]
        for field in ("qweight", "scale", "zero", "group_bits"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (name, field)
    assert second["eval"] == first["eval"]


def reference_file(tiny: tuple[Any, Any], path: Path, bits: int, g: int) -> dict:
    """A file in the reference's layout, written as its run.py does (torch.save of
    {layer index: {name: [bits per group]}}), with a pattern SBA would not choose."""
    model, _ = tiny
    out: dict[int, dict[str, list[int]]] = {}
    for i, layer in enumerate(model.model.layers):
        out[i] = {}
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                G = mod.in_features // g
                widths = [bits] * G
                widths[i % G], widths[(i + 1) % G] = bits + 1, bits - 1
                out[i][name] = widths
    torch.save(out, path)
    return out


def test_reads_the_reference_format(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    ref = reference_file(tiny, tmp_path / "llama.pt", 3, 16)
    res, records = slim_run(tiny, tmp_path / "out", bits=3, group=16,
                            allocation_path=str(tmp_path / "llama.pt"))
    assert res["compression"]["weight_bits_mean"] == 3
    for name, rec in records.items():
        block, rel = int(name.split(".")[2]), ".".join(name.split(".")[3:])
        assert rec.group_bits[0].tolist() == ref[block][rel], name


def test_bad_allocation_files_name_the_file_and_the_linear(tiny: tuple[Any, Any],
                                                           tmp_path: Path) -> None:
    ref = reference_file(tiny, tmp_path / "llama.pt", 3, 16)
    ref[1]["mlp.down_proj"][0] = 4  # the mean is no longer 3
    torch.save(ref, tmp_path / "bad_mean.pt")
    with pytest.raises(DataError, match=r"bad_mean\.pt: block 1 mlp\.down_proj: mean width"):
        slim_run(tiny, tmp_path / "o1", bits=3, group=16,
                 allocation_path=str(tmp_path / "bad_mean.pt"))
    with pytest.raises(DataError, match=r"group_size 8 gives 8 for 64 input columns"):
        slim_run(tiny, tmp_path / "o2", bits=3, group=8,
                 allocation_path=str(tmp_path / "llama.pt"))
    with pytest.raises(DataError, match="does not exist"):
        slim_run(tiny, tmp_path / "o3", bits=3, group=16,
                 allocation_path=str(tmp_path / "missing.pt"))


# ---------------------------------------------------------------------- one block, direct


SPEC = WeightQuantSpec(bits=2, symmetric=False, granularity=PerGroup(8))


@pytest.fixture
def block0(tiny: tuple[Any, Any]) -> tuple[Block, Any, Any]:
    model, _ = tiny
    mspec, _ = registry.load_spec("llmcq.models", "llama", field="model.type")
    adapter = mspec.load_impl()(mspec)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 500, (2, 32), generator=g) for _ in range(3)]
    inputs = capture_block_inputs(model, adapter, batches, torch.device("cpu"))
    module = adapter.blocks(model)[0]
    block = Block(0, "model.layers.0", module,
                  resolve_block(module, adapter.block_layout(model, 0), where="model.layers.0"))
    return block, inputs, SimpleNamespace(adapter=adapter, model=model)


def driver(ctx: Any, **special: Any) -> SliMLLM:
    run_ctx = SimpleNamespace(weight=SPEC, act=None, adapter=ctx.adapter, model=ctx.model,
                              resolved=SimpleNamespace(overwrite=False))
    return SliMLLM(run=run_ctx, step=SimpleNamespace(special=SliMLLMSpecial(**special)))


def q_proj_inputs(block: Block, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Every input row q_proj sees on the float block, and its Hessian (brute force)."""
    lin = block.groups[0].linears["self_attn.q_proj"]
    xs: list[torch.Tensor] = []
    h = lin.register_forward_hook(lambda _m, a, _o: xs.append(a[0].reshape(-1, 64).double()))
    try:
        inputs.forward(block.module)
    finally:
        h.remove()
    x = torch.cat(xs)
    return x, (2 * x.T @ x / x.shape[0]).float()


def rtn_widths(W: torch.Tensor, widths: torch.Tensor, g: int) -> torch.Tensor:
    """Round to nearest, group by group, each at its width (one bit: binarized)."""
    out = torch.empty_like(W)
    for gi, b in enumerate(widths.tolist()):
        cols = W[:, gi * g:(gi + 1) * g]
        if b == 1:
            s, z = binarize_qparams(cols)
            out[:, gi * g:(gi + 1) * g] = ((cols / s + z).round().clamp(0, 1) - z) * s
        else:
            out[:, gi * g:(gi + 1) * g] = fake_quantize_weight(
                cols, replace(SPEC, bits=b, granularity=PerGroup(g)))
    return out


def test_search_picks_the_k_of_least_output_kl(block0: tuple[Block, Any, Any]) -> None:
    block, inputs, ctx = block0
    algo = driver(ctx)
    algo.calibrate(block, inputs)
    records = algo.quantize(block, inputs)
    W = block.groups[0].linears["self_attn.q_proj"].weight.data.double()
    x, H = q_proj_inputs(block, inputs)
    salience = group_salience(W, cholesky_diagonal(H, 0.01, 4).double(), 8)
    kls = []
    for k in search_ks(8):  # 8 groups: k = 1, 2, 3
        Wk = rtn_widths(W, allocate(salience, k, 2, 8), 8)
        log_p, log_q = torch.log_softmax(x @ W.T, -1), torch.log_softmax(x @ Wk.T, -1)
        kls.append(float((log_q.exp() * (log_q - log_p)).sum()))
    best = search_ks(8)[kls.index(min(kls))]
    assert sorted(kls)[1] > min(kls) * 1.001  # a clear winner, so float noise cannot flip it
    got = records["self_attn.q_proj"].group_bits[0]
    assert torch.equal(got, allocate(salience, best, 2, 8))
    assert algo.allocation[0]["self_attn.q_proj"] == got.tolist()


def test_fixed_k_moves_the_most_and_least_salient_groups(block0: tuple[Block, Any, Any]
                                                         ) -> None:
    block, inputs, ctx = block0
    algo = driver(ctx, salient_block=2, nonsalient_block=2)
    algo.calibrate(block, inputs)
    records = algo.quantize(block, inputs)
    W = block.groups[0].linears["self_attn.q_proj"].weight.data
    _, H = q_proj_inputs(block, inputs)
    salience = group_salience(W, cholesky_diagonal(H, 0.01, 4), 8)
    widths = records["self_attn.q_proj"].group_bits[0]
    order = torch.argsort(salience).tolist()
    assert sorted(widths[order[-2:]].tolist()) == [3, 3]
    assert sorted(widths[order[:2]].tolist()) == [1, 1]
    assert widths[order[2:-2]].tolist() == [2] * 4
    assert algo.summary()["k_per_linear"] == {"2": 7}
