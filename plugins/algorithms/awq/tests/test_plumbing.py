"""AWQ through ``run()`` on the tiny GQA Llama: the transform is function-preserving without
clipping (the exported transformed model reloads with the float logits), v_proj -> o_proj is
scaled under GQA, weight-activation runs, clipping stays inside the searched ranges, and
saved scales/clips reproduce the same model without calibration data."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

import llmcq
from llmcq.artefacts import load_artefact
from llmcq.config.loader import resolve_config
from llmcq.errors import OutputExistsError
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.runner import run
from llmcq.quant.qparams import group_view
from llmcq.quant.spec import PerGroup

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def config(model: Path, data: Path, save: Path, *, calib: bool = True,
           **special: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "base": {"seed": 0, "device": "cpu"},
        "model": {"type": "llama", "path": str(model)},
        "eval": {"eval_pos": ["fake_quant"], "name": "wikitext2",
                 "path": str(data / "wikitext2" / "test.txt"), "seq_len": 64,
                 "num_samples": 4},
        "quant": {"method": "awq",
                  "weight": {"bit": 3, "symmetric": False, "granularity": "per_group",
                             "group_size": 16},
                  "special": {"n_grid": 10, **special}},
        "save": {"save_path": str(save)},
    }
    if calib:
        cfg["calib"] = {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                        "n_samples": 4, "seq_len": 64, "preproc": "wikitext2_gptq", "bs": 2,
                        "seed": 1}
    return cfg


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path) -> tuple[Any, Any]:
    return load_pretrained(ModelSource(tiny_llama_dir))


def ids() -> torch.Tensor:
    return torch.randint(0, 500, (2, 48), generator=torch.Generator().manual_seed(3))


def logits(model: Any, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def weights(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_transform_is_function_preserving_and_scales_gqa_v_to_o(
        tiny: Any, tiny_llama_dir: Path, shared_data: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    kv, heads = model.config.num_key_value_heads, model.config.num_attention_heads
    assert kv < heads
    x = ids()
    float_logits = logits(model, x)
    before = weights(model)
    cfg = config(tiny_llama_dir, shared_data, tmp_path / "out", do_gqa_trans=True,
                 save_scale=True, scale_path=str(tmp_path / "scales"))
    cfg["eval"]["eval_pos"] = ["transformed", "fake_quant"]
    cfg["save"]["save_trans"] = True
    res = run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
    trans = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "transformed_model"))
    assert torch.allclose(logits(trans, x), float_logits, atol=1e-4, rtol=1e-4)

    # every weight is exactly its float weight with the saved scales folded in
    after = weights(trans)
    scales = torch.load(tmp_path / "scales" / "scales.pth")
    assert any(not torch.allclose(s, torch.ones_like(s)) for s in scales.values())
    for i in range(2):
        p = f"model.layers.{i}."
        s = {n: scales[p + n] for n in LINEARS}
        assert torch.equal(s["self_attn.q_proj"], s["self_attn.v_proj"])
        kv_s = s["self_attn.o_proj"].view(kv, heads // kv, -1)[:, 0].reshape(-1)
        assert torch.equal(kv_s.view(kv, 1, -1).expand(kv, heads // kv, -1).reshape(-1),
                           s["self_attn.o_proj"])  # GQA: one scale per kv channel
        rows = {"self_attn.v_proj": kv_s, "mlp.up_proj": s["mlp.down_proj"]}
        for n in LINEARS:
            want = before[p + n + ".weight"] * s[n].view(1, -1)
            if n in rows:
                want = want / rows[n].view(-1, 1)
            assert torch.allclose(after[p + n + ".weight"], want, rtol=1e-5, atol=1e-7), n
        for norm, n in (("input_layernorm", "self_attn.q_proj"),
                        ("post_attention_layernorm", "mlp.gate_proj")):
            assert torch.allclose(after[p + norm + ".weight"],
                                  before[p + norm + ".weight"] / s[n], rtol=1e-5)
    summary = res["recipe"][0]
    assert summary["method"] == "awq" and not summary["quantizes"]
    assert summary["groups_scaled"] == 8 and "groups_skipped_gqa" not in summary
    assert summary["scale_file"] == str(tmp_path / "scales" / "scales.pth")
    assert res["eval"]["transformed"]["wikitext2"]["ppl"] != \
        res["eval"]["fake_quant"]["wikitext2"]["ppl"]


def test_gqa_group_is_skipped_by_default(tiny: Any, tiny_llama_dir: Path, shared_data: Path,
                                         tmp_path: Path) -> None:
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    before = weights(model)
    res = run(resolve_config(config(tiny_llama_dir, shared_data, tmp_path / "out")),
              progress=False, model=model, tokenizer=tok)
    summary = res["recipe"][0]
    assert summary["groups_scaled"] == 6 and summary["groups_skipped_gqa"] == 2
    # the fake-quantized o_proj is RTN of the untouched float o_proj
    from llmcq.quant.qparams import fake_quantize_weight
    from llmcq.quant.spec import WeightQuantSpec

    spec = WeightQuantSpec(bits=3, symmetric=False, granularity=PerGroup(16))
    o = model.model.layers[0].self_attn.o_proj.weight
    want = fake_quantize_weight(before["model.layers.0.self_attn.o_proj.weight"], spec)
    assert torch.allclose(o, want, atol=1e-6)


def test_weight_activation_runs_and_stays_function_preserving(
        tiny: Any, tiny_llama_dir: Path, shared_data: Path, tmp_path: Path) -> None:
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    x = ids()
    float_logits = logits(model, x)
    cfg = config(tiny_llama_dir, shared_data, tmp_path / "out", do_gqa_trans=True,
                 trans_version="v1")
    cfg["quant"]["weight"] = {"bit": 4, "symmetric": True, "granularity": "per_channel"}
    cfg["quant"]["act"] = {"bit": 4, "symmetric": True, "granularity": "per_token"}
    cfg["eval"]["eval_pos"] = ["transformed", "fake_quant"]
    seen: dict[str, Any] = {}

    class Spy:
        @llmcq.hookimpl
        def llmcq_evaluate(self, run: Any, model: Any, position: str) -> list:
            if position == "transformed":
                seen["logits"] = logits(model, x)
            return []

    res = run(resolve_config(cfg), progress=False, model=model, tokenizer=tok,
              extra_plugins=[Spy()])
    assert torch.allclose(seen["logits"], float_logits, atol=1e-4, rtol=1e-4)
    assert res["recipe"][0]["groups_scaled"] == 8
    assert model.model.layers[0].mlp.down_proj.act.bits == 4


def test_clip_save_and_load_reproduce_the_model(tiny: Any, tiny_llama_dir: Path,
                                                shared_data: Path, tmp_path: Path) -> None:
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    x = ids()
    float_logits = logits(model, x)
    saved = tmp_path / "saved"
    cfg = config(tiny_llama_dir, shared_data, tmp_path / "a", do_gqa_trans=True,
                 weight_clip=True, clip_sym=False, save_scale=True, scale_path=str(saved),
                 save_clip=True, clip_path=str(saved))
    cfg["eval"]["eval_pos"] = []
    cfg["save"]["save_trans"] = True
    spy = _RunSpy()
    res = run(resolve_config(cfg), progress=False, model=model, tokenizer=tok,
              extra_plugins=[spy])
    assert res["recipe"][0]["linears_clipped"] == 2 * 5  # q/k are never clipped
    scales = torch.load(saved / "scales.pth")
    clips = torch.load(saved / "clips.pth")
    # the files are core's artefact files of what AWQ published on run.artefacts
    store = spy.run.artefacts
    for kind in ("scales", "clips"):
        published, on_disk = store.get(kind, producer="awq"), load_artefact(kind, saved)
        assert published and set(published) == set(on_disk)
        for name, v in published.items():
            pairs = zip(v, on_disk[name], strict=True) if kind == "clips" else [(v, on_disk[name])]
            assert all(torch.equal(a, b) for a, b in pairs), name
        assert store.get(kind, producer="someone-else") == {}
    block1 = {k.removeprefix("model.layers.1."): v for k, v in published.items()
              if k.startswith("model.layers.1.")}
    assert set(block1) == {n for n in LINEARS if n not in ("self_attn.q_proj",
                                                              "self_attn.k_proj")}
    assert set(scales) == {f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS}
    assert set(clips) == {f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS
                          if n not in ("self_attn.q_proj", "self_attn.k_proj")}
    assert scales["model.layers.0.self_attn.o_proj"].shape == (64,)
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(str(tmp_path / "a" / "transformed_model"))
    assert not torch.allclose(logits(a, x), float_logits, atol=1e-4)  # clipping changed it
    for name, c in clips.items():  # every clipped group lies inside its searched range
        w = group_view(a.get_submodule(name).weight.detach(), PerGroup(16))
        assert (w.amax(-1) <= c["hi"] + 1e-6).all() and (w.amin(-1) >= c["lo"] - 1e-6).all()
        assert (c["hi"] - c["lo"] > 0).all()

    # a second run applies them without searching and without calibration data
    model_b = copy.deepcopy(tiny[0])
    cfg_b = config(tiny_llama_dir, shared_data, tmp_path / "b", calib=False,
                   do_gqa_trans=True, weight_clip=True, clip_sym=False, load_scale=True,
                   scale_path=str(saved), load_clip=True, clip_path=str(saved))
    cfg_b["eval"]["eval_pos"] = []
    resolved = resolve_config(cfg_b)
    assert not resolved.needs_calibration
    run(resolved, progress=False, model=model_b, tokenizer=tok)
    b = weights(model_b)  # fake-quantized in place: compare with a's fake-quantized weights
    for k, v in weights(model).items():
        assert torch.allclose(b[k], v, atol=1e-6), k

    # saving again into the same folder needs --overwrite
    cfg["save"]["save_path"] = str(tmp_path / "c")
    with pytest.raises(OutputExistsError, match="scales.pth"):
        run(resolve_config(cfg), progress=False, model=copy.deepcopy(tiny[0]), tokenizer=tok)


class _RunSpy:
    run: Any = None

    @llmcq.hookimpl
    def llmcq_calibrate(self, run: Any) -> None:
        self.run = run


def test_awq_then_rtn_with_per_method_special(tiny: Any, tiny_llama_dir: Path,
                                              shared_data: Path, tmp_path: Path) -> None:
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    cfg = config(tiny_llama_dir, shared_data, tmp_path / "out")
    cfg["quant"]["method"] = ["Awq", "RTN"]
    cfg["quant"]["special"] = {"Awq": {"n_grid": 4, "weight_clip": True}}
    res = run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
    assert [(r["method"], r["quantizes"]) for r in res["recipe"]] == [("awq", False),
                                                                      ("rtn", True)]
    assert res["recipe"][0]["linears_clipped"] == 10
    assert res["quantized_linears"] == 14
