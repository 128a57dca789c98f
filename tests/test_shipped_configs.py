"""Every example config under configs/ validates (keys, values, plugins, files), with its
``../shared/data`` paths pointed at the offline data wherever the checkout sits."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmcq.config.loader import resolve_config
from llmcq.testing.paths import shipped_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_there_are_configs() -> None:
    assert len(CONFIGS) >= 15


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_shipped_config_validates(path: Path, shared_data: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # any other relative path is relative to the repository root
    raw = shipped_config(path, shared_data)
    raw.setdefault("save", {})["save_path"] = str(tmp_path / "out")
    resolved = resolve_config(raw)
    assert resolved.config.model is not None
