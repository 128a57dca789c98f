"""The fake-quant checkpoint (``save_fake``): every record feature the backend accepts is
reproduced by ``load_fake_quant`` and named in ``llmcq_quant.json``; the exported
``config.json`` keeps the checkpoint's ``use_cache`` (issue 13 §12: it used to say false).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from llmcq.config.loader import resolve_config
from llmcq.errors import PluginError
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.runner import run
from llmcq.quant.fake import FakeQuantLinear, set_module
from llmcq.quant.record import QuantizedLinear, QuantizedScales, SparseOutliers
from llmcq.quant.spec import ActQuantSpec, PerGroup, PerTensor, WeightQuantSpec
from llmcq.quant.transform import MatrixTransform
from llmcq.sparsity import NM
from llmcq.sparsity.masks import nm_mask
from llmcq_fake import SPEC, load_fake_quant
from llmcq_fake.export import META_FILE, export

G = 16  # group width of the hand-made records (the tiny Llama's widths are multiples)


def _codes_in_grid(rec_bits: torch.Tensor, out: int, n_in: int, symmetric: bool,
                   gen: torch.Generator) -> torch.Tensor:
    """Random codes, each on its own group's grid (``rec_bits`` ``[out, G]``)."""
    bits = rec_bits.repeat_interleave(G, dim=1)[:, :n_in].long()
    lo = -(1 << (bits - 1)) if symmetric else torch.zeros_like(bits)
    hi = (1 << (bits - 1)) - 1 if symmetric else (1 << bits) - 1
    u = torch.rand(out, n_in, generator=gen)
    return (lo + (u * (hi - lo + 1).float()).floor().long().clamp(max=hi - lo)).to(torch.int8)


def _record(lin: torch.nn.Linear, kind: str, gen: torch.Generator) -> QuantizedLinear:
    """A record of ``lin``'s shape holding the feature ``kind`` (codes random but valid)."""
    out, n_in = lin.weight.shape
    n_groups = n_in // G
    spec = WeightQuantSpec(bits=4, symmetric=True, granularity=PerGroup(G))
    scale = torch.rand(out, n_groups, generator=gen) * 0.02 + 0.005
    bits = torch.full((out, n_groups), 4)
    kw: dict[str, Any] = {}
    if kind == "group_bits":
        bits = torch.randint(2, 5, (out, n_groups), generator=gen)
        bits[0, 0], bits[0, 1] = 2, 4  # mixed for sure
        kw["group_bits"] = bits
    q = _codes_in_grid(bits, out, n_in, True, gen)
    zero = None
    if kind == "fractional_zero":
        spec = WeightQuantSpec(bits=4, symmetric=False, granularity=PerGroup(G), round_zp=False)
        q = _codes_in_grid(bits, out, n_in, False, gen).to(torch.uint8)
        zero = torch.rand(out, n_groups, generator=gen) * 15
    if kind == "g_idx":
        kw["g_idx"] = (torch.randperm(n_in, generator=gen) // G).to(torch.int32)
    if kind == "float_columns":
        cols = torch.tensor([1, n_in // 2, n_in - 1])
        kw["float_columns"] = (cols, torch.randn(out, 3, generator=gen) * 0.1)
    if kind == "sparse_outliers":
        kw["outliers"] = SparseOutliers(torch.tensor([0, 3, out - 1]), torch.tensor([5, 0, 7]),
                                        torch.tensor([0.5, -0.7, 0.9]))
    if kind == "sparsity_mask":
        kw["mask"] = nm_mask(torch.rand(out, n_in, generator=gen), 2, 4)
        kw["mask_structure"] = NM(2, 4)
    if kind == "quantized_scales":
        codes = torch.randint(1, 16, (out, n_groups), generator=gen)
        step = torch.full((1, n_groups), 0.001)
        kw["scale_codes"] = QuantizedScales(codes=codes, step=step, zero=None, bits=4,
                                            group_rows=out)
        scale = kw["scale_codes"].values()
    if kind == "act_quant":
        kw["act"] = ActQuantSpec(bits=8, symmetric=True, granularity=PerTensor(), static=True)
        kw["act_scale"] = torch.tensor(0.02)
    rec = QuantizedLinear(qweight=q, scale=scale.float(), zero=zero, weight=spec,
                          bias=None if lin.bias is None else lin.bias.detach().clone(), **kw)
    assert rec.problems() == [], (kind, rec.problems())
    return rec


KINDS = ("g_idx", "group_bits", "float_columns", "sparse_outliers", "sparsity_mask",
         "act_quant", "fractional_zero", "quantized_scales")


def _fake_quantized(tiny_llama_dir: Path) -> tuple[Any, Any, dict[str, QuantizedLinear]]:
    """The tiny Llama with every linear of its blocks replaced by a hand-made record's
    fake-quant linear, one feature per linear, each feature at least once."""
    model, tok = load_pretrained(ModelSource(tiny_llama_dir))
    gen = torch.Generator().manual_seed(0)
    records: dict[str, QuantizedLinear] = {}
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    assert len(names) >= len(KINDS)
    for i, name in enumerate(names):
        rec = _record(model.get_submodule(name), KINDS[i % len(KINDS)], gen)
        records[name] = rec
        set_module(model, name, FakeQuantLinear.from_record(rec, dtype=torch.float32))
    return model, tok, records


def test_every_accepted_feature_reloads_exactly_and_is_recorded(tmp_path: Path,
                                                                tiny_llama_dir: Path) -> None:
    assert set(KINDS) <= SPEC.accepts  # the features this test exercises are all accepted
    model, tok, records = _fake_quantized(tiny_llama_dir)
    out = tmp_path / "fake"
    out.mkdir()
    export(SimpleNamespace(tokenizer=tok), model, records, out)
    x = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    back = load_fake_quant(out)
    with torch.no_grad():
        ours, theirs = model(input_ids=x).logits, back(input_ids=x).logits
    assert torch.equal(ours, theirs)
    for name, rec in records.items():  # the exact weights of every feature
        assert torch.equal(back.get_submodule(name).weight, rec.dequantize()), name
    meta = json.loads((out / META_FILE).read_text())
    assert meta["version"] == 2
    seen = set()
    for name, rec in records.items():
        layer = meta["layers"][name]
        assert layer["features"] == rec.features()
        seen |= set(layer["features"])
        assert layer["weight"]["group_size"] == G
        if rec.group_bits is not None:
            counts = torch.unique(rec.group_bits, return_counts=True)
            assert layer["group_bits"] == {str(int(b)): int(c) for b, c in zip(*counts)}
        if rec.mask is not None:
            assert layer["sparsity_mask"] == {"structure": "2:4", "kept": int(rec.mask.sum()),
                                              "total": rec.mask.numel()}
            assert int(rec.mask.sum()) * 2 == rec.mask.numel()
        if rec.float_columns is not None:
            assert layer["float_columns"] == sorted(rec.float_columns[0].tolist())
        if rec.outliers is not None:
            assert layer["sparse_outliers"] == 3
        if rec.scale_codes is not None:
            assert layer["quantized_scales"] == {"bits": 4, "group_rows": rec.out_features}
        assert ("g_idx" in layer) == (rec.g_idx is not None)
        if rec.act is not None:
            assert layer["act"]["static"] is True and layer["act_scale"] == pytest.approx(0.02)
            assert isinstance(back.get_submodule(name), FakeQuantLinear)
    assert seen == set(KINDS)


def test_a_feature_it_does_not_accept_is_refused(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """An online input transform would have to run at load time: refused, naming it."""
    model, tok, records = _fake_quantized(tiny_llama_dir)
    name = next(iter(records))
    records[name] = dataclasses.replace(records[name], input_transform=MatrixTransform(
        torch.eye(records[name].in_features)))
    assert "input_transform" in records[name].features()
    assert "input_transform" not in SPEC.accepts
    with pytest.raises(PluginError, match="online transform"):
        export(SimpleNamespace(tokenizer=tok), model, records, tmp_path)
    assert not list(tmp_path.iterdir())  # refused before anything is written


# ------------------------------------------------------------------------------ use_cache

def _rtn_config(model: Path, save: Path) -> dict[str, Any]:
    return {"base": {"seed": 0, "device": "cpu"}, "model": {"type": "llama", "path": str(model)},
            "quant": {"method": "rtn", "weight": {"bit": 4, "symmetric": True,
                                                  "granularity": "per_group", "group_size": 32}},
            "save": {"save_path": str(save), "save_fake": True, "save_trans": True}}


def _check_use_cache(folder: Path, expected: bool) -> None:
    from transformers import AutoModelForCausalLM

    assert json.loads((folder / "config.json").read_text())["use_cache"] is expected
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    with torch.no_grad():  # a forward without use_cache= follows config.json
        out = model(input_ids=torch.tensor([[1, 2, 3]]))
    assert (out.past_key_values is not None) is expected


def test_exported_config_keeps_the_checkpoints_use_cache(tmp_path: Path,
                                                         tiny_llama_dir: Path) -> None:
    src = json.loads((tiny_llama_dir / "config.json").read_text())
    assert src.get("use_cache", True) is True
    model, tok = load_pretrained(ModelSource(tiny_llama_dir))
    assert model.config.use_cache is False  # what calibration and evaluation run with
    out = tmp_path / "out"
    run(resolve_config(_rtn_config(tiny_llama_dir, out)), progress=False, model=model,
        tokenizer=tok)
    _check_use_cache(out / "fake_quant_model", True)
    _check_use_cache(out / "transformed_model", True)
    assert model.config.use_cache is False  # the in-process model is left as it was


def test_a_checkpoint_without_cache_stays_without(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """The original value is kept, not forced to true."""
    import shutil

    src = tmp_path / "nocache"
    shutil.copytree(tiny_llama_dir, src)
    for fname in ("config.json", "generation_config.json"):
        path = src / fname
        if path.is_file():
            cfg = json.loads(path.read_text())
            cfg["use_cache"] = False
            path.write_text(json.dumps(cfg))
    model, tok = load_pretrained(ModelSource(src))
    out = tmp_path / "out"
    run(resolve_config(_rtn_config(src, out)), progress=False, model=model, tokenizer=tok)
    _check_use_cache(out / "fake_quant_model", False)


@pytest.mark.slow
def test_bundled_smollm2_fake_export_keeps_use_cache(tmp_path: Path, smollm2_path: Path) -> None:
    cfg = _rtn_config(smollm2_path, tmp_path / "out")
    cfg["save"].pop("save_trans")
    run(resolve_config(cfg), progress=False)
    _check_use_cache(tmp_path / "out" / "fake_quant_model", True)
