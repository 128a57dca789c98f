"""Where each task's data lies under the data root (``eval.path``), torch-free and
lm-eval-free, so the config-time checks can name a missing file.

Two layouts:

* the files shipped in ``../shared/data`` as their sources publish them (``LAYOUTS``):
  ``piqa`` = ``piqa/valid.jsonl`` + ``piqa/valid-labels.lst`` (joined line by line into the
  ``label`` field lm-eval's ``piqa`` task reads), ``lambada_openai`` =
  ``lambada/lambada_test.jsonl``;
* any other lm-evaluation-harness task ``T``: ``<root>/T/test.jsonl`` or
  ``<root>/T/validation.jsonl``, one record per line with the fields that task's lm-eval config
  reads (the columns of its Hugging Face dataset). It is served as the split the task scores
  (its ``test_split``, else its ``validation_split``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Layout", "LAYOUTS", "GENERIC_SPLITS", "task_files", "available", "materialize"]

#: file names of the generic layout, in the order they are looked for
GENERIC_SPLITS = ("test.jsonl", "validation.jsonl")


@dataclass(frozen=True)
class Layout:
    """A task's files under the data root, and how to turn them into one JSON Lines file of
    lm-eval's records (None: the first file already is)."""

    files: tuple[str, ...]
    join: Callable[[list[Path], Path], None] | None = None


def _piqa(files: list[Path], out: Path) -> None:
    """PIQA's questions and its separate label file as records with ``label`` (int)."""
    rows = files[0].read_text(encoding="utf-8").splitlines()
    labels = files[1].read_text(encoding="utf-8").split()
    rows = [r for r in rows if r.strip()]
    if len(rows) != len(labels):
        raise ValueError(f"{files[0]} has {len(rows)} items but {files[1]} {len(labels)} labels")
    with out.open("w", encoding="utf-8") as f:
        for row, label in zip(rows, labels, strict=True):
            rec = json.loads(row)
            rec["label"] = int(label)
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


LAYOUTS: dict[str, Layout] = {
    "piqa": Layout(("piqa/valid.jsonl", "piqa/valid-labels.lst"), _piqa),
    "lambada_openai": Layout(("lambada/lambada_test.jsonl",)),
}


def task_files(task: str, root: str | Path) -> tuple[list[Path], list[Path]]:
    """``(files, missing)``: the files ``task`` reads under ``root`` and those absent.
    A task outside :data:`LAYOUTS` reads the first of ``<root>/<task>/test.jsonl`` and
    ``validation.jsonl`` present (both missing: both are listed as missing)."""
    root = Path(root).expanduser()
    if task in LAYOUTS:
        files = [root / f for f in LAYOUTS[task].files]
        return files, [f for f in files if not f.is_file()]
    cands = [root / task / s for s in GENERIC_SPLITS]
    found = [c for c in cands if c.is_file()]
    return (found[:1], []) if found else (cands, cands)


def available(root: str | Path) -> list[str]:
    """Task names whose data is on disk under ``root`` (both layouts), sorted."""
    root = Path(root).expanduser()
    names = {t for t in LAYOUTS if not task_files(t, root)[1]}
    if root.is_dir():
        names |= {d.name for d in root.iterdir()
                  if d.is_dir() and any((d / s).is_file() for s in GENERIC_SPLITS)}
    return sorted(names)


def materialize(task: str, root: str | Path, workdir: Path) -> Path:
    """The JSON Lines file lm-eval's ``json`` builder reads for ``task``: the data file itself,
    or (PIQA) the joined records written under ``workdir``."""
    files, missing = task_files(task, root)
    if missing:
        raise FileNotFoundError(f"task {task}: missing {', '.join(map(str, missing))}")
    layout = LAYOUTS.get(task)
    if layout is None or layout.join is None:
        return files[0]
    out = workdir / f"{task}.jsonl"
    layout.join(files, out)
    return out
