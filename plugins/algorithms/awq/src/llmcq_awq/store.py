"""Saved scales and clip ranges: what ``save_scale``/``save_clip`` write and
``load_scale``/``load_clip`` read, so a later run (or another algorithm) reuses them.

``<scale_path>/scales.pth`` (llmc's file name and layout): ``{full linear name: s}``, where
``s`` (float32, ``[c_in]``) multiplied the linear's input columns (``W' = W diag(s)``) and
divided its producer's outputs. Under grouped-query attention ``o_proj``'s entry is the
kv-channel scale repeated over the query heads of each kv head.

``<clip_path>/clips.pth``: ``{full linear name: {"lo": [out, G], "hi": [out, G]}}``, the
absolute per-group bounds the (scaled) weight is clamped to, ``G`` groups of the run's
``quant.weight`` granularity (one per row unless per-group).

Files are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from llmcq.errors import DataError

__all__ = ["write_atomic", "read_scales", "read_clips"]


def write_atomic(folder: str | Path, name: str, obj: Any) -> Path:
    """``torch.save(obj)`` to ``folder/name`` through a temporary file and a rename."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / name)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return folder / name


def _read(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable, truncated, or not a plain tensor dict
        raise DataError(f"{path}: cannot read saved AWQ results: {exc}") from exc


def read_scales(path: Path) -> dict[str, torch.Tensor]:
    data = _read(path)
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) and v.dim() == 1
                                             for v in data.values()):
        raise DataError(f"{path}: expected {{linear name: 1-D scale tensor}}")
    return {str(k): v.float() for k, v in data.items()}


def read_clips(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    data = _read(path)
    ok = isinstance(data, dict) and all(
        isinstance(v, dict) and isinstance(v.get("lo"), torch.Tensor)
        and isinstance(v.get("hi"), torch.Tensor) for v in data.values())
    if not ok:
        raise DataError(f"{path}: expected {{linear name: {{'lo': tensor, 'hi': tensor}}}}")
    return {str(k): (v["lo"].float(), v["hi"].float()) for k, v in data.items()}
