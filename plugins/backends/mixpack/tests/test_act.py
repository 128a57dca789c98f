"""Weight-activation records through mixpack: the format writes each linear's dynamic
per-token activation setting (``act``, ``ActQuantSpec.to_dict``; format version 2) and the
reloaded ``MixPackLinear`` quantizes its input with llmcq's own ``fake_quantize_act``, so
the logits equal the fake-quant model's (in process and ``save_fake``'s folder) bit for
bit; version-1 folders (no ``act`` key) still load; a bad ``act`` entry is refused.

* hand-made records with activation settings on a tiny Llama (symmetric and asymmetric,
  restricted and full range, 4 to 8 bits, one linear without);
* ``llmcq run`` with RTN W4A8 / W8A8 per channel and ``save_fake`` + ``mixpack`` on the tiny
  Llama, and (slow) on a 4-block slice of the bundled model: logits equal the run's
  fake-quant model's and the perplexity equals the run's ``fake_quant`` one.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from llmcq.config.loader import resolve_config
from llmcq.errors import PluginError
from llmcq.eval.ppl import window_losses
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.runner import run
from llmcq.quant.fake import FakeQuantLinear, set_module
from llmcq.quant.spec import ActQuantSpec, PerTensor, PerToken
from llmcq_fake import load_fake_quant
from llmcq_fake.export import export as export_fake
from llmcq_mixpack import load_model
from llmcq_mixpack import testing as MB
from llmcq_mixpack.export import export
from llmcq_mixpack.format import MixPackFormatError
from llmcq_mixpack.module import MixPackLinear

ACTS = (ActQuantSpec(bits=8, symmetric=True, granularity=PerToken()),
        ActQuantSpec(bits=4, symmetric=False, granularity=PerToken()),
        ActQuantSpec(bits=6, symmetric=True, granularity=PerToken(), sym_range="full"),
        None)  # a linear whose input stays float


def _with_acts(folder: Path) -> tuple[Any, Any, dict[str, Any]]:
    """``MB.fake_quantized``'s model and records, each record given one of :data:`ACTS` in
    turn and its FakeQuantLinear rebuilt with it."""
    model, tok, records = MB.fake_quantized(folder)
    for i, (name, rec) in enumerate(sorted(records.items())):
        rec.act = ACTS[i % len(ACTS)]
        set_module(model, name, FakeQuantLinear.from_record(rec, dtype=torch.float32))
    return model, tok, records


def test_activation_settings_reload_to_the_fake_quant_logits(tmp_path: Path,
                                                             tiny_llama_dir: Path) -> None:
    model, tok, records = _with_acts(tiny_llama_dir)
    out = tmp_path / "mp"
    out.mkdir()
    export(SimpleNamespace(tokenizer=tok), model, records, out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == 2
    back = load_model(out)
    for name, rec in records.items():
        expected = None if rec.act is None else rec.act.to_dict()
        assert qc["modules"][name]["act"] == expected, name
        mod = back.get_submodule(name)
        assert isinstance(mod, MixPackLinear) and mod.act == rec.act, name
    x = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = back(input_ids=x).logits
        assert torch.equal(logits, model(input_ids=x).logits)
        for name in records:  # not the weight-only model: the input quantization counts
            mod = back.get_submodule(name)
            mod.act = None
        weight_only = back(input_ids=x).logits
    assert not torch.allclose(weight_only, logits, atol=1e-3)

    fake_dir = tmp_path / "fake"  # save_fake's folder of the same records, in bf16
    fake_dir.mkdir()
    export_fake(SimpleNamespace(tokenizer=tok), model, records, fake_dir)
    half = load_model(out, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(half(input_ids=x).logits,
                           load_fake_quant(fake_dir, dtype=torch.bfloat16)(input_ids=x).logits)


def _rewrite_entries(folder: Path, change: Any, version: int | None = None) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    qc = cfg["quantization_config"]
    for entry in qc["modules"].values():
        change(entry)
    if version is not None:
        qc["format_version"] = version
    path.write_text(json.dumps(cfg))


def test_version_1_folders_load_and_bad_act_entries_are_refused(tmp_path: Path,
                                                                tiny_llama_dir: Path) -> None:
    model, tok, records = MB.fake_quantized(tiny_llama_dir)  # weight only
    base = tmp_path / "mp"
    base.mkdir()
    export(SimpleNamespace(tokenizer=tok), model, records, base)
    x = torch.randint(0, 500, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(input_ids=x).logits

    v1 = tmp_path / "v1"  # what the previous writer made: no act key, version 1
    v1.mkdir()
    for f in base.iterdir():
        (v1 / f.name).write_bytes(f.read_bytes())
    _rewrite_entries(v1, lambda e: e.pop("act"), version=1)
    with torch.no_grad():
        assert torch.equal(load_model(v1)(input_ids=x).logits, expected)
    _rewrite_entries(v1, lambda e: e.update(act=None))  # a version-2 key in a version-1 entry
    with pytest.raises(MixPackFormatError, match="entry keys .* \\(format version 1\\)"):
        load_model(v1)

    static = ActQuantSpec(bits=8, symmetric=True, granularity=PerTensor(), static=True)
    _rewrite_entries(base, lambda e: e.update(act=static.to_dict()))
    with pytest.raises(MixPackFormatError, match="act static True.*allowed static: False"):
        load_model(base)
    _rewrite_entries(base, lambda e: e.update(act={"bits": 8}))
    with pytest.raises(MixPackFormatError, match="malformed act"):
        load_model(base)


def test_a_static_record_is_refused_before_writing(tmp_path: Path,
                                                   tiny_llama_dir: Path) -> None:
    """The config check refuses static settings; a record holding one anyway (an algorithm
    that under-declares) fails the export naming the linear and the field."""
    model, tok, records = MB.fake_quantized(tiny_llama_dir)
    name = sorted(records)[0]
    records[name].act = ActQuantSpec(bits=8, symmetric=True, granularity=PerTensor(),
                                     static=True)
    records[name].act_scale = torch.tensor(0.1)
    with pytest.raises(PluginError, match=f"{name}.*static True.*allowed static: False"):
        export(SimpleNamespace(tokenizer=tok), model, records, tmp_path)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ through the pipeline

def _eval_text(tmp_path: Path, data: Path) -> Path:
    path = tmp_path / "wikitext2_test_head.txt"
    path.write_text((data / "wikitext2" / "test.txt").read_text()[:30_000])
    return path


def _config(save: Path, text: Path, w_bits: int, seq_len: int, n_windows: int
            ) -> dict[str, Any]:
    return {
        "base": {"seed": 0, "device": "cpu"}, "model": {"type": "llama"},
        "eval": {"eval_pos": ["fake_quant"], "name": "wikitext2", "path": str(text),
                 "seq_len": seq_len, "num_samples": n_windows},
        "quant": {"method": "rtn",
                  "weight": {"bit": w_bits, "symmetric": True, "granularity": "per_channel"},
                  "act": {"bit": 8, "symmetric": True, "granularity": "per_token"}},
        "save": {"save_path": str(save), "save_fake": True, "save_mixpack": True}}


def _check(out: Path, model: Any, tok: Any, text: Path, seq_len: int,
           n_windows: int) -> tuple[float, float]:
    """The reloaded mixpack model's logits on the evaluated windows equal the in-process
    fake-quant model's and ``save_fake``'s folder's; returns its perplexity and the run's."""
    from llmcq.data.datasets import DatasetSpec
    from llmcq.plugins import registry

    fq_ppl = json.loads((out / "results.json").read_text())["eval"]["fake_quant"][
        "wikitext2"]["ppl"]
    dspec, _ = registry.load_spec("llmcq.datasets", "wikitext2", field="eval.name",
                                  kind=DatasetSpec)
    ids = dspec.evaluation_ids(tok, str(text), seq_len)[: n_windows * seq_len]
    windows = torch.tensor(ids).view(n_windows, seq_len)
    back = load_model(out / "mixpack_model")
    acts = {m.act for m in back.modules() if isinstance(m, MixPackLinear)}
    assert acts == {ActQuantSpec(bits=8, symmetric=True, granularity=PerToken())}
    with torch.no_grad():
        logits = back(input_ids=windows).logits
        assert torch.equal(logits, model(input_ids=windows).logits)
        fake = load_fake_quant(out / "fake_quant_model", dtype=torch.float32)
        assert torch.equal(logits, fake(input_ids=windows).logits)
    return math.exp(float(window_losses(logits, windows).double().mean())), fq_ppl


@pytest.mark.parametrize("w_bits", [4, 8])
def test_rtn_wa_run_reloads_with_the_fake_quant_perplexity(
        tmp_path: Path, tiny_llama_dir: Path, shared_data: Path, w_bits: int) -> None:
    model, tok = load_pretrained(ModelSource(tiny_llama_dir))
    out, text = tmp_path / "out", _eval_text(tmp_path, shared_data)
    cfg = _config(out, text, w_bits, 128, 2)
    cfg["model"]["path"] = str(tiny_llama_dir)
    run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
    ppl, fq_ppl = _check(out, model, tok, text, 128, 2)
    assert math.isclose(ppl, fq_ppl, rel_tol=1e-5), (ppl, fq_ppl)  # batch of 2 vs 1 by 1


def _slice(model: Any, n_blocks: int) -> Any:
    """The first ``n_blocks`` decoder blocks of a Llama (config and module list)."""
    model.model.layers = model.model.layers[:n_blocks]
    model.config.num_hidden_layers = n_blocks
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:n_blocks]
    return model


@pytest.mark.slow
def test_bundled_slice_w4a8_run_reloads_with_the_fake_quant_perplexity(
        tmp_path: Path, smollm2_copy: Any, shared_data: Path) -> None:
    model, tok = smollm2_copy()
    model = _slice(model, 4)
    out, text = tmp_path / "out", _eval_text(tmp_path, shared_data)
    run(resolve_config(_config(out, text, 4, 256, 2)), progress=False, model=model,
        tokenizer=copy.deepcopy(tok))
    ppl, fq_ppl = _check(out, model, tok, text, 256, 2)
    print(f"\n4-block slice W4A8: ppl fake-quant {fq_ppl:.4f}, mixpack {ppl:.4f}")
    assert math.isclose(ppl, fq_ppl, rel_tol=1e-5), (ppl, fq_ppl)
