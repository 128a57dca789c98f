"""The run end to end on a tiny Llama: results.json, exports that reload with the same logits,
atomic outputs, quant_out, recipe order, stage hooks, and guards against NaN."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import llmcq
from llmcq.algorithm import Algorithm
from llmcq.api import AlgorithmSpec
from llmcq.config.loader import resolve_config
from llmcq.errors import DataError, PluginError
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.runner import run
from llmcq.plugins import registry


def base_config(model: Path, data: Path, save: Path, **quant: Any) -> dict[str, Any]:
    q = {"method": "rtn", "weight": {"bit": 4, "symmetric": False, "granularity": "per_group",
                                     "group_size": 24}}
    q.update(quant)
    return {
        "base": {"seed": 0, "device": "cpu"},
        "model": {"type": "llama", "path": str(model)},
        "eval": {"eval_pos": ["pretrain", "fake_quant"], "name": "wikitext2",
                 "path": str(data / "wikitext2" / "test.txt"), "seq_len": 64, "bs": 2,
                 "num_samples": 6},
        "quant": q,
        "save": {"save_path": str(save)},
    }


def calib(data: Path, n: int = 4, seq_len: int = 64) -> dict[str, Any]:
    return {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
            "n_samples": n, "seq_len": seq_len, "preproc": "wikitext2_gptq", "bs": 2, "seed": 1}


@pytest.fixture
def tiny(tiny_llama_dir: Path) -> tuple[Any, Any]:
    return load_pretrained(ModelSource(tiny_llama_dir))


def ids(n: int = 2, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 500, (n, length), generator=torch.Generator().manual_seed(7))


def logits(model: Any, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def test_results_json_contract(llmcq_cli: Any, tmp_path: Path, tiny_llama_dir: Path,
                               shared_data: Path) -> None:
    cfg = base_config(tiny_llama_dir, shared_data, tmp_path / "out")
    cfg["save"].update({"save_fake": True, "save_trans": True})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = llmcq_cli("run", str(path))
    assert res.returncode == 0, res
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    for pos in ("pretrain", "fake_quant"):
        e = r["eval"][pos]["wikitext2"]
        assert isinstance(e["ppl"], float) and e["ppl"] > 1
        assert e["tokens"] == 6 * 64 and e["seq_len"] == 64
    assert r["eval"]["fake_quant"]["wikitext2"]["ppl"] != r["eval"]["pretrain"]["wikitext2"]["ppl"]
    assert {"load", "eval_pretrain", "quantize", "eval_fake_quant", "export_fake",
            "export_trans", "total"} <= set(r["timings_s"])
    assert all(isinstance(v, float) for v in r["timings_s"].values())
    assert isinstance(r["peak_memory_bytes"]["cpu"], int) and r["peak_memory_bytes"]["cpu"] > 0
    assert r["peak_memory_bytes"]["cuda"] is None
    assert r["config"]["quant"]["weight"]["group_size"] == 24
    assert {"llmcq", "llmcq-rtn", "llmcq-llama", "torch", "transformers"} <= set(r["versions"])
    assert r["quantized_linears"] == 2 * 7
    assert set(r["outputs"]) == {"fake", "trans"}
    assert "fake_quant   wikitext2" in res.stdout


def test_fake_and_trans_exports_reload_with_same_logits(tmp_path: Path, tiny_llama_dir: Path,
                                                        shared_data: Path, tiny: Any) -> None:
    from transformers import AutoModelForCausalLM

    model, tok = tiny
    x = ids()
    float_logits = logits(model, x)
    cfg = base_config(tiny_llama_dir, shared_data, tmp_path / "out")
    cfg["save"].update({"save_fake": True, "save_trans": True})
    run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
    fake_logits = logits(model, x)  # the model is now fake-quantized in place
    assert not torch.allclose(fake_logits, float_logits, atol=1e-3)
    fake = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "fake_quant_model"))
    trans = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "transformed_model"))
    assert torch.equal(logits(fake, x), fake_logits)
    assert torch.equal(logits(trans, x), float_logits)
    # no temporary folders left behind
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "fake_quant_model", "results.json", "transformed_model"]


def test_weight_activation_static_export_reloads(tmp_path: Path, tiny_llama_dir: Path,
                                                 shared_data: Path, tiny: Any) -> None:
    from llmcq_fake import load_fake_quant

    model, tok = tiny
    cfg = base_config(tiny_llama_dir, shared_data, tmp_path / "out",
                      act={"bit": 8, "symmetric": True, "granularity": "per_tensor",
                           "static": True})
    cfg["calib"] = calib(shared_data)
    cfg["save"]["save_fake"] = True
    run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
    x = ids()
    reloaded = load_fake_quant(tmp_path / "out" / "fake_quant_model")
    assert torch.equal(logits(reloaded, x), logits(model, x))
    q = reloaded.model.layers[1].self_attn.q_proj
    assert q.act.static and float(q.act_scale) > 0


def _static_scales(tmp_path: Path, model_dir: Path, data: Path, quant_out: bool) -> dict:
    model, tok = load_pretrained(ModelSource(model_dir))
    cfg = base_config(model_dir, data, tmp_path / f"out{quant_out}", quant_out=quant_out,
                      act={"bit": 8, "symmetric": True, "granularity": "per_tensor",
                           "static": True},
                      weight={"bit": 2, "symmetric": False, "granularity": "per_channel"})
    cfg["calib"] = calib(data)
    cfg["eval"]["eval_pos"] = ["fake_quant"]
    seen: dict[str, float] = {}

    class Spy:
        @llmcq.hookimpl
        def llmcq_evaluate(self, run: Any) -> list:
            seen.update({k: float(r.act_scale) for k, r in run.records.items()})
            return []

    run(resolve_config(cfg), progress=False, model=model, tokenizer=tok, extra_plugins=[Spy()])
    return seen


def test_quant_out_feeds_quantized_outputs_forward(tmp_path: Path, tiny_llama_dir: Path,
                                                   shared_data: Path) -> None:
    with_q = _static_scales(tmp_path, tiny_llama_dir, shared_data, True)
    without = _static_scales(tmp_path, tiny_llama_dir, shared_data, False)
    first = "model.layers.0.self_attn.q_proj"
    second = "model.layers.1.self_attn.q_proj"
    assert with_q[first] == without[first]  # block 0 sees the same embeddings
    assert with_q[second] != without[second]  # block 1 sees W2-quantized block-0 outputs


# ---------------------------------------------------------------- recipe order and hooks

CALLS: list[str] = []


class Probe(Algorithm):
    """Records the order of stages; scales up_proj rows by 2 and down_proj columns by 1/2
    (a function-preserving transform, since SiLU(gate) * up is linear in up)."""

    def transform_model(self, model: Any) -> None:
        CALLS.append(f"{self.step.name}:model")

    def calibrate(self, block: Any, inputs: Any) -> None:
        CALLS.append(f"{self.step.name}:calibrate:{block.index}")

    def transform(self, block: Any, inputs: Any) -> None:
        CALLS.append(f"{self.step.name}:transform:{block.index}")
        lin = block.linears()
        lin["mlp.up_proj"].weight.mul_(2.0)
        lin["mlp.down_proj"].weight.mul_(0.5)


@pytest.fixture
def probe_registered() -> Any:
    CALLS.clear()
    registry.register("llmcq.algorithms",
                      AlgorithmSpec(name="probe", impl=f"{__name__}:Probe", needs_calibration=True))
    yield
    registry.unregister("llmcq.algorithms", "probe")


def test_recipe_order_and_quantizer_choice(tmp_path: Path, tiny_llama_dir: Path,
                                           shared_data: Path, tiny: Any,
                                           probe_registered: Any) -> None:
    model, tok = tiny
    x = ids()
    before = logits(model, x)
    cfg = base_config(tiny_llama_dir, shared_data, tmp_path / "out", method=["probe", "rtn"])
    cfg["calib"] = calib(shared_data)
    cfg["eval"]["eval_pos"] = ["transformed"]
    cfg["save"]["save_trans"] = True

    class Spy:
        @llmcq.hookimpl
        def llmcq_quantize(self, step: Any, block: Any) -> None:
            CALLS.append(f"quantize:{step.name}:{block.index}")

    res = run(resolve_config(cfg), progress=False, model=model, tokenizer=tok,
              extra_plugins=[Spy()])
    assert CALLS == ["probe:model",
                     "probe:calibrate:0", "probe:transform:0", "quantize:rtn:0",
                     "probe:calibrate:1", "probe:transform:1", "quantize:rtn:1"]
    assert [s["method"] for s in res["recipe"]] == ["probe", "rtn"]
    assert [s["quantizes"] for s in res["recipe"]] == [False, True]
    # the transform changed the weights but not the function
    from transformers import AutoModelForCausalLM

    trans = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "transformed_model"))
    assert torch.allclose(logits(trans, x), before, atol=1e-4)
    assert not torch.equal(trans.model.layers[0].mlp.up_proj.weight,
                           AutoModelForCausalLM.from_pretrained(
                               str(tiny_llama_dir)).model.layers[0].mlp.up_proj.weight)


def test_a_plugin_may_take_over_quantize(tmp_path: Path, tiny_llama_dir: Path,
                                         shared_data: Path, tiny: Any) -> None:
    """llmcq_quantize is firstresult: a plugin returning records replaces the driver's."""
    from llmcq.quant.rtn import rtn_records
    from llmcq.quant.spec import PerChannel, WeightQuantSpec

    model, tok = tiny
    cfg = base_config(tiny_llama_dir, shared_data, tmp_path / "out")
    cfg["eval"]["eval_pos"] = ["fake_quant"]

    class MixedPrecision:
        @llmcq.hookimpl
        def llmcq_quantize(self, block: Any) -> Any:
            bits = 8 if block.index == 0 else 4
            return rtn_records(block.linears(), WeightQuantSpec(bits=bits, symmetric=True,
                                                                granularity=PerChannel()))

    seen: dict[str, int] = {}

    class Spy:
        @llmcq.hookimpl
        def llmcq_evaluate(self, run: Any) -> list:
            seen.update({k: r.bits for k, r in run.records.items()})
            return []

    run(resolve_config(cfg), progress=False, model=model, tokenizer=tok,
        extra_plugins=[MixedPrecision(), Spy()])
    assert seen["model.layers.0.mlp.up_proj"] == 8 and seen["model.layers.1.mlp.up_proj"] == 4


class NaNAlgo(Algorithm):
    def quantize(self, block: Any, inputs: Any) -> Any:
        from llmcq.quant.rtn import rtn_records

        recs = rtn_records(block.linears(), self.weight)
        recs["mlp.down_proj"].scale[0, 0] = float("nan")
        return recs


def test_nan_in_quantized_weights_is_caught_with_its_place(tmp_path: Path, tiny_llama_dir: Path,
                                                           shared_data: Path, tiny: Any) -> None:
    registry.register("llmcq.algorithms", AlgorithmSpec(name="nanalgo",
                                                        impl=f"{__name__}:NaNAlgo"))
    try:
        model, tok = tiny
        cfg = base_config(tiny_llama_dir, shared_data, tmp_path / "out", method="nanalgo")
        cfg["save"]["save_fake"] = True
        with pytest.raises(PluginError) as info:
            run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
        msg = str(info.value)
        assert "model.layers.0.mlp.down_proj" in msg and "NaN" in msg and "nanalgo" in msg
        assert not (tmp_path / "out" / "results.json").exists()
        assert not (tmp_path / "out" / "fake_quant_model").exists()
    finally:
        registry.unregister("llmcq.algorithms", "nanalgo")


def test_nan_in_calibration_activations_is_a_data_error(tmp_path: Path, tiny_llama_dir: Path,
                                                        shared_data: Path, tiny: Any) -> None:
    model, tok = tiny
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[3] = float("nan")
    cfg = base_config(tiny_llama_dir, shared_data, tmp_path / "out",
                      act={"bit": 8, "granularity": "per_tensor", "static": True})
    cfg["calib"] = calib(shared_data)
    cfg["eval"]["eval_pos"] = ["fake_quant"]
    with pytest.raises(DataError, match="model.layers.0"):
        run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)


# ---------------------------------------------------------------- atomic, overwrite

def test_failed_export_leaves_nothing_and_keeps_old_result(tmp_path: Path, tiny_llama_dir: Path,
                                                           shared_data: Path, tiny: Any) -> None:
    model, tok = tiny
    out = tmp_path / "out"
    old = out / "fake_quant_model"
    old.mkdir(parents=True)
    (old / "config.json").write_text("old")

    class Crash:
        @llmcq.hookimpl
        def llmcq_export(self, out_dir: Path) -> list:
            (out_dir / "half-written.bin").write_bytes(b"x" * 10)
            raise OSError("disk full")

    cfg = base_config(tiny_llama_dir, shared_data, out)
    cfg["save"]["save_fake"] = True
    cfg["eval"]["eval_pos"] = ["fake_quant"]
    resolved = resolve_config(cfg, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        run(resolved, progress=False, model=model, tokenizer=tok, extra_plugins=[Crash()])
    assert sorted(p.name for p in out.iterdir()) == ["fake_quant_model"]
    assert (old / "config.json").read_text() == "old"


def test_cli_refuses_to_overwrite_unless_told(llmcq_cli: Any, tmp_path: Path,
                                              tiny_llama_dir: Path, shared_data: Path) -> None:
    cfg = base_config(tiny_llama_dir, shared_data, tmp_path / "out")
    cfg["eval"]["eval_pos"] = ["fake_quant"]
    cfg["save"]["save_fake"] = True
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert llmcq_cli("run", str(path)).returncode == 0
    first = (tmp_path / "out" / "results.json").read_text()
    again = llmcq_cli("run", str(path), "--set", "quant.weight.bit=3")
    assert again.returncode == 2 and "already exist" in again.stderr
    assert (tmp_path / "out" / "results.json").read_text() == first
    forced = llmcq_cli("run", str(path), "--set", "quant.weight.bit=3", "--overwrite")
    assert forced.returncode == 0, forced
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    assert r["config"]["quant"]["weight"]["bit"] == 3


def test_cuda_device_requested_without_gpu_is_config_error(tmp_path: Path, tiny_llama_dir: Path,
                                                           shared_data: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from llmcq.errors import ConfigError

    cfg = base_config(tiny_llama_dir, shared_data, tmp_path / "out")
    cfg["base"]["device"] = "cuda"
    with pytest.raises(ConfigError, match="base.device"):
        run(resolve_config(cfg), progress=False)


@pytest.mark.gpu
def test_cuda_run_matches_cpu_reload(tmp_path: Path, tiny_llama_dir: Path,
                                     shared_data: Path) -> None:
    """On a GPU: blocks are processed on CUDA, the rest stays in host memory, and the fake
    export computed there reloads on the CPU with the same logits (float tolerance)."""
    from transformers import AutoModelForCausalLM

    cfg = base_config(tiny_llama_dir, shared_data, tmp_path / "out",
                      act={"bit": 8, "granularity": "per_token"})
    cfg["base"]["device"] = "auto"
    cfg["calib"] = calib(shared_data)
    cfg["save"]["save_fake"] = True
    cfg["quant"]["quant_out"] = True
    model, tok = load_pretrained(ModelSource(tiny_llama_dir))
    res = run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
    assert res["device"].startswith("cuda")
    assert res["peak_memory_bytes"]["cuda"] > 0
    assert next(model.parameters()).device.type == "cpu"  # handed back in host memory
    cpu_ppl = run(resolve_config({**cfg, "base": {"device": "cpu", "seed": 0},
                                  "save": {"save_path": str(tmp_path / "cpu")}}),
                  progress=False)["eval"]["fake_quant"]["wikitext2"]["ppl"]
    assert res["eval"]["fake_quant"]["wikitext2"]["ppl"] == pytest.approx(cpu_ppl, rel=1e-3)
    from llmcq_fake import load_fake_quant

    reloaded = load_fake_quant(tmp_path / "out" / "fake_quant_model")
    x = ids()
    assert torch.allclose(logits(reloaded, x), logits(model, x), atol=1e-4)
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "fake_quant_model"))
    assert plain.model.layers[0].self_attn.q_proj.weight.shape == (64, 64)


# ---------------------------------------------------------------- float targets in a recipe

SEEN: dict[str, Any] = {}


class Clipper(Algorithm):
    """An earlier step that changes the function in place (as AWQ's clipping does)."""

    def transform(self, block: Any, inputs: Any) -> None:
        SEEN.setdefault("before", {})[block.index] = {
            n: p.detach().clone() for n, p in block.module.named_parameters()}
        w = block.linears()["mlp.down_proj"].weight
        w.clamp_(-0.5 * float(w.abs().max()), 0.5 * float(w.abs().max()))


class Trainer(Algorithm):
    """A later step that trains against the float block (Algorithm.float_targets)."""

    float_targets = True

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        from llmcq import recon

        self.chain = recon.FloatChain()

    def transform(self, block: Any, inputs: Any) -> None:
        from llmcq.pipeline.blockwise import block_output

        t = self.chain.targets(block, inputs, quant_out=False, aug_loss=False)
        before = SEEN["before"][block.index]
        assert block.float_params is not None
        assert all(torch.equal(block.float_params[n], before[n]) for n in before)
        current = [block_output(block.module(h, **kw)) for h, kw in inputs.batches()]
        SEEN.setdefault("diff_float", []).append(max(
            float((a - b).abs().max()) for a, b in zip(t.target, current)))
        # the targets are the block before the clipping: rebuilt by hand
        from torch.func import functional_call

        ref = [block_output(functional_call(block.module, before, (h,), kw))
               for h, kw in inputs.batches()]
        SEEN.setdefault("equal_ref", []).append(all(
            torch.equal(a, b) for a, b in zip(t.target, ref)))


def test_float_targets_are_the_block_before_the_recipe_changed_it(
        tmp_path: Path, tiny_llama_dir: Path, shared_data: Path, tiny: Any) -> None:
    SEEN.clear()
    for name, cls in (("clipper", "Clipper"), ("trainer", "Trainer")):
        registry.register("llmcq.algorithms", AlgorithmSpec(
            name=name, impl=f"{__name__}:{cls}", needs_calibration=True))
    try:
        model, tok = tiny
        cfg = base_config(tiny_llama_dir, shared_data, tmp_path / "out",
                          method=["clipper", "trainer", "rtn"])
        cfg["calib"] = calib(shared_data)
        run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
    finally:
        for name in ("clipper", "trainer"):
            registry.unregister("llmcq.algorithms", name)
    assert SEEN["equal_ref"] == [True, True]
    assert min(SEEN["diff_float"]) > 0  # the clipped block answers differently
