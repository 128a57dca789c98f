"""OmniQuant parity across a refactor: fixed short settings on the bundled SmolLM2-135M,
evaluated by core's perplexity code, with a fingerprint of every record.

Written before OmniQuant moved onto core's block-reconstruction harness (``llmcq.recon``),
run once on the code before the move (``--label before``) and once after (``--label
after``); both land in one JSON, and the script says whether the two agree (same perplexity
to 4 significant digits; on the CPU the records are expected to be bit-identical too).

    .venv/bin/python plugins/algorithms/omniquant/scripts/harness_parity.py --label before
    .venv/bin/python plugins/algorithms/omniquant/scripts/harness_parity.py --label after

Other engineers edit the same checkout meanwhile, so the two runs are best made on frozen
snapshots (``git archive <commit> | tar -x -C /tmp/tree``, the script copied in, every
``src`` folder of the snapshot on ``PYTHONPATH`` ahead of the editable installs, ``--out``
pointing back here and ``--commit`` naming the snapshot): see the JSON's ``protocol``.

Settings (CPU, float32, seed 42; calibration: CALIB_N x CALIB_LEN tokens of
wikitext2/valid.txt, bs 1; evaluation: WINDOWS x SEQ tokens of wikitext2/test.txt):

* ``w3g64_lwc_let``: weight-only W3 g64 asymmetric, LWC + LET (alpha 0.5), 2 epochs,
  ``quant_out: True``;
* ``w4a8_lwc_let_aug``: W4 per-channel asymmetric, A8 per-token dynamic, LWC + LET
  (alpha 0.75, let_lr 1e-3), aug_loss, search_clip_init, 1 epoch, ``quant_out: True``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import llmcq
from llmcq.config.loader import resolve_config
from llmcq.model.loading import ModelSource, bundled_model_path, load_pretrained
from llmcq.pipeline.runner import run
from llmcq.testing.paths import shared_data_dir

REPO = Path(__file__).resolve().parents[4]
OUT = REPO / "bench" / "results" / "omniquant_harness_parity.json"
CALIB_N, CALIB_LEN = 4, 256
WINDOWS, SEQ = 4, 512
LEARN = {"calib_algo": "learnable", "ste": True}

SETTINGS: dict[str, dict[str, Any]] = {
    "w3g64_lwc_let": {
        "weight": {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 64,
                   **LEARN},
        "special": {"epochs": 2, "lwc": True, "let": True, "alpha": 0.5, "lwc_lr": 0.01,
                    "let_lr": 0.005},
    },
    "w4a8_lwc_let_aug": {
        "weight": {"bit": 4, "symmetric": False, "granularity": "per_channel", **LEARN},
        "act": {"bit": 8, "symmetric": False, "granularity": "per_token", "ste": True},
        "special": {"epochs": 1, "lwc": True, "let": True, "alpha": 0.75, "let_lr": 0.001,
                    "aug_loss": True, "search_clip_init": True},
    },
}


class _Records:
    """Keeps the run's records when rank 0 evaluates."""

    def __init__(self) -> None:
        self.records: dict[str, Any] = {}

    @llmcq.hookimpl
    def llmcq_evaluate(self, run: Any) -> list:
        self.records = dict(run.records)
        return []


def fingerprint(records: dict[str, Any]) -> str:
    """sha256 over every record's codes, scales and zeros, in name order."""
    h = hashlib.sha256()
    for name in sorted(records):
        r = records[name]
        h.update(name.encode())
        for t in (r.qweight, r.scale, r.zero):
            if t is not None:
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def config(data: Path, save: Path, setting: dict[str, Any]) -> dict[str, Any]:
    quant: dict[str, Any] = {"method": "omniquant", "weight": setting["weight"],
                             "special": setting["special"], "quant_out": True}
    if "act" in setting:
        quant["act"] = setting["act"]
    return {
        "base": {"seed": 42, "device": "cpu"},
        "model": {"type": "llama"},
        "calib": {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                  "n_samples": CALIB_N, "seq_len": CALIB_LEN, "preproc": "wikitext2_gptq",
                  "bs": 1, "seed": 42},
        "eval": {"eval_pos": ["fake_quant"], "name": "wikitext2",
                 "path": str(data / "wikitext2" / "test.txt"), "seq_len": SEQ,
                 "num_samples": WINDOWS},
        "quant": quant,
        "save": {"save_path": str(save), "overwrite": True},
    }


def ensure_llama_roles() -> str:
    """LET needs declared roles (a config-time check of the core-contracts cut); while the
    llama adapter's layout does not declare them yet, use core's ``llama_like_layout()``:
    the same groups (linears, producers, inspect modules, in the same order) with roles."""
    from llmcq.model.layout import llama_like_layout
    from llmcq_llama.adapter import LlamaAdapter

    if LlamaAdapter.layout.block.has_roles:
        return "llama adapter (declares roles)"
    ours = llama_like_layout()

    def plain(layout: Any) -> list[tuple[Any, ...]]:
        return [(g.linears, g.prev_op, g.prev_kind, g.inspect, g.inspect_kwargs)
                for g in layout.block.groups]

    assert plain(ours) == plain(LlamaAdapter.layout), "layouts differ beyond roles"
    LlamaAdapter.layout = ours
    return "llama adapter with core's llama_like_layout() (same groups, roles declared)"


def measure(names: list[str]) -> dict[str, Any]:
    import tempfile

    data = shared_data_dir()
    gguf = bundled_model_path()
    assert data is not None and gguf is not None, "offline data or bundled model missing"
    model, tok = load_pretrained(ModelSource(gguf.parent, gguf.name))
    torch.set_num_threads(2)
    out: dict[str, Any] = {}
    for name in names:
        spy = _Records()
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            res = run(resolve_config(config(data, Path(tmp) / "out", SETTINGS[name]),
                                     overwrite=True),
                      progress=False, model=copy.deepcopy(model), tokenizer=tok,
                      extra_plugins=[spy])
            seconds = time.perf_counter() - start
        ppl = res["eval"]["fake_quant"]["wikitext2"]["ppl"]
        summary = res["recipe"][0]
        out[name] = {"ppl": ppl, "ppl_4sig": float(f"{ppl:.4g}"),
                     "records_sha256": fingerprint(spy.records),
                     "block_loss_first3": summary["block_loss"][:3],
                     "block_loss_last": summary["block_loss"][-1],
                     "nonfinite_loss_blocks": summary["nonfinite_loss_blocks"],
                     "seconds": round(seconds, 1)}
        print(name, json.dumps(out[name]), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", required=True, help="before | after (a key of the JSON)")
    ap.add_argument("--only", default=",".join(SETTINGS), help="comma-separated settings")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--commit", default=None, help="label of the code measured (default: "
                    "git HEAD); for a snapshot outside the checkout")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                           capture_output=True, text=True).stdout.strip()
    layout = ensure_llama_roles()
    results = measure(names)
    data = json.loads(args.out.read_text()) if args.out.is_file() else {}
    data.setdefault("protocol", {
        "model": "bundled SmolLM2-135M (GGUF, float32), CPU", "calib": f"wikitext2 valid "
        f"{CALIB_N} x {CALIB_LEN}, bs 1, seed 42", "eval": f"wikitext2 test {WINDOWS} x {SEQ}",
        "settings": SETTINGS, "script": "plugins/algorithms/omniquant/scripts/harness_parity.py"})
    data[args.label] = {"commit": commit, "torch": torch.__version__, "layout": layout,
                        "results": results}
    if "before" in data and "after" in data:
        same = {}
        for n, b in data["before"]["results"].items():
            a = data["after"]["results"].get(n)
            if a is not None:
                same[n] = {"ppl_4sig_equal": a["ppl_4sig"] == b["ppl_4sig"],
                           "ppl_bit_equal": a["ppl"] == b["ppl"],
                           "records_bit_equal": a["records_sha256"] == b["records_sha256"]}
        data["agreement"] = same
        print("agreement:", json.dumps(same))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
