"""Shared helpers for benchmarks: run `llmcq run` on a config dict in a subprocess (so each
run's peak memory and timings are its own) and collect results.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
#: the offline texts: $LLMCQ_SHARED_DATA (as in the tests), else ../shared/data
DATA = Path(os.environ.get("LLMCQ_SHARED_DATA") or (REPO / ".." / "shared" / "data")).resolve()
WIKI_TEST = DATA / "wikitext2" / "test.txt"
WIKI_VALID = DATA / "wikitext2" / "valid.txt"
#: the CLI: $LLMCQ_BIN (a machine where the packages sit in a --target folder), else the
#: ``llmcq`` script beside this interpreter
LLMCQ = os.environ.get("LLMCQ_BIN") or str(Path(sys.executable).with_name("llmcq"))


def run_config(config: dict[str, Any], *, label: str, log_dir: Path | None = None) -> dict[str, Any]:
    """Run one config with the llmcq CLI; return its results.json (raises on failure)."""
    with tempfile.TemporaryDirectory(prefix="llmcq-bench-") as tmp:
        cfg = json.loads(json.dumps(config))
        cfg.setdefault("save", {})["save_path"] = str(Path(tmp) / "out")
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        proc = subprocess.run([LLMCQ, "run", str(path), "--no-progress"], capture_output=True,
                              text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            (log_dir / f"{label}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"{label} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads((Path(tmp) / "out" / "results.json").read_text())


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
