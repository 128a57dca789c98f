"""The bit-budget search inside a run: measure, solve, and hand the run a layer plan.

:func:`search` runs once the model is loaded and before any block is quantized. It prices
every quantizable linear at every candidate width (``record_bits`` of a round-to-nearest
record: exactly what results.json's ``compression`` will count), refuses an unreachable
target before the expensive part, measures the sensitivities (:mod:`.sensitivity`), solves
the knapsack (:mod:`.solver`) and sets ``run.specs.plan``: each linear's
:class:`~llmcq.layers.LayerSpec` is ``quant.weight`` at its chosen width, so the configured
algorithm quantizes each linear on its own grid through the per-linear API every
``per_layer_specs`` algorithm honours. Linears kept in float by ``ignored_layers`` stay
float and are left out of the budget.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
import yaml

from llmcq import dist
from llmcq.budget.sensitivity import float_pass, measure_errors
from llmcq.budget.solver import InfeasibleBudget, allocate
from llmcq.config.budget_checks import BUDGET, fractional_zero_widths
from llmcq.errors import ConfigError, LlmcqError, OutputExistsError
from llmcq.io.atomic import atomic_write_text
from llmcq.layers import IGNORED, LayerPlan, LayerRules, LayerSpec
from llmcq.pipeline.context import RunContext
from llmcq.pipeline.layer_plan import ModelLinears, check_plan, model_linears
from llmcq.quant.spec import WeightQuantSpec

__all__ = ["BudgetOutcome", "search", "first_samples", "mix_bits_snippet",
           "refuse_existing_snippet"]

log = logging.getLogger("llmcq")

#: round averages as results.json's compression block does
_DIGITS = 6
#: at most this many linears per block are shown as columns; more: counts per width
_MAX_COLUMNS = 12


@dataclass
class BudgetOutcome:
    """What the search chose and measured (results.json ``bit_budget``)."""

    target: float
    count_overhead: bool
    widths: tuple[int, ...]
    #: full name -> chosen width (quantized linears only, model order)
    allocation: dict[str, int]
    #: full name -> width -> mean KL per token with only that linear quantized
    errors: dict[str, dict[int, float]]
    #: full name -> width -> record_bits of the round-to-nearest record
    bits: dict[str, dict[int, dict[str, float]]]
    prefix: str
    names: list[list[str]]
    tokens: int
    samples: int
    block_forwards: int
    seconds: dict[str, float]
    lam: float
    ties: list[list[str]] = field(default_factory=list)
    snippet: str | None = None

    def planned(self) -> dict[str, float]:
        """``weight_bits_mean`` and ``bits_per_param`` of the allocation, as
        ``compression_summary`` computes them from the records."""
        b = [self.bits[n][w] for n, w in self.allocation.items()]
        code, grid = sum(x["code_bits"] for x in b), sum(x["grid_weights"] for x in b)
        store, weights = sum(x["storage_bits"] for x in b), sum(x["weights"] for x in b)
        return {"weight_bits_mean": round(code / grid, _DIGITS),
                "bits_per_param": round(store / weights, _DIGITS)}

    @property
    def measure(self) -> str:
        return "bits_per_param" if self.count_overhead else "weight_bits_mean"

    def predicted_kl(self) -> float:
        """The first-order estimate of the model's KL: the chosen errors summed."""
        return float(sum(self.errors[n][w] for n, w in self.allocation.items()))

    def table(self) -> list[str]:
        """Per block, each linear's width (``-``: kept in float), then the averages."""
        cols = list(dict.fromkeys(r for names in self.names for r in names))
        lines = []
        if len(cols) <= _MAX_COLUMNS:
            short = [c.rsplit(".", 1)[-1] for c in cols]
            labels = short if len(set(short)) == len(short) else cols
            width = [max(len(label), 1) for label in labels]
            lines.append("block " + " ".join(f"{lab:>{w}s}" for lab, w in zip(labels, width,
                                                                                 strict=True)))
            for i, names in enumerate(self.names):
                cells = []
                for c, w in zip(cols, width, strict=True):
                    full = f"{self.prefix}.{i}.{c}"
                    b = self.allocation.get(full)
                    cells.append(f"{'-' if b is None else b if c in names else '':>{w}}")
                lines.append(f"{i:5d} " + " ".join(cells))
        else:
            for i, names in enumerate(self.names):
                got = [self.allocation.get(f"{self.prefix}.{i}.{r}") for r in names]
                counts = " ".join(f"w{b}: {got.count(b)}" for b in self.widths if b in got)
                floats = got.count(None)
                lines.append(f"block {i}: {counts}" + (f", float: {floats}" if floats else ""))
        p = self.planned()
        lines.append(f"target {self.target} {self.measure}; planned weight_bits_mean "
                     f"{p['weight_bits_mean']}, bits_per_param {p['bits_per_param']}")
        return lines

    def summary(self, compression: dict[str, Any] | None = None) -> dict[str, Any]:
        """The results.json block; ``compression``: the run's, for the achieved means."""
        out: dict[str, Any] = {
            "target": self.target, "count_overhead": self.count_overhead,
            "measure": self.measure, "widths": list(self.widths),
            "allocation": dict(self.allocation),
            "errors": {n: {str(b): e for b, e in by.items()} for n, by in self.errors.items()},
            "params": {n: int(self.bits[n][w]["weights"]) for n, w in self.allocation.items()},
            "planned": self.planned(), "predicted_kl": self.predicted_kl(),
            "lambda": self.lam, "tied": self.ties, "samples": self.samples,
            "tokens": self.tokens, "block_forwards": self.block_forwards,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "table": self.table(),
        }
        if self.snippet is not None:
            out["save_path"] = self.snippet
        if compression is not None:
            out["achieved"] = {k: compression.get(k) for k in ("weight_bits_mean",
                                                                "bits_per_param")}
        return out


def first_samples(batches: list[torch.Tensor], n: int, seq_len: int | None = None
                  ) -> list[torch.Tensor]:
    """The first ``n`` samples of the calibration batches, in their batches, each cut to
    its first ``seq_len`` tokens (None: whole)."""
    out, left = [], n
    for b in batches:
        if left <= 0:
            break
        out.append(b[:left, :seq_len])
        left -= int(out[-1].shape[0])
    return out


def _candidates(run: RunContext, lin: ModelLinears
                ) -> tuple[dict[int, dict[str, dict[int, WeightQuantSpec]]], list[str]]:
    """Per block the linears to search (not kept in float) with their grid at each width,
    and the full names kept in float."""
    bb = run.config.quant.bit_budget  # type: ignore[union-attr]
    weight = run.specs.weight
    assert bb is not None and weight is not None
    grids = {b: replace(weight, bits=b) for b in bb.widths}
    targets: dict[int, dict[str, dict[int, WeightQuantSpec]]] = {}
    floats = []
    for i, names in enumerate(lin.names):
        for rel in names:
            full = f"{lin.prefix}.{i}.{rel}"
            if run.specs.plan is not None and run.specs.plan.spec(full).keeps_float:
                floats.append(full)
                continue
            targets.setdefault(i, {})[rel] = grids
    return targets, floats


def _ties(run: RunContext, lin: ModelLinears, quantized: list[str], widths: tuple[int, ...]
          ) -> list[list[str]]:
    """Linears that must share a width: those an export backend runs as one kernel
    (``shared_input``, ``experts`` of :class:`llmcq.api.LayerTarget`), when a backend of
    the run refuses them on different grids (probed with alternating widths)."""
    known = set(quantized)
    sets = [[n for n in s if n in known] for s in (*lin.shared, *lin.experts)]
    sets = [s for s in sets if len(s) > 1]
    if not sets or len(widths) < 2:
        return []
    weight = run.specs.weight
    assert weight is not None
    probe = {n: LayerSpec(weight, None, BUDGET) for n in quantized}
    for s in sets:
        for k, n in enumerate(s):
            probe[n] = LayerSpec(replace(weight, bits=widths[k % 2]), None, BUDGET)
    try:
        check_plan(run, LayerPlan(probe), lin)
    except ConfigError:
        # merge overlapping sets (an expert's gate/up and the block's experts)
        groups: list[set[str]] = []
        for s in sets:
            hit = [g for g in groups if g & set(s)]
            merged = set(s).union(*hit)
            groups = [g for g in groups if g not in hit] + [merged]
        order = {n: k for k, n in enumerate(quantized)}
        return [sorted(g, key=lambda n: order.get(n, 0)) for g in groups]
    return []


def _solve(outcome: BudgetOutcome, items: list[list[str]], budget: Fraction | int,
           device: torch.device) -> None:
    """Fill ``outcome.allocation`` (and ``lam``): one width per item (a linear or a tied
    set), errors and costs summed over the item's linears."""
    key = "storage_bits" if outcome.count_overhead else "code_bits"
    errors = [[sum(outcome.errors[n][b] for n in item) for b in outcome.widths]
              for item in items]
    costs = [[sum(int(round(outcome.bits[n][b][key])) for n in item) for b in outcome.widths]
             for item in items]
    alloc = allocate(errors, costs, budget)
    chosen = torch.tensor(alloc.choice, dtype=torch.int64)
    if dist.active():  # every rank measured the same samples: rank 0's choice for all
        chosen = dist.broadcast_(chosen.to(device)).cpu()
    for item, j in zip(items, chosen.tolist(), strict=True):
        for n in item:
            outcome.allocation[n] = outcome.widths[j]
    outcome.lam = alloc.lam


def _budget(outcome: BudgetOutcome) -> tuple[Fraction, Fraction]:
    """(the budget in bits, the cheapest allocation's bits per weight) exactly."""
    key, per = ("storage_bits", "weights") if outcome.count_overhead else \
        ("code_bits", "grid_weights")
    n = sum(int(round(by[outcome.widths[0]][per])) for by in outcome.bits.values())
    cheapest = sum(min(int(round(x[key])) for x in by.values()) for by in outcome.bits.values())
    return Fraction(str(outcome.target)) * n, Fraction(cheapest, n)


def search(run: RunContext, batches: list[torch.Tensor]) -> BudgetOutcome:
    """The search of the module docstring; sets ``run.specs`` to the chosen plan."""
    bb = run.config.quant.bit_budget  # type: ignore[union-attr]
    assert bb is not None and run.adapter is not None
    refuse_existing_snippet(run.resolved)
    lin = model_linears(run)
    targets, floats = _candidates(run, lin)
    quantized = [f"{lin.prefix}.{i}.{r}" for i, by in sorted(targets.items()) for r in by]
    if not quantized:
        raise ConfigError(BUDGET, None, show_value=False, reason="every linear is kept in "
                          "float (ignored_layers): nothing to allocate")
    fractional = fractional_zero_widths(run.config, run.resolved.specs, run.resolved.steps)
    samples = first_samples(batches, bb.n_samples, bb.seq_len)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    fp = float_pass(run.model, run.adapter, samples, run.device, targets,
                    fractional=fractional, progress=run.progress)
    seconds["float_pass"] = time.perf_counter() - start
    outcome = BudgetOutcome(
        target=bb.target, count_overhead=bb.count_overhead, widths=tuple(bb.widths),
        allocation={}, errors={}, bits={n: fp.bits[n] for n in quantized}, prefix=lin.prefix,
        names=lin.names, tokens=fp.tokens, samples=sum(int(s.shape[0]) for s in samples),
        block_forwards=0, seconds=seconds, lam=0.0)
    budget, cheapest = _budget(outcome)
    if Fraction(str(bb.target)) < cheapest:
        raise ConfigError(f"{BUDGET}.target", bb.target,
                          allowed=f">= {_ceil6(cheapest)} (every linear at {bb.widths[0]} "
                          f"bits, {outcome.measure})", reason="below the smallest reachable "
                          "average")
    outcome.ties = _ties(run, lin, quantized, outcome.widths)
    start = time.perf_counter()
    outcome.errors = measure_errors(run.model, run.adapter, fp, run.device, targets,
                                    progress=run.progress)
    seconds["sensitivity"] = time.perf_counter() - start
    outcome.block_forwards = fp.block_forwards
    tied = {n for t in outcome.ties for n in t}
    items = outcome.ties + [[n] for n in quantized if n not in tied]
    try:
        _solve(outcome, items, budget, run.device)
    except InfeasibleBudget as exc:  # pragma: no cover - checked above
        raise ConfigError(f"{BUDGET}.target", bb.target, reason=str(exc)) from None
    outcome.allocation = {n: outcome.allocation[n] for n in quantized}
    layers = {n: LayerSpec(replace(run.specs.weight, bits=b), None,  # type: ignore[arg-type]
                           f"{BUDGET}.widths[{bb.widths.index(b)}]")
              for n, b in outcome.allocation.items()}
    layers.update({n: LayerSpec(None, None, IGNORED) for n in floats})
    plan = LayerPlan(layers)
    check_plan(run, plan, lin)
    run.specs = replace(run.specs, plan=plan)
    if bb.save_path is not None and dist.is_main():
        text = mix_bits_snippet(run, outcome)
        atomic_write_text(Path(bb.save_path).expanduser(), text, overwrite=True)
        outcome.snippet = str(Path(bb.save_path).expanduser())
    for line in outcome.table():
        log.info("bit budget: %s", line)
    return outcome


def refuse_existing_snippet(resolved: Any) -> None:
    """``save_path`` must not exist unless outputs may be overwritten (``--overwrite``)."""
    bb = resolved.config.quant.bit_budget
    if bb is not None and bb.save_path is not None:
        dest = Path(bb.save_path).expanduser()
        if dest.exists() and not resolved.overwrite:
            raise OutputExistsError(f"{BUDGET}.save_path: {dest} already exists; choose "
                                    "another path, or pass --overwrite")


def _ceil6(x: Fraction) -> str:
    """``x`` rounded up at the sixth decimal (a target this large is reachable)."""
    scaled = -((-x.numerator * 10**_DIGITS) // x.denominator)
    return f"{scaled / 10**_DIGITS:.{_DIGITS}f}"


def _settings(outcome: BudgetOutcome, weight: dict[str, Any], *, compact: bool
              ) -> dict[str, Any]:
    """``quant.mix_bits`` settings giving each linear its width: one setting per width
    with ``name#blocks`` entries (``compact``), or one per (name, width), longer names
    first (a name contained in another's can then never take the other's setting)."""
    by: dict[tuple[int, str], list[int]] = {}
    n_blocks = len(outcome.names)
    for i, names in enumerate(outcome.names):
        for rel in names:
            b = outcome.allocation.get(f"{outcome.prefix}.{i}.{rel}")
            if b is not None:
                by.setdefault((b, rel), []).append(i)
    def entry(rel: str, blocks: list[int]) -> str:
        return rel if len(blocks) == n_blocks else f"{rel}#{'-'.join(map(str, blocks))}"
    groups: list[tuple[int, list[str]]] = []
    if compact:
        for b in outcome.widths:
            entries = [entry(rel, blocks) for (w, rel), blocks in by.items() if w == b]
            if entries:
                groups.append((b, entries))
    else:
        for (b, rel), blocks in sorted(by.items(), key=lambda kv: (-len(kv[0][1]), kv[0])):
            groups.append((b, [entry(rel, blocks)]))
    return {f"setting_{k}": {"layer_name": entries, "weight": {**weight, "bit": b}}
            for k, (b, entries) in enumerate(groups)}


def _widths_of(settings: dict[str, Any], run: RunContext, outcome: BudgetOutcome
               ) -> dict[str, int | None]:
    """Each searched linear's width under ``settings`` read back as llmc's rules read
    them (the loader's schema, :class:`~llmcq.layers.LayerRules`)."""
    from llmcq.config.loader import parse_run_config

    cfg = run.config
    raw: dict[str, Any] = {"quant": {"method": "rtn", "weight": settings[next(iter(settings))]
                                     ["weight"], "mix_bits": settings}}
    if cfg.ignored_layers is not None:
        raw["ignored_layers"] = cfg.ignored_layers.model_dump(mode="json", exclude_unset=True)
    parsed = parse_run_config(raw)
    rules = LayerRules.from_config(parsed, None, None)
    assert rules is not None
    plan = rules.bind(outcome.prefix, outcome.names)
    return {n: getattr(plan.spec(n).weight, "bits", None) for n in outcome.allocation}


def mix_bits_snippet(run: RunContext, outcome: BudgetOutcome) -> str:
    """The allocation as a YAML ``quant: {mix_bits: ...}`` snippet that ``llmcq run``
    accepts in place of ``quant.bit_budget`` (checked here by reading it back)."""
    wsec = run.config.quant.weight  # type: ignore[union-attr]
    assert wsec is not None
    weight = wsec.model_dump(mode="json", exclude_unset=True)
    settings = _settings(outcome, weight, compact=True)
    if _widths_of(settings, run, outcome) != outcome.allocation:
        settings = _settings(outcome, weight, compact=False)
        if _widths_of(settings, run, outcome) != outcome.allocation:  # pragma: no cover
            raise LlmcqError(f"{BUDGET}.save_path: the allocation cannot be written as "
                             "quant.mix_bits entries that read back to the same widths")
    p = outcome.planned()
    head = [f"# quant.bit_budget allocation: target {outcome.target} {outcome.measure}, "
            f"weight_bits_mean {p['weight_bits_mean']}, bits_per_param {p['bits_per_param']}",
            f"# widths {list(outcome.widths)}, {outcome.samples} calibration samples "
            f"({outcome.tokens} tokens); model {run.resolved.source.display}",
            "# use it in place of quant.bit_budget (keep quant.weight, ignored_layers):",
            *(f"#   {line}" for line in outcome.table()[:-1])]
    body = yaml.safe_dump({"quant": {"mix_bits": settings}}, sort_keys=False,
                          default_flow_style=None, width=100)
    return "\n".join(head) + "\n" + body
