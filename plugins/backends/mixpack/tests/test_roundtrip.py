"""Export -> load_model round trips: the reloaded model computes with the fake-quant weights
bit for bit, so its logits (and perplexity) equal the fake-quant model's.

* hand-made records on a tiny Llama with biases, one kind per linear: mixed widths 1..8,
  symmetric and asymmetric, partial last groups, per channel, per tensor, uniform, act-order
  ``g_idx``, float columns, fractional zeros, quantized scales, and a linear left in float;
  the README's numpy reader reads the same weights from the files;
* a pipeline run with a test-only mixed-precision algorithm (``llmcq_mixpack.testing``) and
  ``save_fake`` + ``mixpack`` (the bundled model: the one slow test).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from llmcq.capabilities import RECORD_FEATURES
from llmcq.config.loader import resolve_config
from llmcq.errors import PluginError
from llmcq.eval.ppl import window_losses
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.runner import run
from llmcq.plugins import registry
from llmcq.quant.transform import MatrixTransform
from llmcq_fake import load_fake_quant
from llmcq_fake.export import export as export_fake
from llmcq_mixpack import SPEC, load_model
from llmcq_mixpack import testing as MB
from llmcq_mixpack.export import export
from llmcq_mixpack.layout import ACCEPTED_FEATURES
from llmcq_mixpack.module import MixPackLinear
from safetensors.torch import load_file


def test_spec_declares_what_the_layout_writes() -> None:
    assert SPEC.accepts == ACCEPTED_FEATURES | {"layer_grids", "float_linears"}
    assert SPEC.accepts <= set(RECORD_FEATURES)
    # a refusal sentence is for a feature it refuses, or accepts only with some details
    assert set(SPEC.refusals) <= (set(RECORD_FEATURES) - SPEC.accepts) | set(
        SPEC.accepts_detail)
    assert SPEC.accepts_detail == {"act_quant": ("dynamic",)}


# ------------------------------------------------------------- hand-made records, tiny Llama

@pytest.fixture(scope="module")
def biased_llama(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Path:
    """The tiny Llama with biases on every linear (the bias path of the format)."""
    from llmcq.testing.tiny_models import save_tiny_model, tiny_llama_config

    folder = tmp_path_factory.mktemp("tiny-llama-bias")
    cfg = tiny_llama_config(vocab_size=len(tiny_tokenizer), attention_bias=True, mlp_bias=True)
    return save_tiny_model(folder, cfg, tiny_tokenizer, perturb_vectors=True)


def test_every_kind_reloads_to_the_fake_quant_weights(tmp_path: Path,
                                                      biased_llama: Path) -> None:
    model, tok, records = MB.fake_quantized(biased_llama)
    seen = {f for r in records.values() for f in r.features()}
    # every accepted weight feature is exercised (act_quant: test_act.py)
    assert seen == ACCEPTED_FEATURES - {"act_quant"}
    out = tmp_path / "mp"
    out.mkdir()
    export(SimpleNamespace(tokenizer=tok), model, records, out)

    back = load_model(out)
    x = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(input_ids=x).logits, model(input_ids=x).logits)
    for name, rec in records.items():
        mod = back.get_submodule(name)
        assert isinstance(mod, MixPackLinear), name
        assert torch.equal(mod.dequantize(), rec.dequantize()), name
        assert torch.equal(mod.bias, rec.bias), name
    kept = back.get_submodule(MB.FLOAT_LINEAR)
    assert type(kept) is torch.nn.Linear
    assert torch.equal(kept.weight, model.get_submodule(MB.FLOAT_LINEAR).weight)

    stored = load_file(str(out / "model.safetensors"))
    assert not any(f"{n}.weight" in stored for n in records)  # no dense copy of a packed linear
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert set(qc["modules"]) == set(records)
    codes = bits = 0
    for name, rec in records.items():
        entry = qc["modules"][name]
        widths = (rec.group_bits if rec.group_bits is not None
                  else torch.full(rec.scale.shape, rec.bits))[:, rec.column_groups()] \
            .expand(rec.out_features, -1)  # per-tensor maps broadcast over rows
        values, counts = torch.unique(widths, return_counts=True)
        expected = {str(int(b)): int(n) for b, n in zip(values, counts, strict=True)}
        assert entry["widths"] == expected, name
        assert entry["group_bits"] == rec.mixed_bits and entry["col_perm"] == (
            rec.g_idx is not None), name
        on_grid = torch.ones(rec.in_features, dtype=torch.bool)
        if rec.float_columns is not None:  # off the grid: not counted (results.json's rule)
            on_grid[rec.float_columns[0]] = False
        codes += int(on_grid.sum()) * rec.out_features
        bits += int(widths[:, on_grid].sum())
        for b, n in expected.items():  # int32 bit planes, n codes of b bits each
            assert stored[f"{name}.codes_b{b}"].shape == (int(b), -(-n // 32)), (name, b)
    assert qc["bits_mean"] == pytest.approx(bits / codes)
    assert qc["format_version"] == 2 and qc["quant_method"] == "llmcq_mixpack"

    fake_dir = tmp_path / "fake"  # the same records as a save_fake folder, loaded in bf16
    fake_dir.mkdir()
    export_fake(SimpleNamespace(tokenizer=tok), model, records, fake_dir)
    half = load_model(out, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(half(input_ids=x).logits,
                           load_fake_quant(fake_dir, dtype=torch.bfloat16)(input_ids=x).logits)
    half.half()  # a later cast moves the bias, never the float32 grid
    mod = half.get_submodule(name)
    assert mod.bias.dtype == torch.float16 and mod.scale.dtype == torch.float32
    assert torch.equal(mod.dequantize(), rec.dequantize())

    read_weight = _readme_reader()  # the README's numpy reader, written from the spec alone
    for name, rec in records.items():
        assert np.array_equal(read_weight(str(out), name), rec.dequantize().numpy()), name


def _readme_reader() -> Any:
    """``read_weight`` from the README's "A complete reader" block, executed as written."""
    text = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(# reader:.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "the README has one '# reader:' block"
    namespace: dict[str, Any] = {}
    exec(compile(blocks[0], "README.md#reader", "exec"), namespace)  # noqa: S102
    return namespace["read_weight"]


def test_a_feature_it_does_not_write_is_refused_before_writing(tmp_path: Path,
                                                               biased_llama: Path) -> None:
    model, tok, records = MB.fake_quantized(biased_llama)
    name = next(iter(records))
    rec = records[name]
    rec.input_transform = MatrixTransform(torch.eye(rec.in_features))
    with pytest.raises(PluginError, match=f"{name}.*input_transform"):
        export(SimpleNamespace(tokenizer=tok), model, records, tmp_path)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ through the pipeline

@pytest.fixture
def mixed_rtn() -> Any:
    registry.register("llmcq.algorithms", MB.SPEC)
    yield MB.NAME
    registry.unregister("llmcq.algorithms", MB.NAME)


def _config(model: Path, save: Path, text: Path, *, n_windows: int, seq_len: int,
            group_size: int) -> dict[str, Any]:
    return {
        "base": {"seed": 0, "device": "cpu"}, "model": {"type": "llama", "path": str(model)},
        "eval": {"eval_pos": ["fake_quant"], "name": "wikitext2", "path": str(text),
                 "seq_len": seq_len, "num_samples": n_windows},
        "quant": {"method": MB.NAME, "weight": {"bit": 3, "symmetric": False,
                                                "granularity": "per_group",
                                                "group_size": group_size}},
        "save": {"save_path": str(save), "save_fake": True, "backends": ["mixpack"]}}


def _eval_text(tmp_path: Path, data: Path) -> Path:
    """The start of wikitext2 test (enough for the few windows evaluated; tokenizing the
    whole file would take most of the test's time)."""
    path = tmp_path / "wikitext2_test_head.txt"
    path.write_text((data / "wikitext2" / "test.txt").read_text()[:30_000])
    return path


def _eval_ids(tok: Any, text: Path, seq_len: int, n_windows: int) -> torch.Tensor:
    """The windows the pipeline's evaluation of ``text`` cuts."""
    from llmcq.data.datasets import DatasetSpec

    dspec, _ = registry.load_spec("llmcq.datasets", "wikitext2", field="eval.name",
                                  kind=DatasetSpec)
    assert isinstance(dspec, DatasetSpec)
    ids = dspec.evaluation_ids(tok, str(text), seq_len)
    assert len(ids) >= n_windows * seq_len
    return torch.tensor(ids[: n_windows * seq_len])


def _check_run(out: Path, model: Any, tok: Any, text: Path, seq_len: int,
               n_windows: int) -> tuple[float, float]:
    """Reload the mixpack folder: its logits on the evaluated windows equal the in-process
    fake-quant model's; returns its perplexity on them and the run's fake-quant one."""
    results = json.loads((out / "results.json").read_text())
    fq_ppl = results["eval"]["fake_quant"]["wikitext2"]["ppl"]
    qc = json.loads((out / "mixpack_model" / "config.json").read_text())["quantization_config"]
    assert qc["bits_mean"] == results["compression"]["weight_bits_mean"] == 3.0
    assert results["outputs"]["mixpack"] == str(out / "mixpack_model")
    back = load_model(out / "mixpack_model")
    windows = _eval_ids(tok, text, seq_len, n_windows).view(n_windows, seq_len)
    with torch.no_grad():  # one forward each (the pure-torch unpacking runs per forward)
        logits = back(input_ids=windows).logits
        assert torch.equal(logits, model(input_ids=windows).logits)
    return math.exp(float(window_losses(logits, windows).double().mean())), fq_ppl


def test_pipeline_run_reloads_with_the_fake_quant_perplexity(
        tmp_path: Path, tiny_llama_dir: Path, shared_data: Path, mixed_rtn: str) -> None:
    model, tok = load_pretrained(ModelSource(tiny_llama_dir))
    out, text = tmp_path / "out", _eval_text(tmp_path, shared_data)
    run(resolve_config(_config(tiny_llama_dir, out, text, n_windows=2, seq_len=128,
                               group_size=32)), progress=False, model=model, tokenizer=tok)
    ppl, fq_ppl = _check_run(out, model, tok, text, 128, 2)
    assert math.isclose(ppl, fq_ppl, rel_tol=1e-5), (ppl, fq_ppl)  # batch of 2 vs 1 by 1


@pytest.mark.slow
def test_bundled_model_run_reloads_with_the_fake_quant_perplexity(
        tmp_path: Path, smollm2_path: Path, smollm2_copy: Any, shared_data: Path,
        mixed_rtn: str) -> None:
    model, tok = smollm2_copy()
    out, text = tmp_path / "out", _eval_text(tmp_path, shared_data)
    cfg = _config(smollm2_path, out, text, n_windows=2, seq_len=256, group_size=64)
    cfg["model"].pop("path")  # the bundled model
    run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
    ppl, fq_ppl = _check_run(out, model, tok, text, 256, 2)
    sizes = {k: sum(f.stat().st_size for f in (out / k).glob("*.safetensors"))
             for k in ("mixpack_model", "fake_quant_model")}
    print(f"\nppl fake-quant {fq_ppl:.4f}, mixpack {ppl:.4f}; weights "
          f"{sizes['mixpack_model'] / 1e6:.1f} MB vs {sizes['fake_quant_model'] / 1e6:.1f} MB")
    assert math.isclose(ppl, fq_ppl, rel_tol=1e-5), (ppl, fq_ppl)  # batch of 2 vs 1 by 1
    assert sizes["mixpack_model"] < 0.6 * sizes["fake_quant_model"]


def test_layer_wise_grids_and_float_linears_reload(tmp_path: Path, tiny_llama_dir: Path,
                                                   shared_data: Path) -> None:
    """llmc's mix_bits and ignored_layers through a real run (RTN): down_proj at W8 per
    channel, the other linears W3 g32, block 1's attention in float; the reloaded model's
    logits equal the run's fake-quant model's, and the float linears stay nn.Linear with
    their original weights."""
    model, tok = load_pretrained(ModelSource(tiny_llama_dir))
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    out, text = tmp_path / "out", _eval_text(tmp_path, shared_data)
    cfg = {"base": {"seed": 0, "device": "cpu"},
           "model": {"type": "llama", "path": str(tiny_llama_dir)},
           "eval": {"eval_pos": ["fake_quant"], "name": "wikitext2", "path": str(text),
                    "seq_len": 128, "num_samples": 2},
           "quant": {"method": "rtn",
                     "weight": {"bit": 3, "symmetric": False, "granularity": "per_group",
                                "group_size": 32},
                     "mix_bits": {"setting_0": {
                         "layer_name": ["down_proj"], "do_quant": True,
                         "weight": {"bit": 8, "symmetric": True,
                                    "granularity": "per_channel"}}}},
           "ignored_layers": {"block_ids": [1],
                              "layer_names": ["self_attn.q_proj", "self_attn.k_proj",
                                              "self_attn.v_proj", "self_attn.o_proj"]},
           "save": {"save_path": str(out), "save_mixpack": True}}
    run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
    back = load_model(out / "mixpack_model")
    modules = dict(back.named_modules())
    for name in ("self_attn.q_proj", "self_attn.o_proj"):
        lin = modules[f"model.layers.1.{name}"]
        assert type(lin) is torch.nn.Linear
        assert torch.equal(lin.weight, original[f"model.layers.1.{name}.weight"])
    assert isinstance(modules["model.layers.0.self_attn.q_proj"], MixPackLinear)
    entries = json.loads((out / "mixpack_model" / "config.json").read_text()
                         )["quantization_config"]
    mods = entries["modules"]
    assert "model.layers.1.self_attn.q_proj" not in mods
    down, q0 = mods["model.layers.0.mlp.down_proj"], mods["model.layers.0.self_attn.q_proj"]
    assert (down["bits"], down["granularity"], down["symmetric"]) == (8, "per_channel", True)
    assert (q0["bits"], q0["granularity"], q0["group_size"]) == (3, "per_group", 32)
    windows = _eval_ids(tok, text, 128, 2).view(2, 128)
    with torch.no_grad():
        assert torch.equal(back(input_ids=windows).logits, model(input_ids=windows).logits)
