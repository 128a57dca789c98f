"""The allocation file: every group's width, per linear, saved by one run and read by another.

The format is the reference code's (``torch.save`` of ``{block index: {linear name relative
to the block: [width of each group]}}``, its ``block_precision_<g>_<N>bit/<model>.pt``), so
its published files load here and ours load there. Widths are checked against this run: one
per group of ``quant.weight.group_size`` columns, within 1..8, and a mean over the columns of
exactly ``quant.weight.bit``.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from llmcq.artefacts import write_artefact
from llmcq.errors import DataError, OutputExistsError

__all__ = ["Allocation", "load_allocation", "save_allocation", "check_writable", "widths_for"]

#: ``{block index: {linear name: [width per group]}}``
Allocation = dict[int, dict[str, list[int]]]


def load_allocation(path: str | Path) -> Allocation:
    """Read and shape-check an allocation file (:class:`DataError` naming the path)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"allocation file {p} does not exist (quant.special.allocation_path)")
    try:
        raw: Any = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise DataError(f"allocation file {p} is not a torch.save file of "
                        f"{{block: {{linear: [bits]}}}}: {exc}") from exc
    if not isinstance(raw, dict):
        raise DataError(f"allocation file {p}: expected {{block: {{linear: [bits]}}}}, got "
                        f"{type(raw).__name__}")
    out: Allocation = {}
    for block, linears in raw.items():
        try:
            index = int(block)
        except (TypeError, ValueError):
            raise DataError(f"allocation file {p}: block key {block!r} is not an index") \
                from None
        if not isinstance(linears, dict):
            raise DataError(f"allocation file {p}: block {index} holds "
                            f"{type(linears).__name__}, not {{linear: [bits]}}")
        out[index] = {}
        for name, bits in linears.items():
            values = bits.tolist() if isinstance(bits, torch.Tensor) else bits
            if not isinstance(values, (list, tuple)) or not all(
                    isinstance(b, int) and not isinstance(b, bool) for b in values):
                raise DataError(f"allocation file {p}: block {index} {name}: expected a "
                                f"list of integer widths")
            out[index][str(name)] = [int(b) for b in values]
    return out


def widths_for(alloc: Allocation, path: str | Path, block: int, name: str, in_features: int,
               group_size: int, bits: int) -> torch.Tensor:
    """The widths ``[G]`` (long) of one linear, checked against this run's grid."""
    where = f"allocation file {path}: block {block} {name}"
    if block not in alloc or name not in alloc[block]:
        raise DataError(f"allocation file {path} has no widths for block {block} linear "
                        f"{name}; it was made for another model (or another set of linears)")
    widths = alloc[block][name]
    G = -(-in_features // group_size)
    if len(widths) != G:
        raise DataError(f"{where}: {len(widths)} groups, but quant.weight.group_size "
                        f"{group_size} gives {G} for {in_features} input columns")
    if min(widths) < 1 or max(widths) > 8:
        raise DataError(f"{where}: widths must lie in 1..8, got {min(widths)}..{max(widths)}")
    cols = [group_size] * (G - 1) + [in_features - group_size * (G - 1)]
    mean = Fraction(sum(b * c for b, c in zip(widths, cols, strict=True)), in_features)
    if mean != bits:
        raise DataError(f"{where}: mean width {float(mean):g}, but quant.weight.bit is {bits} "
                        "(the file was made for another budget)")
    return torch.tensor(widths, dtype=torch.long)


def check_writable(path: str | Path, *, overwrite: bool) -> None:
    """Refuse to replace an existing file without ``--overwrite``, before any work."""
    p = Path(path).expanduser()
    if p.exists() and not overwrite:
        raise OutputExistsError(f"{p} already exists (quant.special.save_allocation); choose "
                                "another path or pass --overwrite (save.overwrite: true)")


def save_allocation(path: str | Path, alloc: Allocation) -> Path:
    """Write ``alloc`` in the reference's format, atomically."""
    p = Path(path).expanduser()
    data = {int(i): {n: [int(b) for b in w] for n, w in linears.items()}
            for i, linears in sorted(alloc.items())}
    return write_artefact(p.parent, p.name, data)
