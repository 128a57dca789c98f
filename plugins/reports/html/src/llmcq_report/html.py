"""The HTML page: tables of every scalar number of results.json's ``eval`` and
``compression`` blocks, and the figures of :mod:`llmcq_report.plots`, each embedded as a
base64 PNG (the page opens offline on its own) and also written beside it as a file."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from llmcq_report import plots
from llmcq_report.data import Run, linear_field, load_run, metric_rows, size_point

__all__ = ["render", "page"]

REPORT_FILE = "report.html"
FIG_DIR = "report_files"

_CSS = """body{font-family:sans-serif;margin:1.5em;max-width:1200px}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;
padding:2px 8px;font-size:13px;text-align:left}td.num{text-align:right;font-family:monospace}
h2{margin-top:1.6em}.missing{color:#777;font-style:italic}figure{margin:0.5em 0 1.5em}"""


def _num(v: Any, key: str) -> str:
    """A number cell: shown to 6 significant digits; ``data-value`` holds it exactly."""
    return (f'<td class="num" data-key="{html.escape(key)}" data-value="{v!r}">'
            f"{format(v, '.6g') if isinstance(v, float) else v}</td>")


def _eval_table(run: Run, i: int) -> str:
    rows = metric_rows(run.results)
    if not rows:
        return '<p class="missing">no evaluation in this run</p>'
    out = ["<table><tr><th>position</th><th>dataset / task</th><th>metric</th>"
           "<th>value</th></tr>"]
    for pos, ds, metric, v in rows:
        out.append(f"<tr><td>{html.escape(pos)}</td><td>{html.escape(ds)}</td>"
                   f"<td>{html.escape(metric)}</td>{_num(v, f'{i}/eval/{pos}/{ds}/{metric}')}</tr>")
    return "\n".join(out) + "</table>"


def _compression_table(run: Run, i: int) -> str:
    comp = run.results.get("compression", {})
    cells = [(k, v) for k, v in comp.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
    cells += [(f"export_bytes/{k}", v) for k, v in (comp.get("export_bytes") or {}).items()]
    if not cells:
        return ""
    return "<table><tr><th>compression</th><th>value</th></tr>" + "".join(
        f"<tr><td>{html.escape(k)}</td>{_num(v, f'{i}/compression/{k}')}</tr>"
        for k, v in cells) + "</table>"


class _Figures:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0

    def html(self, png: bytes | None, caption: str, missing: str) -> str:
        if png is None:
            return f'<p class="missing">{html.escape(caption)}: {html.escape(missing)}</p>'
        self.count += 1
        name = f"fig{self.count:02d}.png"
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / name).write_bytes(png)
        data = base64.b64encode(png).decode()
        return (f'<figure><img alt="{html.escape(caption)}" data-file="{FIG_DIR}/{name}" '
                f'src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}'
                "</figcaption></figure>")


def page(runs: list[Run], fig_dir: Path) -> str:
    """The page's HTML (figures written to ``fig_dir`` too)."""
    figs = _Figures(fig_dir)
    title = "llmcq report: " + ", ".join(r.label for r in runs)
    body = [f"<h1>{html.escape(title)}</h1>"]
    if len(runs) > 1:
        body.append("<h2>Quality against size</h2>")
        body.append(figs.html(plots.tradeoff(runs, "bits_per_param"),
                              "final-position metrics against bits per parameter",
                              "no run has both a size and an evaluation"))
        body.append(figs.html(plots.tradeoff(runs, "bytes"),
                              "final-position metrics against bytes on disk (largest export)",
                              "no run wrote an export"))
        body.append(figs.html(plots.block_error(runs), "per-block error, all runs",
                              "no run recorded calibration errors"))
        body.append(figs.html(plots.kl_histogram(runs), "KL histograms, all runs",
                              "no run evaluated eval.type: kl"))
    for i, run in enumerate(runs):
        res = run.results
        size = size_point(res)
        body.append(f'<h2 id="run{i}">{html.escape(run.label)}</h2>')
        recipe = ", ".join(s.get("method", "?") for s in res.get("recipe", [])) or "none (float)"
        body.append(f"<p>{html.escape(str(run.dir))}; model "
                    f"{html.escape(str(res.get('model_source', '?')))}; recipe "
                    f"{html.escape(recipe)}; bits per parameter {size['bits_per_param']}</p>")
        body.append(_eval_table(run, i))
        body.append(_compression_table(run, i))
        errs = res.get("calibration_error", {})
        body.append(figs.html(plots.linear_heatmap(errs.get("linears", {}),
                                                   "per-linear relative output error "
                                                   "(calibration data)", "‖ŷ − y‖ / ‖y‖"),
                              "per-linear relative output error",
                              "not recorded (the run had no calibration data, or no "
                              "quantized linear)"))
        if len(runs) == 1:
            body.append(figs.html(plots.block_error([run]), "per-block relative output error",
                                  "not recorded (no calibration data)"))
        bits = linear_field(res, "weight_bits")
        mixed = len(set(bits.values())) > 1
        body.append(figs.html(plots.linear_heatmap(bits, "weight bits per linear", "bits")
                              if mixed else None, "weight bits per linear",
                              "uniform width" + (f" ({next(iter(bits.values()))} bits)"
                                                 if bits else " (no quantized linear)")))
        body.append(figs.html(plots.group_bits_map(res), "bits per group (mixed precision)",
                              "no per-group widths in this run's records"))
        body.append(figs.html(plots.linear_heatmap(linear_field(res, "sparsity"),
                                                   "sparsity per linear", "share pruned"),
                              "sparsity per layer", "nothing pruned"))
        if len(runs) == 1:
            body.append(figs.html(plots.kl_histogram([run]), "per-token KL histogram",
                                  "no eval.type: kl in this run"))
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{_CSS}</style></head><body>\n" + "\n".join(body)
            + "\n</body></html>\n")


def render(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Write the report of ``run_dirs`` (folders holding results.json) and return its path:
    ``out`` (a file, or a folder to put report.html in), else the first run's folder."""
    runs = [load_run(d) for d in run_dirs]
    labels = [r.label for r in runs]
    for r in runs:  # two runs in folders of the same name: tell them apart
        if labels.count(r.label) > 1:
            r.label = str(r.dir)
    if out is None:
        target = runs[0].dir / REPORT_FILE
    else:
        target = Path(out)
        if target.is_dir() or target.suffix.lower() not in (".html", ".htm"):
            target = target / REPORT_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    for old in (target.parent / FIG_DIR).glob("fig*.png"):  # an earlier report's figures
        old.unlink()
    text = page(runs, target.parent / FIG_DIR)
    target.write_text(text, encoding="utf-8")
    return target
