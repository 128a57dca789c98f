"""ShortGPT: Block Influence as running sums equals a direct computation; the smaller model
(fewer blocks, config and layer indices renumbered) reloads in plain transformers with the
in-process logits, perplexity and KV-cache generation; ShortGPT + GPTQ quantizes the smaller
model; llmc's config runs with only paths changed; bad settings are refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.runner import run
from llmcq_shortgpt.solver import influence_sum, lowest

SEQ = 48


def _model_dir(root: Path, tok: Any, family: str = "llama", layers: int = 6, **kw: Any) -> Path:
    from llmcq.testing.tiny_models import save_tiny_model, tiny_family_config, tiny_llama_config

    if family == "llama":
        cfg = tiny_llama_config(vocab_size=len(tok), num_hidden_layers=layers, **kw)
    else:
        cfg = tiny_family_config(family, len(tok))
        cfg.num_hidden_layers = layers
        for k, v in kw.items():
            setattr(cfg, k, v)
    folder = root / f"{family}-{layers}"
    folder.mkdir()
    return save_tiny_model(folder, cfg, tok, seed=3, perturb_vectors=True)


def _config(model: Path, data: Path, save: Path, n: int = 2, *, mtype: str = "llama",
            quant: dict[str, Any] | None = None, **save_flags: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "base": {"seed": 0, "device": "cpu"},
        "model": {"type": mtype, "path": str(model)},
        "calib": {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                  "n_samples": 4, "seq_len": SEQ, "preproc": "wikitext2_gptq", "bs": 2,
                  "seed": 1},
        "eval": {"eval_pos": ["pretrain", "transformed"] + (["fake_quant"] if quant else []),
                 "name": "wikitext2", "path": str(data / "wikitext2" / "test.txt"),
                 "seq_len": 64, "bs": 2, "num_samples": 4},
        "sparse": {"method": "ShortGPT", "weight": {"n_prune_layers": n}},
        "save": {"save_path": str(save), **(save_flags or {"save_trans": True})},
    }
    if quant is not None:
        cfg["quant"] = quant
    return cfg


def _ids(vocab: int = 500) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(5))


def test_influence_sum_equals_the_direct_mean() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 16, generator=g)
    y = x + 0.7 * torch.randn(3, 50, 16, generator=g)
    y[1, 7] = 0.0  # no direction: counts as cosine 0.5 (llmc's nan_to_num(nan=0.5))
    s, n = influence_sum(x, y)
    cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)
    cos[1, 7] = 0.5
    assert n == 150 and s / n == pytest.approx(float((1 - cos).mean()), rel=1e-12)
    assert lowest([0.3, 0.1, 0.2, 0.1], 2) == [1, 3] and lowest([0.5, 0.2], 0) == []


def _calibration(model_dir: Path, data: Path) -> list[torch.Tensor]:
    from llmcq.config.schema import CalibSection
    from llmcq.data.datasets import DatasetSpec
    from llmcq.pipeline.runner import calibration_batches
    from llmcq.plugins import registry

    cfg = _config(model_dir, data, Path("unused"))
    dspec, _ = registry.load_spec("llmcq.datasets", "wikitext2", field="calib.name",
                                  kind=DatasetSpec)
    tok = load_pretrained(ModelSource(model_dir))[1]
    return calibration_batches(dspec.calibration_ids(tok, CalibSection(**cfg["calib"])), 2)


def test_pruned_model_reloads_with_equal_logits_ppl_and_cached_generation(
        tiny_tokenizer: Any, shared_data: Path, tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path, tiny_tokenizer)
    model, tok = load_pretrained(ModelSource(model_dir))
    # the direct computation: every block's input and output kept, whole-tensor cosines
    pairs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in range(6)}
    hooks = [layer.register_forward_hook(
        lambda m, a, k, out, i=i: pairs[i].append((k.get("hidden_states", a[0] if a else None),
                                                   out[0] if isinstance(out, tuple) else out)),
        with_kwargs=True) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for b in _calibration(model_dir, shared_data):
            model(input_ids=b, use_cache=False)
    for h in hooks:
        h.remove()
    direct = [float(torch.cat([1 - torch.nn.functional.cosine_similarity(
        x.double(), y.double(), dim=-1).flatten() for x, y in pairs[i]]).mean())
        for i in range(6)]

    out = run(resolve_config(_config(model_dir, shared_data, tmp_path / "o")), progress=False,
              model=model, tokenizer=tok)
    step = out["recipe"][0]
    assert step["block_influence"] == pytest.approx(direct, rel=1e-6)
    removed = sorted(range(6), key=lambda i: direct[i])[:2]
    assert step["removed_blocks"] == sorted(removed)
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]

    from transformers import AutoModelForCausalLM

    folder = tmp_path / "o" / "transformed_model"
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 4
    saved = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ids = _ids(len(tok))
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)
        # KV cache indexed by the renumbered layer_idx: cached greedy decoding == uncached
        cached = saved.generate(ids[:1, :8], max_new_tokens=6, do_sample=False, use_cache=True)
        plain = saved.generate(ids[:1, :8], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)
    # plain transformers on the saved folder gives the in-process perplexity
    again = _config(folder, shared_data, tmp_path / "o2")
    del again["sparse"], again["calib"]
    again["eval"]["eval_pos"] = ["pretrain"]
    again["save"] = {"save_path": str(tmp_path / "o2")}
    ppl = run(resolve_config(again), progress=False)["eval"]["pretrain"]["wikitext2"]["ppl"]
    assert ppl == pytest.approx(out["eval"]["transformed"]["wikitext2"]["ppl"], rel=1e-5)
    assert ppl != pytest.approx(out["eval"]["pretrain"]["wikitext2"]["ppl"], rel=1e-3)
    assert out["compression"]["params_total"] == sum(p.numel() for p in saved.parameters())


def test_per_layer_config_fields_follow_the_surviving_blocks(tiny_tokenizer: Any,
                                                             shared_data: Path,
                                                             tmp_path: Path) -> None:
    """Qwen2 with sliding-window attention on the layers from max_window_layers on:
    ``layer_types`` keeps the survivors' entries, ``max_window_layers`` counts the survivors
    below it, and the reloaded model attends exactly as the in-process one (sequences longer
    than the window)."""
    model_dir = _model_dir(tmp_path, tiny_tokenizer, "qwen2", layers=5, use_sliding_window=True,
                           sliding_window=8, max_window_layers=2,
                           layer_types=["full_attention"] * 2 + ["sliding_attention"] * 3)
    model, tok = load_pretrained(ModelSource(model_dir))
    out = run(resolve_config(_config(model_dir, shared_data, tmp_path / "o", n=2,
                                     mtype="qwen2")), progress=False, model=model, tokenizer=tok)
    kept = [i for i in range(5) if i not in out["recipe"][0]["removed_blocks"]]
    old = ["full_attention"] * 2 + ["sliding_attention"] * 3
    cfg = json.loads((tmp_path / "o" / "transformed_model" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg["layer_types"] == [old[i] for i in kept]
    assert cfg["max_window_layers"] == sum(1 for i in kept if i < 2)
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1, 2]
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(str(tmp_path / "o" / "transformed_model"))
    ids = _ids(len(tok))
    with torch.no_grad():
        torch.testing.assert_close(saved.eval()(input_ids=ids).logits,
                                   model(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_shortgpt_then_gptq_quantizes_the_smaller_model(tiny_tokenizer: Any, shared_data: Path,
                                                         tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path, tiny_tokenizer)
    quant = {"method": "gptq", "weight": {"bit": 4, "symmetric": True,
                                          "granularity": "per_group", "group_size": 32},
             "special": {"actorder": False}}
    out = run(resolve_config(_config(model_dir, shared_data, tmp_path / "o", quant=quant,
                                     save_fake=True, save_vllm=True)), progress=False)
    assert out["compression"]["linears_quantized"] == 4 * 7
    assert out["compression"]["weight_bits_mean"] == 4.0
    from llmcq_vllm.reload import load_dequantized
    from transformers import AutoModelForCausalLM

    fake = AutoModelForCausalLM.from_pretrained(str(tmp_path / "o" / "fake_quant_model"))
    vllm = load_dequantized(tmp_path / "o" / "vllm_quant_model")
    assert fake.config.num_hidden_layers == vllm.config.num_hidden_layers == 4
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(vllm(input_ids=ids).logits, fake.eval()(input_ids=ids).logits,
                                   rtol=0, atol=1e-4)


def test_block_ids_of_per_linear_settings_name_the_smaller_model(tiny_tokenizer: Any,
                                                                 shared_data: Path,
                                                                 tmp_path: Path) -> None:
    """ignored_layers binds after the blocks are removed: block 3 of the 4-block model."""
    import llmcq

    class Spy:
        @llmcq.hookimpl
        def llmcq_evaluate(self, run: Any) -> list:
            self.records = sorted(run.records)
            return []

    model_dir = _model_dir(tmp_path, tiny_tokenizer)
    cfg = _config(model_dir, shared_data, tmp_path / "o",
                  quant={"method": "rtn", "weight": {"bit": 4, "symmetric": True,
                                                     "granularity": "per_channel"}})
    cfg["ignored_layers"] = {"block_ids": [3], "layer_names": ["mlp.down_proj"]}
    spy = Spy()
    out = run(resolve_config(cfg), progress=False, extra_plugins=[spy])
    assert out["compression"]["linears_quantized"] == 4 * 7 - 1
    assert "model.layers.3.mlp.down_proj" not in spy.records
    assert "model.layers.2.mlp.down_proj" in spy.records
    assert not any(r.startswith(("model.layers.4.", "model.layers.5.")) for r in spy.records)
    # block 5 of the unpruned model does not exist any more: the rule names nothing
    cfg["ignored_layers"] = {"block_ids": [5], "layer_names": ["mlp.down_proj"]}
    cfg["save"]["save_path"] = str(tmp_path / "o5")
    with pytest.raises(ConfigError) as err:
        run(resolve_config(cfg), progress=False)
    assert "ignored_layers" in err.value.path


LLMC_SHORTGPT = """
base:
    seed: &seed 42
model:
    type: Llama
    path: {model}
    torch_dtype: auto
calib:
    name: pileval
    download: False
    path: {calib}
    n_samples: 128
    bs: -1
    seq_len: 512
    preproc: txt_general_preproc
    seed: *seed
eval:
    eval_pos: [transformed]
    name: [wikitext2, c4]
    download: False
    path: {eval}
    seq_len: 2048
sparse:
    method: ShortGPT
    weight:
        n_prune_layers: 9
save:
    save_trans: True
    save_fp: False
    save_lightllm: False
    save_path: {save}
"""


def test_llmc_config_resolves_with_only_paths_changed(tiny_tokenizer: Any, shared_data: Path,
                                                      tmp_path: Path) -> None:
    """llmc's configs/sparsification/methods/ShortGPT/shortgpt.yml, paths filled in (C4's
    train documents stand in for the Pile); resolved, its plan is llmc's: ShortGPT removing
    9 blocks, calibrated on 128 x 512 tokens, saved with save_trans."""
    text = LLMC_SHORTGPT.format(model=_model_dir(tmp_path, tiny_tokenizer, layers=12),
                                calib=shared_data / "c4", eval=shared_data,
                                save=tmp_path / "o")
    resolved = resolve_config(yaml.safe_load(text))
    assert [s.spec.name for s in resolved.steps] == ["shortgpt"]
    assert resolved.specs.sparsity.n_prune_layers == 9
    assert [b.name for b in resolved.backends] == ["trans"]


def test_bad_settings_are_refused(tiny_tokenizer: Any, shared_data: Path,
                                  tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path, tiny_tokenizer, layers=3)
    cfg = _config(model_dir, shared_data, tmp_path / "o")
    cfg["sparse"]["weight"] = {}
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg)
    assert err.value.path == "sparse.weight.n_prune_layers"
    cfg["sparse"]["weight"] = {"n_prune_layers": 1, "sparsity": 0.5}
    with pytest.raises(ConfigError) as err:  # a key ShortGPT does not honour
        resolve_config(cfg)
    assert err.value.path == "sparse.weight.sparsity" and "shortgpt" in str(err.value)
    # ShortGPT touches no grid: activation quantization and FP8 after it are accepted
    for quant in ({"method": "smoothquant", "weight": {"bit": 8, "symmetric": True,
                                                       "granularity": "per_channel"},
                   "act": {"bit": 8, "symmetric": True, "granularity": "per_token"}},
                  {"method": "rtn", "weight": {"bit": "e4m3", "symmetric": True,
                                               "granularity": "per_channel",
                                               "quant_type": "float-quant"}}):
        ok = {**cfg, "quant": quant, "sparse": {"method": "ShortGPT",
                                                "weight": {"n_prune_layers": 1}}}
        assert [s.spec.name for s in resolve_config(ok).steps][0] == "shortgpt"
    cfg["sparse"]["weight"] = {"n_prune_layers": 3}  # the model has 3 blocks
    with pytest.raises(ConfigError) as err:
        run(resolve_config(cfg), progress=False)
    assert err.value.path == "sparse.weight.n_prune_layers" and "1 to 2" in str(err.value)


@pytest.mark.slow
def test_bundled_model_lowest_influence_blocks_cost_least(smollm2_copy: Any, shared_data: Path,
                                                         tmp_path: Path) -> None:
    """SmolLM2-135M, 1 x 256 calibration tokens: removing the 3 blocks of lowest influence
    costs less perplexity (2 held-out windows of 256 tokens) than removing the 3 of highest
    influence or the last 3 blocks, each evaluated through the pipeline on the smaller
    model."""
    from llmcq.model.remove_blocks import remove_blocks

    def evaluate(model: Any, tok: Any, save: Path) -> float:
        cfg = {"model": {"type": "llama"},
               "eval": {"eval_pos": ["pretrain"], "name": "wikitext2",
                        "path": str(shared_data / "wikitext2" / "test.txt"), "seq_len": 256,
                        "num_samples": 2},
               "save": {"save_path": str(save)}}
        res = run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
        return float(res["eval"]["pretrain"]["wikitext2"]["ppl"])

    model, tok = smollm2_copy()
    cfg = {"model": {"type": "llama"},
           "calib": {"name": "wikitext2", "path": str(shared_data / "wikitext2" / "valid.txt"),
                     "n_samples": 1, "seq_len": 256, "preproc": "wikitext2_gptq", "bs": 1,
                     "seed": 0},
           "eval": {"eval_pos": ["transformed"], "name": "wikitext2",
                    "path": str(shared_data / "wikitext2" / "test.txt"), "seq_len": 256,
                    "num_samples": 2},
           "sparse": {"method": "ShortGPT", "weight": {"n_prune_layers": 3}},
           "save": {"save_path": str(tmp_path / "o")}}
    out = run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
    bi = out["recipe"][0]["block_influence"]
    assert len(bi) == 30 and len(model.model.layers) == 27
    low = out["eval"]["transformed"]["wikitext2"]["ppl"]
    high_model, tok = smollm2_copy()
    remove_blocks(high_model, "model.layers", sorted(range(30), key=lambda i: -bi[i])[:3])
    high = evaluate(high_model, tok, tmp_path / "h")
    last_model, tok = smollm2_copy()
    remove_blocks(last_model, "model.layers", [27, 28, 29])
    last = evaluate(last_model, tok, tmp_path / "l")
    print(f"BI {[round(v, 3) for v in bi]}; ppl removing the 3 lowest {low:.2f}, "
          f"the 3 highest {high:.2f}, the last 3 {last:.2f}")
    assert low < last < high
