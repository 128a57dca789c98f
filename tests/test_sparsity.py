"""Live sparsity: the ``sparse`` section runs through the block engine, alone or before a
quantizer; masks keep their structure, pruned weights stay exactly zero in the records, and
``compression`` reports the measured sparsity. Uses the ``magnitude`` plugin (data-free)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import llmcq
from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.runner import run
from llmcq.sparsity import NM, Unstructured, parse_structure
from llmcq.sparsity.masks import nm_mask, structure_violations, unstructured_mask
from llmcq_gptq.solver import gptq_quantize


def _config(model: Path, data: Path, save: Path, *, sparse: dict[str, Any],
            quant: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "base": {"seed": 0, "device": "cpu"},
        "model": {"type": "llama", "path": str(model)},
        "eval": {"eval_pos": ["pretrain", "transformed"] + (["fake_quant"] if quant else []),
                 "name": "wikitext2", "path": str(data / "wikitext2" / "test.txt"),
                 "seq_len": 64, "bs": 2, "num_samples": 4},
        "sparse": sparse,
        "save": {"save_path": str(save), "save_trans": True},
    }
    if quant is not None:
        cfg["quant"] = quant
        cfg["save"]["save_fake"] = True
    return cfg


def _calib(data: Path) -> dict[str, Any]:
    return {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"), "n_samples": 4,
            "seq_len": 64, "preproc": "wikitext2_gptq", "bs": 2, "seed": 1}


def test_structures_parse_and_masks_hold_them() -> None:
    assert parse_structure("unstructured") == Unstructured()
    assert parse_structure("2:4") == NM(2, 4) and NM(2, 4).sparsity == 0.5
    with pytest.raises(ValueError):
        parse_structure("4:2")
    scores = torch.rand(6, 22, generator=torch.Generator().manual_seed(0))
    m = nm_mask(scores, 2, 4)
    assert structure_violations(m, NM(2, 4)) == 0
    # exactly 2 kept in every full block; the partial tail (2 columns) keeps both
    assert (m[:, :20].reshape(6, 5, 4).sum(-1) == 2).all() and m[:, 20:].all()
    kept = scores[:, :4][m[:, :4]].reshape(6, 2)
    dropped = scores[:, :4][~m[:, :4]].reshape(6, 2)
    assert (kept.min(1).values >= dropped.max(1).values).all()  # the highest scores are kept
    u = unstructured_mask(scores, 0.25, per_row=True)
    assert (u.sum(1) == 22 - round(0.25 * 22)).all()
    layer = unstructured_mask(scores, 0.25, per_row=False)
    assert int((~layer).sum()) == round(0.25 * scores.numel())
    assert structure_violations(torch.ones(2, 8, dtype=torch.bool), NM(2, 4)) == 4


def test_config_refuses_sparse_keys_no_step_honours(tiny_llama_dir: Path, shared_data: Path,
                                                    tmp_path: Path) -> None:
    cfg = _config(tiny_llama_dir, shared_data, tmp_path / "o",
                  sparse={"method": "magnitude", "weight": {"n_prune_layers": 1}})
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg)
    assert err.value.path == "sparse.weight.n_prune_layers" and "magnitude" in str(err.value)
    cfg["sparse"] = {"method": "magnitude", "weight": {"mask_structure": "3:2"}}
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg)
    assert "mask_structure" in err.value.path and "N:M" in str(err.value)


def test_mask_to_a_dense_only_backend_is_refused_with_the_hint(tiny_llama_dir: Path,
                                                               shared_data: Path,
                                                               tmp_path: Path) -> None:
    cfg = _config(tiny_llama_dir, shared_data, tmp_path / "o",
                  sparse={"method": "magnitude", "weight": {"sparsity": 0.5}},
                  quant={"method": "rtn", "weight": {"bit": 4, "symmetric": True,
                                                     "granularity": "per_channel"}})
    cfg["save"] = {"save_path": str(tmp_path / "o"), "save_autoawq": True}
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg)
    msg = str(err.value)
    assert err.value.path == "sparse.method" and "sparsity mask" in msg and "save_fake" in msg


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_pruning_alone_zeroes_exactly_the_mask(structure: str, tiny_llama_dir: Path,
                                               shared_data: Path, tmp_path: Path) -> None:
    weight = {"sparsity": 0.5} if structure == "unstructured" else {"mask_structure": structure}
    cfg = _config(tiny_llama_dir, shared_data, tmp_path / "o",
                  sparse={"method": "magnitude", "weight": weight, "special": {"scope": "row"}})
    dense, _ = load_pretrained(ModelSource(tiny_llama_dir))
    resolved = resolve_config(cfg)
    out = run(resolved, progress=False)
    comp = out["compression"]
    assert comp["linears_pruned"] == 2 * 7 and comp["linears_quantized"] == 0
    assert comp["sparsity"] == pytest.approx(0.5, abs=1e-6) == comp["mask_sparsity"]
    trans, _ = load_pretrained(ModelSource(tmp_path / "o" / "transformed_model"))
    for name, mod in trans.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            w, w0 = mod.weight, dense.get_submodule(name).weight
            zero = w == 0
            assert (zero.sum(1) == w.shape[1] // 2).all()  # per row, half of every row
            if structure == "2:4":
                assert structure_violations(~zero, NM(2, 4)) == 0
            # the survivors are untouched and are the largest of their row (of their block
            # of 4 for 2:4)
            assert torch.equal(w[~zero], w0[~zero])
            a, z = w0.abs(), zero
            if structure == "2:4":
                a, z = a.reshape(-1, 4), z.reshape(-1, 4)
            assert (a[~z].reshape(a.shape[0], -1).min(1).values >=
                    a[z].reshape(a.shape[0], -1).max(1).values).all()
    tr = out["eval"]["transformed"]["wikitext2"]["ppl"]
    assert tr != out["eval"]["pretrain"]["wikitext2"]["ppl"]


def test_prune_then_gptq_keeps_pruned_weights_at_zero(tiny_llama_dir: Path, shared_data: Path,
                                                       tmp_path: Path) -> None:
    cfg = _config(tiny_llama_dir, shared_data, tmp_path / "o",
                  sparse={"method": "magnitude", "weight": {"mask_structure": "2:4"}},
                  quant={"method": "gptq", "weight": {"bit": 4, "symmetric": False,
                                                      "granularity": "per_group",
                                                      "group_size": 32},
                         "special": {"actorder": True, "static_groups": True}})
    cfg["calib"] = _calib(shared_data)
    out = run(resolve_config(cfg), progress=False)
    comp = out["compression"]
    assert comp["mask_sparsity"] == 0.5  # 2:4 exactly
    # measured zeros: the pruned half plus kept weights that rounded to zero
    assert 0.5 <= comp["sparsity"] < 0.6
    assert comp["weight_bits_mean"] == 4.0
    fake, _ = load_pretrained(ModelSource(tmp_path / "o" / "fake_quant_model"))
    trans, _ = load_pretrained(ModelSource(tmp_path / "o" / "transformed_model"))
    for name, mod in fake.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            pruned = trans.get_submodule(name).weight == 0
            assert (mod.weight[pruned] == 0).all()
            assert structure_violations(mod.weight != 0, NM(2, 4)) == 0
    meta = json.loads((tmp_path / "o" / "fake_quant_model" / "llmcq_quant.json").read_text())
    assert meta["layers"]


def test_gptq_sweep_with_a_mask_beats_masking_afterwards() -> None:
    """Quantizing the kept weights of a pruned layer: a sweep that knows the mask (pruned
    weights held at zero, so the updates that reach them are compensated by later columns)
    must beat quantizing without the mask and zeroing afterwards, on the objective of
    reproducing the pruned layer, ||(W_pruned - W_hat) X||^2, and keep every pruned weight
    at zero."""
    from llmcq.quant.spec import PerGroup, WeightQuantSpec

    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g) * 0.3
    W = torch.randn(32, 64, generator=g)
    H = 2 * X.T @ X / X.shape[0]
    mask = nm_mask(W.abs(), 2, 4)
    Wp = W * mask
    spec = WeightQuantSpec(bits=4, symmetric=False, granularity=PerGroup(16))

    def err(w_hat: torch.Tensor) -> float:
        return float(((Wp - w_hat) @ X.T).square().sum())

    joint = gptq_quantize(Wp, H, spec, mask=mask, return_dequant=True).w_hat
    plain = gptq_quantize(Wp, H, spec, return_dequant=True).w_hat * mask
    assert joint is not None and (joint[~mask] == 0).all()
    assert err(joint) < 0.95 * err(plain)


def test_dense_outputs_feed_the_next_block_unless_sparsity_out(tiny_llama_dir: Path,
                                                                shared_data: Path,
                                                                tmp_path: Path) -> None:
    """sparsity_out False (llmc's default): block 1 calibrates on the dense block 0's
    outputs; True: on the pruned block 0's."""
    seen: dict[bool, torch.Tensor] = {}

    class Spy:
        def __init__(self, key: bool) -> None:
            self.key = key

        @llmcq.hookimpl
        def llmcq_calibrate(self, block: Any, inputs: Any) -> None:
            if block.index == 1 and inputs is not None:
                seen[self.key] = inputs.hidden[0].clone()

    model0, _ = load_pretrained(ModelSource(tiny_llama_dir))
    outs = {}
    for flag in (False, True):
        cfg = _config(tiny_llama_dir, shared_data, tmp_path / f"o{flag}",
                      sparse={"method": "magnitude", "weight": {"sparsity": 0.5},
                              "sparsity_out": flag},
                      quant={"method": "gptq", "weight": {"bit": 8, "symmetric": True,
                                                          "granularity": "per_channel"}})
        cfg["calib"] = _calib(shared_data)
        cfg["eval"]["eval_pos"] = ["pretrain"]
        outs[flag] = run(resolve_config(cfg), progress=False, extra_plugins=[Spy(flag)])
    assert not torch.allclose(seen[False], seen[True])
    # the dense chain: block 0 of the unpruned model on the same calibration tokens
    from llmcq.pipeline.blockwise import capture_block_inputs
    from llmcq_llama.adapter import LlamaAdapter

    from llmcq.config.schema import CalibSection
    from llmcq.data.datasets import DatasetSpec
    from llmcq.pipeline.runner import calibration_batches
    from llmcq.plugins import registry

    dspec, _ = registry.load_spec("llmcq.datasets", "wikitext2", field="calib.name",
                                  kind=DatasetSpec)
    tok = load_pretrained(ModelSource(tiny_llama_dir))[1]
    batches = calibration_batches(dspec.calibration_ids(tok, CalibSection(**_calib(shared_data))),
                                  2)
    adapter = LlamaAdapter()
    inputs = capture_block_inputs(model0, adapter, batches, torch.device("cpu"))
    dense0 = inputs.forward(adapter.blocks(model0)[0])[0]
    torch.testing.assert_close(seen[False], dense0, rtol=1e-5, atol=1e-5)


def test_compression_block_matches_a_hand_count(tiny_llama_dir: Path, shared_data: Path,
                                                tmp_path: Path) -> None:
    from llmcq.quant.compression import compression_summary
    from llmcq.quant.record import QuantizedLinear
    from llmcq.quant.spec import PerGroup, WeightQuantSpec

    cfg = {"base": {"seed": 0, "device": "cpu"},
           "model": {"type": "llama", "path": str(tiny_llama_dir)},
           "quant": {"method": "rtn", "weight": {"bit": 3, "symmetric": False,
                                                 "granularity": "per_group", "group_size": 32}},
           "save": {"save_path": str(tmp_path / "o")}}
    model, _ = load_pretrained(ModelSource(tiny_llama_dir))
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n}
    n_w = sum(m.weight.numel() for m in linears.values())
    n_groups = sum(m.out_features * -(-m.in_features // 32) for m in linears.values())
    out = run(resolve_config(cfg), progress=False)
    comp = out["compression"]
    assert comp["params_quantized"] == n_w and comp["linears_quantized"] == len(linears)
    assert comp["params_total"] == sum(p.numel() for p in model.parameters())
    assert comp["weight_bits_mean"] == 3.0
    # codes 3 bits each, one 16-bit scale and one 3-bit integral zero per group
    assert comp["bits_per_param"] == pytest.approx((3 * n_w + (16 + 3) * n_groups) / n_w,
                                                   abs=1e-6)
    assert comp["sparsity"] is None and comp["export_bytes"] == {}

    # mixed per-group bits: the mean counts each group at its own width
    spec = WeightQuantSpec(bits=3, symmetric=True, granularity=PerGroup(4))
    q = torch.zeros(2, 8, dtype=torch.int8)
    bits = torch.tensor([[2, 4], [3, 3]])
    rec = QuantizedLinear(q, torch.ones(2, 2), None, spec, group_bits=bits)
    lin = torch.nn.Linear(8, 2)
    comp = compression_summary(lin, {"": rec}, {})
    assert comp["weight_bits_mean"] == pytest.approx((2 * 4 + 4 * 4 + 3 * 4 + 3 * 4) / 16)
    assert comp["params_total"] == 8 * 2 + 2
    assert "group_bits" in rec.features() and not rec.problems()
    rec.qweight[0, 0] = 2  # outside the 2-bit signed grid [-2, 1] of group (0, 0)
    assert any("outside" in p for p in rec.problems())
