"""Where the offline shared data lives (torch-free)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["shared_data_dir", "shipped_config"]


def shared_data_dir() -> Path | None:
    """``$LLMCQ_SHARED_DATA``, else ``../shared/data`` beside the checkout, else /work/shared."""
    candidates = []
    if os.environ.get("LLMCQ_SHARED_DATA"):
        candidates.append(Path(os.environ["LLMCQ_SHARED_DATA"]))
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidates.append(parent.parent / "shared" / "data")
        if (parent / ".git").exists():
            break
    candidates.append(Path("/work/shared/data"))
    for c in candidates:
        if (c / "wikitext2" / "test.txt").is_file():
            return c
    return None


def shipped_config(path: Path, shared: Path) -> dict:
    """A shipped example config (``configs/**.yaml``) as a dict, with its ``../shared/data``
    paths pointed at ``shared`` (the checkout may not sit beside the shared folder)."""
    import yaml

    def fix(value: object) -> object:
        if isinstance(value, str) and value.startswith("../shared/data/"):
            return str(shared / value.removeprefix("../shared/data/"))
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fix(v) for v in value]
        return value

    raw = yaml.safe_load(Path(path).read_text())
    assert isinstance(raw, dict), path
    return fix(raw)  # type: ignore[return-value]
