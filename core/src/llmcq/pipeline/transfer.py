"""Host <-> GPU copies through one reusable pinned buffer.

Why: the block-wise engine moves every block to the GPU and every record back. A copy from
or to ordinary (pageable) host memory runs at a few GB/s (3.5 up, 1.3 down measured on an
H100 host) because the driver stages it through a small pinned bounce buffer of its own;
from pinned memory the DMA engine runs at PCIe speed. Pinning each tensor costs more than it
saves (pinned allocations are slow and the model's host memory would stay locked), so one
pinned buffer, grown to the largest transfer and reused, carries everything: a host memcpy
(parallel, fast) plus a DMA copy, instead of a pageable copy.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

__all__ = ["upload_module", "to_host"]

_ALIGN = 256
_lock = threading.Lock()
_buffers: dict[int, torch.Tensor] = {}


def _staging(nbytes: int, device: torch.device) -> torch.Tensor:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    buf = _buffers.get(idx)
    if buf is None or buf.numel() < nbytes:
        _buffers.pop(idx, None)
        buf = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8, pin_memory=True)
        _buffers[idx] = buf
    return buf


def _span(t: torch.Tensor) -> int:
    return (t.numel() * t.element_size() + _ALIGN - 1) // _ALIGN * _ALIGN


def _view(buf: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    nbytes = like.numel() * like.element_size()
    return buf[offset:offset + nbytes].view(like.dtype).view(like.shape)


def upload_module(module: nn.Module, device: torch.device) -> None:
    """``module.to(device)`` for a CUDA ``device``, through the pinned buffer (same result:
    parameters and buffers replaced by device copies; tensors already there stay)."""
    if device.type != "cuda":
        module.to(device)
        return
    tensors = [t for t in list(module.parameters()) + list(module.buffers())
               if t.device.type == "cpu"]
    total = sum(_span(t) for t in tensors)
    if not total:
        module.to(device)
        return
    with _lock:
        buf = _staging(total, device)
        offsets: dict[int, int] = {}
        off = 0
        for t in tensors:
            if id(t) not in offsets:
                offsets[id(t)] = off
                _view(buf, off, t).copy_(t.detach())
                off += _span(t)
        moved: dict[int, torch.Tensor] = {}

        def move(t: torch.Tensor) -> torch.Tensor:
            if t.device.type != "cpu" or id(t) not in offsets:
                return t.to(device)
            if id(t) not in moved:
                dst = torch.empty(t.shape, dtype=t.dtype, device=device)
                dst.copy_(_view(buf, offsets[id(t)], t), non_blocking=True)
                moved[id(t)] = dst
            return moved[id(t)]

        # ``_apply`` is what ``Module.to`` uses: parameters keep their identity (``.data``)
        module._apply(move)
        # the buffer is reused by the next call: wait until the DMA has read it
        torch.cuda.current_stream(device).synchronize()


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A pageable host copy of CUDA tensor ``t``, through the pinned buffer."""
    if t.device.type != "cuda":
        return t.to("cpu")
    with _lock:
        buf = _staging(_span(t), t.device)
        staged = _view(buf, 0, t)
        staged.copy_(t, non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()
        return staged.clone()
