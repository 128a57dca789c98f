"""What the report shows, read from results.json: pure functions of the parsed dicts."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Run", "load_run", "metric_rows", "by_block", "kl_histograms", "size_point",
           "POSITIONS"]

RESULTS_FILE = "results.json"
#: evaluation positions in pipeline order
POSITIONS = ("pretrain", "transformed", "fake_quant", "fake_quant_wo_kv")
_BLOCK = re.compile(r"^(?P<prefix>.*?)\.(?P<index>\d+)\.(?P<rest>.+)$")


@dataclass
class Run:
    dir: Path
    label: str
    results: dict[str, Any]


def load_run(run_dir: str | Path, label: str | None = None) -> Run:
    """A run folder (holding results.json), or a results.json path."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results.json (is this an llmcq run folder?)")
    results = json.loads(path.read_text())
    return Run(path.parent, label or path.parent.name, results)


def _positions(eval_: dict[str, Any]) -> list[str]:
    return [p for p in POSITIONS if p in eval_] + [p for p in eval_ if p not in POSITIONS]


def metric_rows(results: dict[str, Any]) -> list[tuple[str, str, str, float]]:
    """Every scalar metric of ``eval``: ``(position, dataset/task, metric, value)``."""
    rows = []
    ev = results.get("eval", {})
    for pos in _positions(ev):
        for ds, entry in ev[pos].items():
            for metric, value in entry.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    rows.append((pos, ds, metric, value))
    return rows


def by_block(values: dict[str, float]) -> tuple[list[int], list[str], list[list[float | None]]]:
    """``{full linear name: value}`` as a grid: block indices, linear names within a block
    (first-seen order), and ``grid[linear][block]`` (None where a block lacks the linear)."""
    blocks: list[int] = []
    names: list[str] = []
    cells: dict[tuple[str, int], float] = {}
    for full, v in values.items():
        m = _BLOCK.match(full)
        if m is None or v is None:
            continue
        i, rest = int(m["index"]), m["rest"]
        if i not in blocks:
            blocks.append(i)
        if rest not in names:
            names.append(rest)
        cells[(rest, i)] = float(v)
    blocks.sort()
    return blocks, names, [[cells.get((n, b)) for b in blocks] for n in names]


def linear_field(results: dict[str, Any], key: str) -> dict[str, float]:
    """``{linear: linears[linear][key]}`` for the linears that have it."""
    return {n: e[key] for n, e in results.get("linears", {}).items()
            if e.get(key) is not None}


def kl_histograms(results: dict[str, Any]) -> list[tuple[str, str, dict[str, list]]]:
    """``(position, dataset, {"edges", "counts"})`` of each KL histogram."""
    ev = results.get("eval", {})
    return [(pos, ds, e["kl_hist"]) for pos in _positions(ev) for ds, e in ev[pos].items()
            if isinstance(e.get("kl_hist"), dict)]


def final_position(results: dict[str, Any]) -> str | None:
    """The last position evaluated (the compressed model's, or pretrain for a float run)."""
    pos = _positions(results.get("eval", {}))
    pos = [p for p in pos if p != "fake_quant_wo_kv"] or pos
    return pos[-1] if pos else None


def size_point(results: dict[str, Any]) -> dict[str, float | None]:
    """A run's size: ``bits_per_param`` (16 for a float run: no quantized linear) and
    ``bytes`` (the largest export written, None without exports)."""
    comp = results.get("compression", {})
    bpp = comp.get("bits_per_param")
    if bpp is None and not results.get("quantized_linears"):
        bpp = 16.0
    sizes = [v for v in (comp.get("export_bytes") or {}).values() if isinstance(v, (int, float))]
    return {"bits_per_param": bpp, "bytes": float(max(sizes)) if sizes else None}
