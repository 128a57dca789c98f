"""llmcq report: the page renders from real tiny runs' results.json, every number in it
equals results.json, the figures are valid PNGs (embedded and beside the page), the CLI
writes it, and headless Chromium (when installed) loads every image."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from llmcq.config.loader import resolve_config
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.runner import run
from llmcq_report.data import metric_rows
from llmcq_report.html import render

PNG = b"\x89PNG\r\n\x1a\n"


def _config(model: Path, data: Path, save: Path, **extra: Any) -> dict[str, Any]:
    ev = {"name": "wikitext2", "path": str(data / "wikitext2" / "test.txt"), "seq_len": 64,
          "bs": 2, "num_samples": 3, "eval_pos": ["pretrain", "fake_quant"]}
    return {"base": {"seed": 0, "device": "cpu"},
            "model": {"type": "llama", "path": str(model)},
            "calib": {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                      "n_samples": 4, "seq_len": 64, "preproc": "wikitext2_gptq", "bs": 2,
                      "seed": 1},
            "eval": [{**ev, "type": "ppl"}, {**ev, "type": "kl"}],
            "save": {"save_path": str(save)}, **extra}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path,
         shared_data: Path) -> list[Path]:
    """Three real runs of the tiny Llama: SliM-LLM W2 (per-group widths), Wanda 50% + RTN
    W4 exported fake-quant (sparsity, bytes on disk), GPTQ W8."""
    root = tmp_path_factory.mktemp("report-runs")
    w = {"symmetric": False, "granularity": "per_group", "group_size": 16}
    setups = {
        "slimllm_w2": {"quant": {"method": "slimllm", "special": {},
                                 "weight": {**w, "bit": 2, "group_size": 8}}},
        "wanda_rtn_w4": {"sparse": {"method": "Wanda", "weight": {"sparsity": 0.5}},
                         "quant": {"method": "rtn", "weight": {**w, "bit": 4}}},
        "gptq_w8": {"quant": {"method": "gptq", "weight": {**w, "bit": 8}}},
    }
    out = []
    for name, extra in setups.items():
        model, tok = load_pretrained(ModelSource(tiny_llama_dir))
        cfg = _config(tiny_llama_dir, shared_data, root / name, **extra)
        if name == "wanda_rtn_w4":
            cfg["save"]["save_fake"] = True
        run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
        out.append(root / name)
    return out


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[str, tuple[str, str]] = {}
        self.imgs: list[dict[str, str]] = []
        self._key: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "td" and "data-key" in a:
            self._key = a["data-key"]
            self.cells[self._key] = (a["data-value"], "")
        if tag == "img":
            self.imgs.append(a)

    def handle_data(self, data: str) -> None:
        if self._key is not None:
            self.cells[self._key] = (self.cells[self._key][0], data)
            self._key = None


def _parse(path: Path) -> _Page:
    p = _Page()
    p.feed(path.read_text())
    return p


def _lookup(results: dict[str, Any], key: str) -> Any:
    _run, section, rest = key.split("/", 2)
    if section == "eval":
        pos, ds, metric = rest.split("/")
        return results["eval"][pos][ds][metric]
    comp = results["compression"]
    if rest.startswith("export_bytes/"):
        return comp["export_bytes"][rest.split("/", 1)[1]]
    return comp[rest]


def test_single_run_page_numbers_and_figures(runs: list[Path]) -> None:
    page = render([runs[0]])
    assert page == runs[0] / "report.html"
    results = json.loads((runs[0] / "results.json").read_text())
    parsed = _parse(page)
    evals = [k for k in parsed.cells if "/eval/" in k]
    assert len(evals) == len(metric_rows(results)) > 0
    for key, (exact, shown) in parsed.cells.items():
        value = _lookup(results, key)
        assert float(exact) == value, key
        assert shown == (format(value, ".6g") if isinstance(value, float) else str(value))
    fq = results["eval"]["fake_quant"]["wikitext2"]
    for m in ("ppl", "kl_mean", "kl_median", "kl_p99", "top1"):
        assert parsed.cells[f"0/eval/fake_quant/wikitext2/{m}"][0] == repr(fq[m])
    alts = [i["alt"] for i in parsed.imgs]
    # this run has calibration errors, per-group widths (SliM-LLM) and a KL histogram
    for alt in ("per-linear relative output error", "per-block relative output error",
                "bits per group (mixed precision)", "per-token KL histogram"):
        assert alt in alts
    for img in parsed.imgs:
        head, data = img["src"].split(",", 1)
        assert head == "data:image/png;base64"
        png = base64.b64decode(data)
        assert png.startswith(PNG) and (page.parent / img["data-file"]).read_bytes() == png


def test_several_runs_cli(runs: list[Path], tmp_path: Path, llmcq_cli: Any) -> None:
    out = tmp_path / "cmp.html"
    res = llmcq_cli("report", *map(str, runs), "--out", str(out))
    assert res.returncode == 0, res.stderr
    parsed = _parse(out)
    alts = [i["alt"] for i in parsed.imgs]
    assert "final-position metrics against bits per parameter" in alts
    assert "final-position metrics against bytes on disk (largest export)" in alts
    assert "sparsity per layer" in alts  # the Wanda run
    for i, d in enumerate(runs):
        results = json.loads((d / "results.json").read_text())
        for key, (exact, _shown) in parsed.cells.items():
            if key.startswith(f"{i}/"):
                assert float(exact) == _lookup(results, key)
    bad = llmcq_cli("report", str(tmp_path))
    assert bad.returncode != 0 and "results.json" in bad.stderr


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium binary")
def test_chromium_loads_every_image(runs: list[Path], tmp_path: Path) -> None:
    page = render(runs, tmp_path)
    probe = tmp_path / "probe.html"
    script = ("<script>window.addEventListener('load',()=>{const s=[...document.images]"
              ".map(i=>i.complete&&i.naturalWidth>0?1:0);document.title='imgs:'+s.join('')"
              "+':'+s.length;});</script>")
    probe.write_text(page.read_text().replace("</body>", script + "</body>"))
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                          "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    n = len(_parse(page).imgs)
    assert n > 0 and f"<title>imgs:{'1' * n}:{n}</title>" in dom
