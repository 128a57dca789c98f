"""Typed hand-off between recipe steps: named artefacts a step publishes and later steps
(or a later run) read.

A step publishes per linear (full module names), for example AWQ after each block::

    run.artefacts.publish("scales", {"model.layers.0.mlp.down_proj": s}, producer="awq")
    run.artefacts.publish("clips", {"model.layers.0.mlp.down_proj": (lo, hi)}, producer="awq")

and a later step reads what earlier steps left for the block it is processing::

    clips = run.artefacts.for_block("clips", block)   # {relative name: (lo, hi)}

Kinds (:data:`KINDS`) fix what a value is:

* ``scales``: ``s`` (float32 ``[c_in]``) that multiplied the linear's input columns
  (``W' = W diag(s)``) and divided its producer's outputs; under grouped-query attention
  ``o_proj``'s entry is the kv-channel scale repeated over the query heads of each kv head;
* ``clips``: ``(lo, hi)``, each ``[out, G]``: the absolute per-group bounds the (scaled)
  weight is clamped to, ``G`` groups of the run's weight granularity.

On disk (llmc's keys ``save_scale``/``scale_path``, ``save_clip``/``clip_path``,
``load_transform``): ``<folder>/scales.pth`` is ``{name: s}``, ``<folder>/clips.pth`` is
``{name: {"lo": tensor, "hi": tensor}}``, written atomically (temporary file, then rename)
by :meth:`ArtefactStore.save` and read back, validated, by :func:`load_artefact`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmcq.errors import DataError, OutputExistsError

if TYPE_CHECKING:
    from llmcq.pipeline.blockwise import Block

__all__ = ["ArtefactKind", "KINDS", "ArtefactStore", "load_artefact", "write_artefact"]


def _check_scales(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor) and value.dim() == 1


def _check_clips(value: Any) -> bool:
    import torch

    return isinstance(value, tuple) and len(value) == 2 and all(
        isinstance(v, torch.Tensor) and v.dim() == 2 for v in value) and \
        value[0].shape == value[1].shape


def _scales_to_file(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.detach().float().cpu() for k, v in values.items()}


def _scales_from_file(data: Any) -> dict[str, Any]:
    import torch

    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) and v.dim() == 1
                                             for v in data.values()):
        raise ValueError("expected {linear name: 1-D scale tensor}")
    return {str(k): v.float() for k, v in data.items()}


def _clips_to_file(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: {"lo": lo.detach().float().cpu(), "hi": hi.detach().float().cpu()}
            for k, (lo, hi) in values.items()}


def _clips_from_file(data: Any) -> dict[str, Any]:
    import torch

    ok = isinstance(data, dict) and all(
        isinstance(v, dict) and isinstance(v.get("lo"), torch.Tensor)
        and isinstance(v.get("hi"), torch.Tensor) for v in data.values())
    if not ok:
        raise ValueError("expected {linear name: {'lo': tensor, 'hi': tensor}}")
    return {str(k): (v["lo"].float(), v["hi"].float()) for k, v in data.items()}


@dataclass(frozen=True)
class ArtefactKind:
    """What one kind of artefact is, and how it is stored on disk."""

    name: str
    file: str
    doc: str
    check: Callable[[Any], bool]
    to_file: Callable[[Mapping[str, Any]], dict[str, Any]]
    from_file: Callable[[Any], dict[str, Any]]


KINDS: dict[str, ArtefactKind] = {
    "scales": ArtefactKind("scales", "scales.pth", "per-input-channel scale s folded into "
                           "the linear (W' = W diag(s)) and its producer", _check_scales,
                           _scales_to_file, _scales_from_file),
    "clips": ArtefactKind("clips", "clips.pth", "per-group clip bounds (lo, hi), each "
                          "[out, groups], of the (scaled) weight", _check_clips,
                          _clips_to_file, _clips_from_file),
}


def _kind(name: str) -> ArtefactKind:
    if name not in KINDS:
        raise KeyError(f"unknown artefact kind {name!r}; known: {', '.join(KINDS)}")
    return KINDS[name]


class ArtefactStore:
    """The run's artefacts, by kind and full linear name (kept on the CPU)."""

    def __init__(self) -> None:
        self._values: dict[str, dict[str, Any]] = {}
        self._producers: dict[str, dict[str, str]] = {}

    def publish(self, kind: str, values: Mapping[str, Any], *, producer: str) -> None:
        """Record ``values`` (full linear name -> value of ``kind``); a later publication of
        the same name replaces the earlier one."""
        k = _kind(kind)
        store = self._values.setdefault(kind, {})
        owners = self._producers.setdefault(kind, {})
        for name, value in values.items():
            if not k.check(value):
                raise TypeError(f"artefact {kind!r} for {name}: expected {k.doc}")
            store[name] = _to_cpu(value)
            owners[name] = producer

    def get(self, kind: str) -> dict[str, Any]:
        """Every published value of ``kind`` (full names)."""
        _kind(kind)
        return dict(self._values.get(kind, {}))

    def for_block(self, kind: str, block: Block, *, device: Any = None) -> dict[str, Any]:
        """The values of ``kind`` for ``block``'s linears, by name relative to the block
        (moved to ``device`` when given)."""
        prefix = block.name + "."
        out = {}
        for name, value in self._values.get(kind, {}).items():
            if name.startswith(prefix):
                out[name[len(prefix):]] = _to(value, device) if device is not None else value
        return out

    def producer(self, kind: str, name: str) -> str | None:
        return self._producers.get(kind, {}).get(name)

    def save(self, kind: str, folder: str | Path, *, overwrite: bool) -> Path:
        """Write every value of ``kind`` to ``<folder>/<file>`` atomically."""
        k = _kind(kind)
        target = Path(folder).expanduser() / k.file
        if target.exists() and not overwrite:
            raise OutputExistsError(f"{target} already exists; choose another path or pass "
                                    "--overwrite (save.overwrite: true)")
        return write_artefact(folder, k.file, k.to_file(self._values.get(kind, {})))

    def load(self, kind: str, folder: str | Path, *, producer: str) -> dict[str, Any]:
        """Read ``<folder>/<file>`` of ``kind`` and publish it; returns what was read."""
        values = load_artefact(kind, folder)
        self.publish(kind, values, producer=producer)
        return values


def _to_cpu(value: Any) -> Any:
    return _to(value, "cpu")


def _to(value: Any, device: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(v.detach().to(device) for v in value)
    return value.detach().to(device)


def write_artefact(folder: str | Path, name: str, obj: Any) -> Path:
    """``torch.save(obj)`` to ``folder/name`` through a temporary file and a rename."""
    import torch

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


def load_artefact(kind: str, folder: str | Path) -> dict[str, Any]:
    """The artefact file of ``kind`` in ``folder``, validated; :class:`DataError` names the
    file when it is missing, unreadable or of the wrong layout."""
    import torch

    k = _kind(kind)
    path = Path(folder).expanduser() / k.file
    if not path.is_file():
        raise DataError(f"{path}: no saved {kind} (write them with save_"
                        f"{kind.rstrip('s')}: True)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        return k.from_file(data)
    except Exception as exc:  # unreadable, truncated, or another layout
        raise DataError(f"{path}: cannot read saved {kind}: {exc}") from exc
