"""quant.bit_budget: the knapsack solver against brute force, the search end to end on the
tiny Llama (the achieved averages are results.json's, at most the target and within one
linear's step of it), a searched allocation beats the same widths given in reverse order of
sensitivity and the uniform narrower width on held-out text, mistakes name their keys, and
the saved quant.mix_bits snippet reloads to the same widths."""

from __future__ import annotations

import copy
import itertools
import random
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import yaml

import llmcq
from llmcq.budget.solver import InfeasibleBudget, allocate, hull_gap
from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError, ConfigErrors
from llmcq.pipeline.runner import run
from llmcq.quant.spec import PerGroup, WeightQuantSpec


# ------------------------------------------------------------------ solver (pure)

def _brute(errors: list[list[float]], costs: list[list[int]], budget: Fraction
           ) -> float:
    best = float("inf")
    for pick in itertools.product(*(range(len(e)) for e in errors)):
        if sum(c[j] for c, j in zip(costs, pick)) <= budget:
            best = min(best, sum(e[j] for e, j in zip(errors, pick)))
    return best


def _instance(rng: random.Random, items: int, widths: tuple[int, ...] = (2, 3, 4)
              ) -> tuple[list[list[float]], list[list[int]]]:
    """Linears of random sizes; error roughly halves per extra bit, with noise (so not
    always convex nor monotone)."""
    errors, costs = [], []
    for _ in range(items):
        n = rng.choice([64, 128, 256, 512])
        s = rng.uniform(0.01, 1.0)
        errors.append([s * 4.0 ** -(b - 2) * rng.uniform(0.7, 1.3) for b in widths])
        costs.append([n * b + (n // 32) * (16 + b) for b in widths])
    return errors, costs


def test_solver_never_exceeds_and_matches_brute_force_within_one_step() -> None:
    rng = random.Random(0)
    exact = 0
    cases = 300
    for _ in range(cases):
        errors, costs = _instance(rng, rng.randint(1, 6))
        lo, hi = sum(min(c) for c in costs), sum(max(c) for c in costs)
        budget = Fraction(rng.randint(lo, hi + 50))
        got = allocate(errors, costs, budget)
        assert got.cost <= budget
        assert got.cost == sum(c[j] for c, j in zip(costs, got.choice))
        opt = _brute(errors, costs, budget)
        assert got.error >= opt - 1e-12
        # the provable gap: one item's largest error step on its lower convex hull
        assert got.error <= opt + hull_gap(errors, costs) + 1e-12
        exact += abs(got.error - opt) <= 1e-12
    assert exact >= 0.93 * cases, exact  # measured: 290 of 300 (272 without the exchanges)


def test_solver_is_optimal_at_its_lagrangian_points() -> None:
    """Everett: each multiplier's choice is optimal for the budget it spends."""
    rng = random.Random(1)
    for _ in range(50):
        errors, costs = _instance(rng, 5)
        lam = rng.uniform(0.0, 1e-3)
        from llmcq.budget.solver import choose

        pick = choose(errors, costs, lam)
        budget = sum(c[j] for c, j in zip(costs, pick))
        got = allocate(errors, costs, budget)
        assert got.error == pytest.approx(_brute(errors, costs, budget), abs=1e-12)


def test_solver_refuses_an_unreachable_budget_and_spends_a_generous_one() -> None:
    errors, costs = [[3.0, 1.0], [2.0, 0.5]], [[10, 20], [10, 20]]
    with pytest.raises(InfeasibleBudget) as err:
        allocate(errors, costs, 19)
    assert err.value.minimum == 20
    assert allocate(errors, costs, 1000).choice == (1, 1)
    assert allocate(errors, costs, 30).choice == (1, 0)  # the larger error reduction


# ------------------------------------------------------------------ the search in a run

W3 = {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 32}
#: bits_per_param of a g32 asymmetric grid: codes + a 16-bit scale and a b-bit zero per 32
COST = {b: b + (16 + b) / 32 for b in (2, 3, 4)}
IGNORED = "model.layers.0.self_attn.o_proj"


def _config(model: Path, data: Path, out: Path, method: str = "rtn", **budget: Any
            ) -> dict[str, Any]:
    return {"base": {"seed": 0, "device": "cpu"},
            "model": {"type": "llama", "path": str(model)},
            "calib": {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                      "n_samples": 4, "seq_len": 32, "preproc": "wikitext2_gptq", "bs": 2,
                      "seed": 1},
            "quant": {"method": method, "weight": dict(W3),
                      "bit_budget": {"target": 3.0, "widths": [2, 3, 4], "n_samples": 4,
                                     **budget}},
            "save": {"save_path": str(out)}}


@pytest.fixture(scope="module")
def searched(tiny_llama_dir: Path, shared_data: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """One RTN run at a 3.0 bits_per_param target, block 0's o_proj ignored, the snippet
    saved: (results, config, snippet path)."""
    out = tmp_path_factory.mktemp("budget")
    snippet = out / "alloc" / "mix_bits.yaml"
    cfg = _config(tiny_llama_dir, shared_data, out / "run", save_path=str(snippet))
    cfg["ignored_layers"] = {"speical_names": [IGNORED]}
    results = run(resolve_config(copy.deepcopy(cfg)), progress=False)
    return results, cfg, snippet


def test_the_run_reaches_the_target_without_exceeding_it(searched: Any) -> None:
    results, _, _ = searched
    bb, comp = results["bit_budget"], results["compression"]
    alloc = bb["allocation"]
    assert IGNORED not in alloc and len(alloc) == 13 == comp["linears_quantized"]
    assert set(alloc.values()) > {2} and set(alloc.values()) <= {2, 3, 4}
    # what the search planned is what the records hold, and what results.json reports
    for key in ("weight_bits_mean", "bits_per_param"):
        assert bb["planned"][key] == bb["achieved"][key] == comp[key]
    n = sum(bb["params"].values())
    assert n == comp["params_quantized"]
    # never above the target, and short of it by less than one linear's largest step
    step = max(p * (COST[4] - COST[2]) for p in bb["params"].values()) / n
    assert 3.0 - step <= comp["bits_per_param"] <= 3.0
    expected = sum(bb["params"][k] * COST[b] for k, b in alloc.items()) / n
    assert comp["bits_per_param"] == pytest.approx(expected, abs=1e-6)
    assert results["layers"]["ignored_layers"]["linears"] == 1
    assert len(bb["errors"]) == 13 and all(len(e) == 3 for e in bb["errors"].values())
    # the table: a column per linear, a row per block, '-' for the linear kept in float
    head, row0, row1, means = bb["table"]
    assert head.split() == ["block", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                            "up_proj", "down_proj"]
    assert row0.split()[4] == "-" and row1.split()[7] == str(alloc["model.layers.1.mlp.down_proj"])
    assert means.startswith("target 3.0 bits_per_param; planned weight_bits_mean")


def test_count_overhead_false_budgets_code_bits(tiny_llama_dir: Path, shared_data: Path,
                                                tmp_path: Path) -> None:
    from llmcq.pipeline.runner import search_budget

    cfg = _config(tiny_llama_dir, shared_data, tmp_path, target=2.7, count_overhead=False)
    cfg["quant"]["bit_budget"].update(n_samples=3, seq_len=20)
    bb = search_budget(resolve_config(cfg), progress=False)
    assert (bb["samples"], bb["tokens"]) == (3, 60)
    n = sum(bb["params"].values())
    step = max(bb["params"].values()) * 2 / n  # one linear from 2 to 4 bits
    assert bb["measure"] == "weight_bits_mean"
    assert 2.7 - step <= bb["planned"]["weight_bits_mean"] <= 2.7
    assert bb["planned"]["weight_bits_mean"] == pytest.approx(
        sum(bb["params"][k] * b for k, b in bb["allocation"].items()) / n, abs=1e-6)


def test_variants_in_several_rounds_give_the_same_errors(
        searched: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A block whose variants exceed the memory bound (many MoE experts) sends them through
    the later blocks in rounds: one variant per round here, the same errors and widths."""
    from llmcq.budget import sensitivity
    from llmcq.pipeline.runner import search_budget

    results, cfg, _ = searched
    cfg = copy.deepcopy(cfg)
    del cfg["quant"]["bit_budget"]["save_path"]
    monkeypatch.setattr(sensitivity, "_VARIANT_BYTES", 1)
    bb = search_budget(resolve_config(cfg, overwrite=True), progress=False)
    ref = results["bit_budget"]
    assert bb["allocation"] == ref["allocation"]
    for name, errors in ref["errors"].items():
        assert bb["errors"][name] == pytest.approx(errors, rel=1e-5, abs=1e-9)
    # float pass, block 0 (its o_proj ignored) through both blocks, block 1 through itself
    assert bb["block_forwards"] == ref["block_forwards"] == 2 + 6 * 3 * 2 + 7 * 3


def _heldout_kl(model_dir: Path, data: Path, widths: dict[str, int]) -> float:
    """Mean next-token KL(float || quantized) on held-out wikitext2 test tokens, every
    linear of ``widths`` rounded to nearest at its width on the W3 g32 grid."""
    import torch
    from torch.nn import functional as F

    from llmcq.model.loading import ModelSource, load_pretrained
    from llmcq.quant.rtn import rtn_record

    model, tok = load_pretrained(ModelSource(model_dir))
    text = (data / "wikitext2" / "test.txt").read_text()[:20_000]
    ids = torch.tensor(tok(text)["input_ids"][: 8 * 64]).reshape(8, 64)
    with torch.no_grad():
        ref = F.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
        for name, b in widths.items():
            lin = model.get_submodule(name)
            spec = WeightQuantSpec(bits=b, symmetric=False, granularity=PerGroup(32))
            lin.weight.data = rtn_record(lin, spec).dequantize(lin.weight.dtype)
        got = F.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
    return float((ref.exp() * (ref - got)).sum(-1).mean())


def test_the_search_beats_the_reversed_allocation_and_uniform_narrow(
        searched: Any, tiny_llama_dir: Path, shared_data: Path) -> None:
    """The same widths given in reverse order of measured sensitivity (within each weight
    shape, so the bits are the same) and every linear at 2 bits are both worse on held-out
    text: a search that ignored the sensitivities would not pass."""
    results, _, _ = searched
    bb = results["bit_budget"]
    alloc = bb["allocation"]
    sens = {n: e["2"] for n, e in bb["errors"].items()}
    reversed_: dict[str, int] = {}
    shapes: dict[int, list[str]] = {}
    for n in alloc:
        shapes.setdefault(bb["params"][n] * 1000 + ("self_attn" in n), []).append(n)
    for names in shapes.values():
        by_sens = sorted(names, key=lambda n: -sens[n])  # most sensitive first
        for n, b in zip(by_sens, sorted(alloc[m] for m in names)):  # ... gets the narrowest
            reversed_[n] = b
    assert reversed_ != alloc
    assert sum(bb["params"][n] * b for n, b in reversed_.items()) == \
        sum(bb["params"][n] * b for n, b in alloc.items())
    kl_search = _heldout_kl(tiny_llama_dir, shared_data, alloc)
    kl_reversed = _heldout_kl(tiny_llama_dir, shared_data, reversed_)
    kl_uniform = _heldout_kl(tiny_llama_dir, shared_data, {n: 2 for n in alloc})
    # measured: 0.075 searched, 0.139 reversed, 0.157 uniform 2-bit
    assert kl_search < 0.8 * kl_reversed, (kl_search, kl_reversed)
    assert kl_search < 0.8 * kl_uniform, (kl_search, kl_uniform)


# ------------------------------------------------------------------ what is refused

@pytest.mark.parametrize("change, key, words", [
    (lambda c: c["quant"].update(mix_bits={"setting_0": {"layer_name": ["o_proj"],
                                                         "do_quant": False}}),
     "quant.bit_budget", "quant.mix_bits also decides"),
    (lambda c: c["quant"].update(act={"bit": 8}), "quant.bit_budget", "remove quant.act"),
    (lambda c: c.update(sparse={"method": "magnitude"}), "quant.bit_budget", "sparse"),
    (lambda c: c["quant"]["bit_budget"].update(widths=[1, 2]), "quant.bit_budget.widths",
     "from 2 to 8"),
    (lambda c: c["quant"]["bit_budget"].update(widths=[3, 3]), "quant.bit_budget.widths",
     "repeat"),
    (lambda c: c["quant"]["bit_budget"].update(count_overhead=False, target=1.5),
     "quant.bit_budget.target", ">= 2"),
    (lambda c: c["quant"]["bit_budget"].update(n_samples=9), "quant.bit_budget.n_samples",
     "1 to 4 (calib.n_samples)"),
    (lambda c: c["quant"]["bit_budget"].update(seq_len=64), "quant.bit_budget.seq_len",
     "2 to 32 (calib.seq_len)"),
    (lambda c: c["quant"]["bit_budget"].update(trget=3), "quant.bit_budget.trget",
     "did you mean 'target'"),
    (lambda c: c.pop("calib"), "calib", "quant.bit_budget measures"),
    # a width the export cannot hold, reported at that width's key
    (lambda c: (c["quant"]["weight"].update(bit=4), c["quant"]["bit_budget"].update(
        widths=[2, 4]), c["save"].update(save_vllm=True)),
     "quant.bit_budget.widths[0]", "4- and 8-bit"),
    # a backend writing one grid per checkpoint
    (lambda c: (c["quant"]["weight"].update(bit=4), c["save"].update(save_autogptq=True)),
     "quant.bit_budget", "different grids"),
])
def test_config_mistakes_name_their_key(change: Any, key: str, words: str,
                                        tiny_llama_dir: Path, shared_data: Path,
                                        tmp_path: Path) -> None:
    cfg = _config(tiny_llama_dir, shared_data, tmp_path)
    change(cfg)
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg)
    errors = err.value.errors if isinstance(err.value, ConfigErrors) else [err.value]
    assert any(e.path == key and words in str(e) for e in errors), str(err.value)


def test_an_algorithm_without_per_linear_grids_is_refused(tiny_llama_dir: Path,
                                                           shared_data: Path,
                                                           tmp_path: Path) -> None:
    from llmcq.api import AlgorithmSpec
    from llmcq.plugins import registry

    registry.register("llmcq.algorithms", AlgorithmSpec(
        name="uniform_only", impl="llmcq_rtn.algorithm:RTN", needs_calibration=True))
    try:
        with pytest.raises(ConfigError, match=r"quant.bit_budget: uniform_only \(quant.method\) "
                           "does not honour per-linear grids"):
            resolve_config(_config(tiny_llama_dir, shared_data, tmp_path, "uniform_only"))
    finally:
        registry.unregister("llmcq.algorithms", "uniform_only")


def test_an_unreachable_target_fails_before_anything_is_quantized(
        tiny_llama_dir: Path, shared_data: Path, tmp_path: Path) -> None:
    cfg = _config(tiny_llama_dir, shared_data, tmp_path, target=2.5)  # w2 g32 costs 2.5625
    with pytest.raises(ConfigError) as err:
        run(resolve_config(cfg), progress=False)
    assert err.value.path == "quant.bit_budget.target"
    assert ">= 2.562500 (every linear at 2 bits, bits_per_param)" in str(err.value)
    assert not (tmp_path / "results.json").exists()


# ------------------------------------------------------------------ the saved allocation

def test_the_saved_snippet_reloads_as_mix_bits_with_the_same_widths(
        searched: Any, tiny_llama_dir: Path, tmp_path: Path) -> None:
    results, cfg, snippet = searched
    loaded = yaml.safe_load(snippet.read_text())
    assert set(loaded) == {"quant"} and set(loaded["quant"]) == {"mix_bits"}
    cfg = copy.deepcopy(cfg)
    del cfg["quant"]["bit_budget"]
    cfg["quant"]["mix_bits"] = loaded["quant"]["mix_bits"]
    cfg["save"]["save_path"] = str(tmp_path / "again")
    resolved = resolve_config(cfg)  # what llmcq validate runs
    names = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]] * 2
    specs = resolved.specs.bind("model.layers", names)
    alloc = results["bit_budget"]["allocation"]
    for i, block in enumerate(names):
        for rel in block:
            full = f"model.layers.{i}.{rel}"
            w = specs.weight_for(full)
            assert (w is None and full == IGNORED) or w.bits == alloc[full]
    again = run(resolved, progress=False)
    for key in ("weight_bits_mean", "bits_per_param", "params_quantized"):
        assert again["compression"][key] == results["compression"][key]


# ------------------------------------------------------------------ with other algorithms

@pytest.mark.parametrize("method, special", [
    ("gptq", {"actorder": True, "static_groups": True}),
    ("awq", {"trans_version": "v2", "weight_clip": True, "n_grid": 4}),
])
def test_other_algorithms_hold_exactly_the_planned_bits(method: str, special: dict,
                                                        tiny_llama_dir: Path, shared_data: Path,
                                                        tmp_path: Path) -> None:
    cfg = _config(tiny_llama_dir, shared_data, tmp_path, method)
    cfg["quant"]["special"] = special
    results = run(resolve_config(cfg), progress=False)
    bb, comp = results["bit_budget"], results["compression"]
    assert bb["planned"] == bb["achieved"] == {k: comp[k] for k in bb["planned"]}
    assert comp["bits_per_param"] <= 3.0 and comp["linears_quantized"] == 14


class Records:
    @llmcq.hookimpl
    def llmcq_evaluate(self, run: Any) -> list:
        self.records = dict(run.records)
        return []


def test_slimllm_spreads_each_linears_width_over_its_groups(
        tiny_llama_dir: Path, shared_data: Path, tmp_path: Path) -> None:
    """SliM-LLM keeps the width the search chose for each linear as the mean of its
    per-group widths (N-1, N, N+1); its binarized 2-bit linears' fractional zeros are
    priced at 16 bits, so the plan is again exactly what results.json reports."""
    cfg = _config(tiny_llama_dir, shared_data, tmp_path, "slimllm", target=3.5)
    cfg["eval"] = {"eval_pos": ["fake_quant"], "name": "wikitext2", "seq_len": 32,
                   "path": str(shared_data / "wikitext2" / "test.txt"), "num_samples": 1}
    recs = Records()
    results = run(resolve_config(cfg), progress=False, extra_plugins=[recs])
    bb = results["bit_budget"]
    assert len(set(bb["allocation"].values())) > 1
    assert bb["planned"] == bb["achieved"] == {
        k: results["compression"][k] for k in ("weight_bits_mean", "bits_per_param")}
    assert bb["achieved"]["bits_per_param"] <= 3.5
    mixed = 0
    for name, width in bb["allocation"].items():
        rec = recs.records[name]
        assert rec.bits == width
        if rec.group_bits is not None:
            assert float(rec.group_bits.double().mean()) == pytest.approx(width, abs=1e-9)
            mixed += rec.mixed_bits
    assert mixed > 0


def test_linears_a_backend_fuses_share_one_width(tiny_llama_dir: Path, shared_data: Path,
                                                 tmp_path: Path) -> None:
    """vLLM runs q/k/v and gate/up as one kernel each: the search ties them (probed from
    the backend's own check) and gives each group one width."""
    cfg = _config(tiny_llama_dir, shared_data, tmp_path, target=6.0, widths=[4, 8])
    cfg["quant"]["weight"] = {"bit": 4, "symmetric": True, "granularity": "per_group",
                              "group_size": 32}
    cfg["save"]["save_vllm"] = True
    resolved = resolve_config(cfg)
    from llmcq.pipeline.runner import search_budget

    bb = search_budget(resolved, progress=False)
    alloc = bb["allocation"]
    assert len(bb["tied"]) == 4 and len(set(alloc.values())) == 2
    for i in range(2):
        p = f"model.layers.{i}."
        assert len({alloc[p + f"self_attn.{n}_proj"] for n in "qkv"}) == 1
        assert alloc[p + "mlp.gate_proj"] == alloc[p + "mlp.up_proj"]


def test_llmcq_budget_prints_and_saves_without_quantizing(
        llmcq_cli: Any, tiny_llama_dir: Path, shared_data: Path, tmp_path: Path) -> None:
    cfg = _config(tiny_llama_dir, shared_data, tmp_path / "out",
                  save_path=str(tmp_path / "alloc.yaml"))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = llmcq_cli("budget", str(path), "--no-progress", env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res
    assert "block q_proj k_proj v_proj o_proj gate_proj up_proj down_proj" in res.stdout
    assert "target 3.0 bits_per_param; planned weight_bits_mean" in res.stdout
    assert (tmp_path / "alloc.yaml").is_file() and not (tmp_path / "out").exists()
    # the allocation is not replaced without --overwrite: llmcq run and validate refuse at
    # config time, llmcq budget before loading the model
    from llmcq.errors import OutputExistsError
    from llmcq.pipeline.runner import search_budget

    with pytest.raises(OutputExistsError, match="alloc.yaml"):
        resolve_config(copy.deepcopy(cfg))
    resolved = resolve_config(copy.deepcopy(cfg), overwrite=True)
    resolved.overwrite = False  # as llmcq budget without --overwrite
    with pytest.raises(OutputExistsError, match="quant.bit_budget.save_path"):
        search_budget(resolved, progress=False, model=object())
    # the snippet in place of bit_budget passes llmcq validate
    del cfg["quant"]["bit_budget"]
    cfg["quant"]["mix_bits"] = yaml.safe_load((tmp_path / "alloc.yaml").read_text())[
        "quant"]["mix_bits"]
    path.write_text(yaml.safe_dump(cfg))
    checked = llmcq_cli("validate", str(path))
    assert checked.returncode == 0, checked
    assert "quant.mix_bits.setting_0: w2 g32 asym (" in checked.stdout


BUDGET_WORKER = """
import torch
from llmcq.testing.gloo import join_ranks, leave_ranks
rank, world, out, _ = join_ranks()
from llmcq.budget.plan import BudgetOutcome, _solve
# errors that differ by rank: without the broadcast each rank would choose its own widths
names = [f"l{i}" for i in range(6)]
gen = torch.Generator().manual_seed(100 + rank)
errors = {n: {b: float(torch.rand(1, generator=gen)) * 4.0 ** -b for b in (2, 3, 4)}
          for n in names}
bits = {n: {b: {"storage_bits": 64 * b, "code_bits": 64 * b} for b in (2, 3, 4)}
        for n in names}
o = BudgetOutcome(3.0, True, (2, 3, 4), {}, errors, bits, "m", [], 0, 0, 0, {}, 0.0)
_solve(o, [[n] for n in names], 6 * 64 * 3, torch.device("cpu"))
mine = BudgetOutcome(3.0, True, (2, 3, 4), {}, errors, bits, "m", [], 0, 0, 0, {}, 0.0)
import llmcq.dist as d
d.active = lambda: False  # what this rank alone would choose
_solve(mine, [[n] for n in names], 6 * 64 * 3, torch.device("cpu"))
torch.save({"taken": o.allocation, "own": mine.allocation}, out)
if world > 1:
    leave_ranks()
"""


def test_data_parallel_ranks_take_rank_0s_allocation(tmp_path: Path) -> None:
    """Under data parallelism every rank takes rank 0's choice (broadcast), even where its
    own measurement would have chosen otherwise."""
    from llmcq.testing.gloo import run_ranks

    r0, r1 = run_ranks(BUDGET_WORKER, 2, tmp_path, name="budget")
    assert r0["own"] != r1["own"]  # the ranks' own choices differ ...
    assert r0["taken"] == r1["taken"] == r0["own"]  # ... and both take rank 0's
