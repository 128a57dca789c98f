"""Wanda through the pipeline on the tiny Llama: exact structure per row and per N:M group,
the mask is the one Wanda's formula gives on the block's calibration inputs, a following
GPTQ keeps the pruned weights at zero, llmc's Wanda config runs with only its paths changed,
bad keys fail at config time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from llmcq.config.loader import apply_overrides, parse_overrides, resolve_config
from llmcq.errors import ConfigError
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.runner import run
from llmcq.sparsity import NM, SparsitySpec, Unstructured
from llmcq.sparsity.masks import mask_from_scores, structure_violations
from llmcq.testing.paths import shipped_config
from llmcq_wanda.solver import accumulate_sq_norms, wanda_scores

REPO = Path(__file__).resolve().parents[4]


def _config(model: Path, data: Path, save: Path, weight: dict[str, Any],
            quant: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "base": {"seed": 0, "device": "cpu"},
        "model": {"type": "llama", "path": str(model)},
        "calib": {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                  "n_samples": 4, "seq_len": 64, "preproc": "wikitext2_gptq", "bs": 2,
                  "seed": 1},
        "sparse": {"method": "Wanda", "weight": weight},
        "save": {"save_path": str(save), "save_trans": True},
    }
    if quant is not None:
        cfg["quant"] = quant
        cfg["save"]["save_fake"] = True
    return cfg


def _linears(model: Any) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n}


def test_running_sums_and_scores() -> None:
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 5, 8, generator=g) for _ in range(3)]
    acc = None
    for x in xs:
        acc = accumulate_sq_norms(acc, x)
    full = torch.cat([x.reshape(-1, 8) for x in xs])
    torch.testing.assert_close(acc, full.double().square().sum(0))
    W = torch.randn(4, 8, generator=g)
    torch.testing.assert_close(wanda_scores(W, acc),
                               W.abs() * full.norm(dim=0)[None, :], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weight", [{"sparsity": 0.3},
                                    {"mask_structure": "2:4"}, {"mask_structure": "4:8"}])
def test_structure_and_the_mask_wanda_defines(weight: dict[str, Any], tiny_llama_dir: Path,
                                              shared_data: Path, tmp_path: Path) -> None:
    cfg = _config(tiny_llama_dir, shared_data, tmp_path / "o", weight)
    resolved = resolve_config(cfg)
    dense, _ = load_pretrained(ModelSource(tiny_llama_dir))
    # Wanda's scores on block 0, by hand: the dense block's inputs are the model's
    norms: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Any:
        def fn(_m: Any, args: tuple[Any, ...], _out: Any) -> None:
            norms[name] = accumulate_sq_norms(norms.get(name), args[0])
        return fn

    from llmcq.config.schema import CalibSection
    from llmcq.data.datasets import DatasetSpec
    from llmcq.pipeline.runner import calibration_batches
    from llmcq.plugins import registry

    dspec, _ = registry.load_spec("llmcq.datasets", "wikitext2", field="calib.name",
                                  kind=DatasetSpec)
    tok = load_pretrained(ModelSource(tiny_llama_dir))[1]
    batches = calibration_batches(dspec.calibration_ids(tok, CalibSection(**cfg["calib"])), 2)
    block0 = {n: m for n, m in _linears(dense).items() if ".layers.0." in n}
    handles = [m.register_forward_hook(hook(n)) for n, m in block0.items()]
    with torch.no_grad():
        for b in batches:
            dense(b)
    for h in handles:
        h.remove()

    out = run(resolved, progress=False)
    spec = resolved.specs.sparsity
    assert spec is not None
    trans, _ = load_pretrained(ModelSource(tmp_path / "o" / "transformed_model"))
    for name, lin in _linears(trans).items():
        w, w0 = lin.weight, dense.get_submodule(name).weight
        zero = w == 0
        assert torch.equal(w[~zero], w0[~zero])  # no updates: survivors untouched
        if isinstance(spec.structure, NM):
            assert structure_violations(~zero, spec.structure) == 0
            m = spec.structure.m
            assert (zero.reshape(w.shape[0], -1, m).sum(-1) == m - spec.structure.n).all()
        else:
            assert (zero.sum(1) == round(spec.sparsity * w.shape[1])).all()
        if name in block0:
            expect = mask_from_scores(wanda_scores(w0, norms[name]), spec)
            assert torch.equal(~zero, expect), name
    assert out["compression"]["mask_sparsity"] == pytest.approx(spec.sparsity, abs=0.01)


def test_wanda_then_gptq_keeps_pruned_weights_at_zero(tiny_llama_dir: Path, shared_data: Path,
                                                       tmp_path: Path) -> None:
    quant = {"method": "GPTQ", "weight": {"bit": 4, "symmetric": False,
                                          "granularity": "per_group", "group_size": 32}}
    cfg = _config(tiny_llama_dir, shared_data, tmp_path / "o", {"sparsity": 0.5}, quant)
    out = run(resolve_config(cfg), progress=False)
    assert out["compression"]["mask_sparsity"] == pytest.approx(0.5)
    fake, _ = load_pretrained(ModelSource(tmp_path / "o" / "fake_quant_model"))
    trans, _ = load_pretrained(ModelSource(tmp_path / "o" / "transformed_model"))
    for name, lin in _linears(fake).items():
        pruned = trans.get_submodule(name).weight == 0
        assert (lin.weight[pruned] == 0).all()
        assert (pruned.sum(1) == lin.weight.shape[1] // 2).all()
        assert (lin.weight != 0).float().mean() > 0.4  # GPTQ quantized the kept weights


def test_llmc_wanda_config_runs_with_only_paths_changed(tiny_llama_dir: Path,
                                                         shared_data: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    monkeypatch.chdir(REPO)
    raw = shipped_config(REPO / "configs" / "sparse" / "llmc" / "wanda.yml", shared_data)
    raw["model"]["path"] = str(tiny_llama_dir)
    raw["save"]["save_path"] = str(tmp_path / "out")
    resolved = resolve_config(raw)
    assert resolved.specs.sparsity == SparsitySpec(0.5, Unstructured())
    quick = ["calib.n_samples=4", "calib.seq_len=32", "eval.seq_len=64", "eval.num_samples=1"]
    res = run(resolve_config(apply_overrides(raw, parse_overrides(quick))), progress=False)
    assert res["compression"]["mask_sparsity"] == pytest.approx(0.5)
    assert set(res["eval"]["transformed"]) == {"wikitext2", "c4"}


@pytest.mark.parametrize("sparse,path", [
    ({"method": "Wanda", "weight": {"n_prune_layers": 1}}, "sparse.weight.n_prune_layers"),
    ({"method": "Wanda", "weight": {"mask_structure": "4:2"}}, "sparse.weight.mask_structure"),
    ({"method": "Wanda", "weight": {"sparsity": 1.5}}, "sparse.weight.sparsity"),
    ({"method": "Wanda", "weight": {"sparsity": 0.5}, "special": {"alpha": 1}},
     "sparse.special.alpha"),
])
def test_bad_keys_fail_at_config_time(sparse: dict[str, Any], path: str, tiny_llama_dir: Path,
                                      shared_data: Path, tmp_path: Path) -> None:
    cfg = _config(tiny_llama_dir, shared_data, tmp_path / "o", {})
    cfg["sparse"] = sparse
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg)
    assert path in str(err.value)
