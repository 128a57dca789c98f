"""Data-parallel calibration through the real command line: ``torchrun --standalone
--nproc-per-node 2 --no-python llmcq run cfg.yaml`` (two gloo ranks on the CPU, each
calibrating on every other batch) against plain ``llmcq run cfg.yaml`` (one process, every
batch), on the tiny 2-block Llama, for SmoothQuant, OS+, GPTQ, AWQ and OmniQuant.

Compared: every tensor of the exported transformed float model (``save_trans``) and of the
fake-quantized model (``save_fake``), and its ``llmcq_quant.json`` (static activation
scales, OWQ's float columns), which must be equal for every method.

* SmoothQuant and OS+ fit only max/min statistics (and OS+'s threshold on per-batch losses
  gathered and added in one process's batch order): **bit-identical** exports.
* GPTQ and AWQ fit on sums over tokens, which two ranks add in another order than one
  process (float32 rounding, ~1e-7 relative; measured: 3e-7). Transformed weights: within
  ``TRANS_RTOL`` relative. Fake-quant weights, in grid steps (each group's
  ``(max - min) / (2^b - 1)``): a value whose code is unchanged moves by at most
  ``FLOAT_STEPS`` (its scale and zero rounded differently; measured: 1.3e-5); a rounding
  difference at a near-tie may move a code by one step (GPTQ's error feedback then shifts
  that row's later columns by float amounts), on at most ``1 - CODE_AGREE`` of the
  weights (measured: none).
* OmniQuant trains. Under ``torchrun`` core's harness (``llmcq.recon``) averages every
  step's gradients over the ranks: 2 ranks with ``bs`` b take the steps one process takes
  with ``bs`` 2b (the loss is a mean over equal-sized batches; batches 2i and 2i + 1 are
  one process's batch i), so that is the one-process run it is compared with, to the same
  tolerances (measured: 1e-6 steps, no flip; against one process at ``bs`` b, i.e. other
  steps, 0.04 steps and 0.25% of the codes flipped, so the test tells the two apart).

One CLI pair per algorithm (each process start costs seconds: torch and transformers
imports), 8 samples of 32 tokens in 4 batches (2 per rank), 1 OmniQuant epoch; the texts
are the heads of ``../shared/data``'s wikitext2 files (tokenizing the whole files would
cost every process seconds).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from llmcq.testing.gloo import run_ranks

#: sum-reduced methods' transformed (float) weights: a reordered float32 sum, through the
#: scale search's pow/div (measured 3e-7; far below bf16/fp16 resolution)
TRANS_RTOL = 1e-5
#: fake-quant weights whose code is unchanged: scale/zero rounding, in grid steps
FLOAT_STEPS = 1e-3
#: fraction of fake-quant weights whose code must be unchanged (a flip is one step)
CODE_AGREE = 0.99

W3G32 = {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 32}
W8 = {"bit": 8, "symmetric": True, "granularity": "per_channel"}

QUANT: dict[str, dict[str, Any]] = {
    # static per-tensor activation ranges: core's ActRangeObserver (min/max-reduced) too
    "smoothquant": {"method": "SmoothQuant", "weight": W8,
                    "act": {"bit": 8, "symmetric": True, "granularity": "per_tensor",
                            "static": True},
                    "special": {"alpha": 0.8, "true_sequential": True}},
    # search_batches 3 of 4: rank 0 scores global batches 0 and 2, rank 1 batch 1 (with
    # search_batches 1, rank 1 scores none: also bit-identical, checked once by hand)
    "osplus": {"method": "OsPlus", "weight": W8,
               "act": {"bit": 8, "symmetric": True, "granularity": "per_token"},
               "special": {"true_sequential": True, "search_batches": 3, "search_steps": 20}},
    # OWQ's float columns are ranked on the (reduced) Hessians
    "gptq": {"method": "GPTQ", "weight": W3G32,
             "special": {"actorder": True, "true_sequential": True, "owq": True,
                         "owq_ratio": 0.05}},
    "awq": {"method": "Awq", "weight": W3G32,
            "special": {"trans": True, "weight_clip": True, "n_grid": 10}},
    # lwc_lr 0.1 (llmc: 0.01): one epoch then moves the clipping factors enough that a
    # different step schedule shows
    "omniquant": {"method": "OmniQuant",
                  "weight": {**W3G32, "calib_algo": "learnable", "ste": True},
                  "special": {"lwc": True, "let": False, "epochs": 1, "lwc_lr": 0.1},
                  "quant_out": True},
}


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """The first 64 kB of wikitext2's validation and test files, as ``wikitext2/*.txt``."""
    folder = tmp_path_factory.mktemp("texts") / "wikitext2"
    folder.mkdir()
    for name in ("valid.txt", "test.txt"):
        text = (shared_data / "wikitext2" / name).read_text()[:64_000]
        (folder / name).write_text(text)
    return folder.parent


def _config(tmp: Path, name: str, model: Path, data: Path, *, bs: int = 2,
            evaluate: bool = False) -> Path:
    import yaml

    cfg: dict[str, Any] = {
        "base": {"seed": 0, "device": "cpu"},
        "model": {"type": "llama", "path": str(model)},
        "calib": {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                  "n_samples": 8, "seq_len": 32, "bs": bs, "preproc": "wikitext2_gptq",
                  "seed": 1},
        "quant": QUANT[name.split("-")[0]],
        "save": {"save_path": str(tmp / name), "save_trans": True, "save_fake": True},
    }
    if evaluate:
        cfg["eval"] = {"eval_pos": ["fake_quant"], "name": "wikitext2",
                       "path": str(data / "wikitext2" / "test.txt"), "seq_len": 64,
                       "num_samples": 4}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _bin(name: str) -> str:
    exe = shutil.which(name, path=str(Path(sys.executable).parent))
    assert exe, f"{name} is not installed beside {sys.executable}"
    return exe


def _cli(args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "XDG_CACHE_HOME": str(tmp / "xdg-cache")}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def _run_pair(tmp: Path, algo: str, model: Path, data: Path, *, bs_one: int = 2,
              evaluate: bool = False) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    """``llmcq run`` (one process, ``calib.bs = bs_one``) and ``torchrun --standalone
    --nproc-per-node 2 --no-python llmcq run`` (``calib.bs = 2``); their save folders and
    the torchrun output. ``--standalone`` picks a free rendezvous port itself."""
    one = _config(tmp, f"{algo}-1", model, data, bs=bs_one, evaluate=evaluate)
    two = _config(tmp, f"{algo}-2", model, data, evaluate=evaluate)
    _cli([_bin("llmcq"), "run", str(one), "--no-progress"], tmp)
    proc = _cli([_bin("torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python",
                 _bin("llmcq"), "run", str(two), "--no-progress"], tmp)
    return tmp / f"{algo}-1", tmp / f"{algo}-2", proc


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    assert out, f"no safetensors in {folder}"
    return out


def _quant_meta(folder: Path) -> dict[str, Any]:
    """``llmcq_quant.json`` of a fake-quant export: per layer, the grid, the activation
    settings and static scale, the record's features (OWQ's float-column indices)."""
    meta = json.loads((folder / "fake_quant_model" / "llmcq_quant.json").read_text())
    assert len(meta["layers"]) == 14, sorted(meta["layers"])
    return meta


def _steps(w: torch.Tensor, bits: int = 3, group: int = 32) -> torch.Tensor:
    """Each weight's grid step in a fake-quantized asymmetric per-group weight: its group's
    ``(max - min) / (2^b - 1)`` (min-max grids hold both end codes)."""
    g = w.double().reshape(w.shape[0], -1, group)
    step = (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / (2 ** bits - 1)
    return step.clamp(min=1e-30).expand_as(g).reshape(w.shape)


def _compare(one: Path, two: Path) -> dict[str, Any]:
    """1 vs 2 ranks: largest absolute / relative (to the tensor's max |value|) difference of
    the transformed and fake-quant tensors; for the quantized linears, the fraction of
    unchanged codes and the largest difference in grid steps, with and without flips."""
    report: dict[str, Any] = {}
    for key, sub in (("trans", "transformed_model"), ("fake", "fake_quant_model")):
        a, b = _tensors(one / sub), _tensors(two / sub)
        assert set(a) == set(b)
        d = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a}
        report[f"{key}_abs"] = max(d.values())
        report[f"{key}_rel"] = max(d[k] / max(float(a[k].double().abs().max()), 1e-30)
                                   for k in a)
        if key == "fake":
            lin = [k for k in a if k.endswith("proj.weight")]
            assert len(lin) == 14, sorted(a)
            steps = {k: (a[k].double() - b[k].double()).abs() / _steps(a[k]) for k in lin}
            flips = sum(int((s > 0.5).sum()) for s in steps.values())
            report["codes_unchanged"] = 1 - flips / sum(a[k].numel() for k in lin)
            report["max_steps"] = max(float(s.max()) for s in steps.values())
            report["max_steps_unflipped"] = max(float(s.masked_fill(s > 0.5, 0).max())
                                                for s in steps.values())
    report["quant_meta_equal"] = _quant_meta(one) == _quant_meta(two)
    return report


@pytest.mark.parametrize("algo", ["smoothquant", "osplus"])
def test_max_min_methods_give_one_process_weights_exactly(algo: str, tmp_path: Path,
                                                          tiny_llama_dir: Path,
                                                          texts: Path) -> None:
    one, two, _ = _run_pair(tmp_path, algo, tiny_llama_dir, texts)
    for sub in ("transformed_model", "fake_quant_model"):
        a, b = _tensors(one / sub), _tensors(two / sub)
        assert set(a) == set(b)
        diff = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a
                if not torch.equal(a[k], b[k])}
        assert not diff, (algo, sub, diff)
    meta = _quant_meta(one)
    assert meta == _quant_meta(two)
    if algo == "smoothquant":  # static ranges: core's observers, reduced
        assert all(v["act_scale"] is not None for v in meta["layers"].values())
    rec1 = json.loads((one / "results.json").read_text())["recipe"]
    rec2 = json.loads((two / "results.json").read_text())["recipe"]
    assert rec1 == rec2  # the same scale ranges / thresholds in the summaries


@pytest.mark.parametrize("algo", ["gptq", "awq"])
def test_sum_methods_agree_with_one_process(algo: str, tmp_path: Path, tiny_llama_dir: Path,
                                            texts: Path) -> None:
    evaluate = algo == "gptq"
    one, two, proc = _run_pair(tmp_path, algo, tiny_llama_dir, texts, evaluate=evaluate)
    report = _compare(one, two)
    print(f"\n{algo}: 1 vs 2 ranks {report}")
    assert report["quant_meta_equal"], report
    if algo == "gptq":  # no transform: the float model is the checkpoint's
        assert report["trans_abs"] == 0.0, report
        assert all(v["float_columns"] for v in _quant_meta(one)["layers"].values())
    assert report["trans_rel"] <= TRANS_RTOL, report
    assert report["max_steps_unflipped"] <= FLOAT_STEPS, report
    assert report["codes_unchanged"] >= CODE_AGREE, report
    assert report["max_steps"] <= 1 + FLOAT_STEPS, report
    if evaluate:  # rank 0 alone evaluates, reports and writes
        assert proc.stdout.count("results:") == 1
        res1 = json.loads((one / "results.json").read_text())
        res2 = json.loads((two / "results.json").read_text())
        assert res1["ranks"] == 1 and res2["ranks"] == 2
        p1 = res1["eval"]["fake_quant"]["wikitext2"]["ppl"]
        p2 = res2["eval"]["fake_quant"]["wikitext2"]["ppl"]
        assert p2 == pytest.approx(p1, rel=1e-4), (p1, p2)


def test_omniquant_two_ranks_take_one_process_steps(tmp_path: Path, tiny_llama_dir: Path,
                                                    texts: Path) -> None:
    """2 ranks with bs 2 average each step's gradients over batches (2i, 2i + 1): one
    process's step on its batch i of bs 4."""
    one, two, _ = _run_pair(tmp_path, "omniquant", tiny_llama_dir, texts, bs_one=4)
    report = _compare(one, two)
    print(f"\nomniquant: 1 (bs 4) vs 2 ranks (bs 2) {report}")
    assert report["quant_meta_equal"], report
    assert report["trans_rel"] <= TRANS_RTOL, report
    assert report["max_steps_unflipped"] <= FLOAT_STEPS, report
    assert report["codes_unchanged"] >= CODE_AGREE, report
    assert report["max_steps"] <= 1 + FLOAT_STEPS, report


HESSIAN_WORKER = r"""
import sys
import torch
import torch.distributed as D
from torch import nn

rank, world, rdv, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if world > 1:
    D.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
from llmcq_gptq.algorithm import HessianBank

torch.manual_seed(0)
names = ["e0.gate", "e0.up", "e1.gate", "e1.up", "e2.gate", "e2.up"]
targets = {n: nn.Linear(8, 4, bias=False) for n in names}
bank = HessianBank()
for b in range(rank, 4, world):  # batch b routes to expert b % 2; expert 2 gets none
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(b))
    for n in (f"e{b % 2}.gate", f"e{b % 2}.up"):
        bank(n, x, None)
bank.close()
bank.all_reduce(targets)
torch.save({"owner": bank.owner, "H": bank.H, "n": bank.n}, out)
if world > 1:  # leave the group before exiting (gloo's threads abort the process otherwise)
    D.destroy_process_group()
"""


def test_gptq_hessians_of_linears_seen_on_some_ranks_only(tmp_path: Path) -> None:
    """MoE experts: on 2 ranks expert 0 sees only rank 0's batches and expert 1 only rank
    1's; every rank still reduces the same Hessians in the same order and holds one
    process's (owners, counts, values); an expert no rank saw stays absent."""
    def launch(world: int) -> list[dict[str, Any]]:
        return run_ranks(HESSIAN_WORKER, world, tmp_path, name="hessians")

    (ref,) = launch(1)
    assert ref["owner"] == {"e0.gate": "e0.gate", "e0.up": "e0.gate",
                            "e1.gate": "e1.gate", "e1.up": "e1.gate"}
    assert ref["n"] == {"e0.gate": 10, "e1.gate": 10}
    for got in launch(2):
        assert got["owner"] == ref["owner"] and got["n"] == ref["n"]
        for name, h in ref["H"].items():
            assert torch.allclose(got["H"][name], h, rtol=1e-6, atol=1e-7), name
