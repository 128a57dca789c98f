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
by :meth:`ArtefactStore.save` and read back, validated, by :func:`load_artefact`. (llmc's
own ``clips.pth`` holds sigmoid clip *factors* keyed by block index; llmcq's holds the
absolute bounds above, so the files of one tool do not load in the other.)

Publishing and reading, by a producer and a consumer in one recipe (``[awq, omniquant]``)::

    # AWQ, after folding and searching block i
    run.artefacts.publish("scales", {block.full_name(n): s for n, s in scales.items()},
                          producer="awq")
    # OmniQuant, on the same block later in the same block loop
    clips = run.artefacts.for_block("clips", block)        # {} when no step published any
    applied = run.artefacts.for_block("scales", block)     # what was folded already

and across two runs (llmc's two-step flow: AWQ saves, a later run applies)::

    run.artefacts.save("scales", scale_path, overwrite=False, producer="awq")  # run 1
    scales = load_artefact("scales", scale_path)                               # run 2
    fold_saved_scales(block, scales, heads=(n_heads, n_kv_heads), source=...)

:func:`fold_saved_scales` folds saved scales into a block through the layout's scaling
pairs (each group's producer absorbs ``1 / s``, its linears ``s``), the fold AWQ's own
``load_scale`` uses, so a block scaled from the file equals the block AWQ scaled.
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

__all__ = ["ArtefactKind", "KINDS", "ArtefactStore", "load_artefact", "write_artefact",
           "artefact_path", "check_writable", "group_scale", "fold_saved_scales"]


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

    def get(self, kind: str, *, producer: str | None = None) -> dict[str, Any]:
        """Every published value of ``kind`` (full names); only ``producer``'s when given."""
        _kind(kind)
        owners = self._producers.get(kind, {})
        return {k: v for k, v in self._values.get(kind, {}).items()
                if producer is None or owners.get(k) == producer}

    def for_block(self, kind: str, block: Block, *, device: Any = None,
                  producer: str | None = None) -> dict[str, Any]:
        """The values of ``kind`` for ``block``'s linears, by name relative to the block
        (moved to ``device`` when given; only ``producer``'s when given). Empty when no step
        published any for the block."""
        prefix = block.name + "."
        owners = self._producers.get(kind, {})
        out = {}
        for name, value in self._values.get(kind, {}).items():
            if name.startswith(prefix) and (producer is None or owners.get(name) == producer):
                out[name[len(prefix):]] = _to(value, device) if device is not None else value
        return out

    def producer(self, kind: str, name: str) -> str | None:
        return self._producers.get(kind, {}).get(name)

    def save(self, kind: str, folder: str | Path, *, overwrite: bool,
             producer: str | None = None) -> Path:
        """Write every value of ``kind`` (only ``producer``'s when given) to
        ``<folder>/<file>`` atomically; an existing file is replaced only with
        ``overwrite``."""
        k = _kind(kind)
        check_writable(kind, folder, overwrite=overwrite)
        return write_artefact(folder, k.file, k.to_file(self.get(kind, producer=producer)))

    def load(self, kind: str, folder: str | Path, *, producer: str) -> dict[str, Any]:
        """Read ``<folder>/<file>`` of ``kind`` and publish it; returns what was read."""
        values = load_artefact(kind, folder)
        self.publish(kind, values, producer=producer)
        return values


def artefact_path(kind: str, folder: str | Path) -> Path:
    """``<folder>/<file of kind>`` (``scales.pth``, ``clips.pth``)."""
    return Path(folder).expanduser() / _kind(kind).file


def check_writable(kind: str, folder: str | Path, *, overwrite: bool) -> None:
    """Refuse (:class:`OutputExistsError`) to replace an existing artefact file without
    ``overwrite``: call it before the work that produces the values, so a run fails early."""
    target = artefact_path(kind, folder)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} already exists; choose another path or pass "
                                "--overwrite (save.overwrite: true)")


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


# --------------------------------------------------------------------------- saved scales

def _gqa(block: Block, group: Any, heads: tuple[int, int] | None) -> tuple[int, int] | None:
    """``(heads, kv_heads)`` when the group's producer is a linear with fewer outputs than
    its consumers read (grouped-query ``v_proj -> o_proj``), else None."""
    from torch import nn

    from llmcq.transforms.scaling import consumer_width

    prev = group.prev_op
    if group.spec.prev_kind != "linear" or not isinstance(prev, nn.Linear):
        return None
    width = consumer_width(group)
    if prev.out_features == width:
        return None
    if heads is not None:
        h, kv = heads
        if kv < h and h % kv == 0 and prev.out_features * (h // kv) == width:
            return heads
    raise DataError(f"{block.name}.{group.spec.prev_op} has {prev.out_features} outputs but "
                    f"{', '.join(group.linears)} read {width} columns, and this is not "
                    f"grouped-query attention (heads {heads})")


def group_scale(block: Block, group: Any, scales: Mapping[str, Any], *,
                heads: tuple[int, int] | None, source: str) -> Any:
    """The scale over the producer's channels that ``scales`` (full linear names, as saved)
    holds for ``group``, or None when it holds none of the group's linears.

    Every linear of the group must carry the same scale of the consumers' width; under
    grouped-query attention (``heads=(n_heads, n_kv_heads)``) the saved scale is the
    kv-channel scale repeated over each kv head's query heads, and the kv-channel scale is
    returned. :class:`DataError` (naming ``source``) otherwise."""
    import torch

    from llmcq.transforms.scaling import consumer_width, expand_kv_scale

    names = [block.full_name(n) for n in group.linears]
    found = [scales.get(n) for n in names]
    if all(f is None for f in found):
        return None
    width = consumer_width(group)
    first = found[0]
    for name, f in zip(names, found, strict=True):
        if f is None or f.numel() != width or first is None or not torch.equal(f, first):
            raise DataError(f"{source}: the scale of {name} is missing, differs within its "
                            f"group, or is not {width} long")
    s = first
    if heads is not None:
        kv_s = s.view(heads[1], heads[0] // heads[1], -1)[:, 0].reshape(-1)
        if not torch.equal(expand_kv_scale(kv_s, *heads), s):
            raise DataError(f"{source}: {names[0]}'s scale is not repeated over the query "
                            "heads of each kv head")
        s = kv_s
    return s


def fold_saved_scales(block: Block, scales: Mapping[str, Any], *,
                      heads: tuple[int, int] | None, source: str) -> dict[str, Any]:
    """Fold the saved ``scales`` (full names) into ``block`` through every group with a
    producer (:func:`llmcq.transforms.scaling.fold_scale`, in layout order); groups the file
    holds nothing for are left alone. Returns what was folded, ``{relative linear name:
    consumer scale}`` (the ``scales`` artefact of the block). :class:`DataError` when the file
    holds nothing for the block at all (written for another model?) or is inconsistent."""
    from llmcq.transforms.scaling import expand_kv_scale, fold_scale

    if not any(k.startswith(block.name + ".") for k in scales):
        raise DataError(f"{source} has no scales for {block.name}: was it written for this "
                        "model?")
    out: dict[str, Any] = {}
    for group in block.groups:
        if group.spec.prev_kind == "none" or group.prev_op is None:
            continue
        gqa = _gqa(block, group, heads)
        s = group_scale(block, group, scales, heads=gqa, source=source)
        if s is None:
            continue
        device = next(iter(group.linears.values())).weight.device
        s = s.to(device)
        n_heads, n_kv = gqa if gqa is not None else (None, None)
        fold_scale(group, s, n_heads=n_heads, n_kv_heads=n_kv)
        consumer = expand_kv_scale(s, *gqa) if gqa is not None else s
        out.update({name: consumer for name in group.linears})
    return out
