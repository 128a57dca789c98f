"""The report's figures (matplotlib, Agg backend): each function returns PNG bytes, or
None when the runs hold no data for it."""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from llmcq_report.data import (  # noqa: E402
    Run,
    by_block,
    final_position,
    kl_histograms,
    linear_field,
    size_point,
)

__all__ = ["linear_heatmap", "block_error", "group_bits_map", "kl_histogram", "tradeoff"]


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def linear_heatmap(values: dict[str, float], title: str, label: str) -> bytes | None:
    """A [linear × block] map of one per-linear value."""
    blocks, names, grid = by_block(values)
    if not blocks:
        return None
    arr = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.28 * len(blocks) + 2.5),
                                    0.35 * len(names) + 1.6))
    im = ax.imshow(arr, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    step = max(1, len(blocks) // 16)
    ax.set_xticks(range(0, len(blocks), step), [str(b) for b in blocks[::step]], fontsize=8)
    ax.set_xlabel("block")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=label)
    return _png(fig)


def block_error(runs: list[Run]) -> bytes | None:
    """Relative output error of each block on the calibration data, per run."""
    series = [(r.label, r.results.get("calibration_error", {}).get("blocks", {})) for r in runs]
    series = [(lab, s) for lab, s in series if s]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for lab, s in series:
        idx = [int(k.rsplit(".", 1)[-1]) for k in s]
        order = np.argsort(idx)
        ax.plot(np.array(idx)[order], np.array(list(s.values()))[order], marker="o", ms=3,
                label=lab)
    ax.set_xlabel("block")
    ax.set_ylabel("‖B̂(h) − B(h)‖ / ‖B(h)‖")
    ax.set_yscale("log")
    ax.set_title("per-block relative output error (calibration data)", fontsize=10)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return _png(fig)


def group_bits_map(results: dict[str, Any]) -> bytes | None:
    """Mean width of each group column of every mixed-precision linear (SliM-LLM)."""
    gb = linear_field(results, "group_bits")
    if not gb:
        return None
    names = list(gb)
    width = max(len(v) for v in gb.values())
    arr = np.full((len(names), width), np.nan)
    for i, n in enumerate(names):
        arr[i, :len(gb[n])] = gb[n]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.2 * width + 3), min(14.0, 0.12 * len(names) + 1.8)))
    im = ax.imshow(arr, aspect="auto", interpolation="nearest", cmap="magma")
    step = max(1, len(names) // 30)
    ax.set_yticks(range(0, len(names), step), names[::step], fontsize=6)
    ax.set_xlabel("group (input columns)")
    ax.set_title("bits per group (mean over output rows)", fontsize=10)
    fig.colorbar(im, ax=ax, label="bits")
    return _png(fig)


def kl_histogram(runs: list[Run]) -> bytes | None:
    """Per-token KL(float ‖ model) histograms (eval.type kl), log-spaced bins."""
    hists = [(r.label, pos, ds, h) for r in runs for pos, ds, h in kl_histograms(r.results)
             if pos != "pretrain"]
    if not hists:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for lab, pos, ds, h in hists:
        edges = np.array(h["edges"], dtype=float)
        counts = np.array(h["counts"], dtype=float)
        lo = edges.copy()
        lo[0] = edges[1] / 10 ** (1 / 8)  # the [0, 1e-6) bin drawn one step below 1e-6
        share = counts / max(counts.sum(), 1)
        ax.stairs(share, np.append(lo[:-1], edges[-1]), label=f"{lab} {pos} {ds}")
    ax.set_xscale("log")
    ax.set_xlabel("per-token KL (nats); first bin: below 1e-6")
    ax.set_ylabel("share of tokens")
    ax.set_title("KL(float ‖ compressed) per token", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _png(fig)


def tradeoff(runs: list[Run], x: str) -> bytes | None:
    """Each run's final perplexity (and task accuracy) against its size (``x``:
    ``bits_per_param`` or ``bytes``)."""
    pts: dict[tuple[str, str], list[tuple[float, float, str]]] = {}
    for r in runs:
        size = size_point(r.results)[x]
        pos = final_position(r.results)
        if size is None or pos is None:
            continue
        for ds, e in r.results["eval"][pos].items():
            for metric in ("ppl", "acc", "acc_norm", "kl_mean", "top1"):
                if isinstance(e.get(metric), (int, float)):
                    pts.setdefault((metric, ds), []).append((float(size), float(e[metric]),
                                                             r.label))
    if not pts:
        return None
    keys = sorted(pts)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        data = sorted(pts[key])
        xs, ys = [p[0] for p in data], [p[1] for p in data]
        ax.plot(xs, ys, marker="o", ls="-", lw=0.8)
        for px, py, lab in data:
            ax.annotate(lab, (px, py), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("bits per parameter" if x == "bits_per_param" else "bytes on disk")
        ax.set_title(f"{key[0]} ({key[1]})", fontsize=9)
        if key[0] in ("ppl", "kl_mean"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)
