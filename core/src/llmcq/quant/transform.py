"""Online input transforms: an orthogonal map applied to a linear's input at run time.

A record with ``input_transform = T`` computes ``y = W_hat · Q_a(T(x)) + b``: the weights
were quantized in the transformed basis (``W_hat ≈ W T^-1``), and the activation quantizer,
if any, sees ``T(x)``. Rotation methods (QuaRot's R4 on ``down_proj``'s input) produce them;
fake quantization applies them; an exporter writes them (the transform's ``to_dict``) or
refuses the ``input_transform`` feature at config time.

Every transform acts on the last dimension and knows its dense matrix (:meth:`matrix`), so
``T(x) == x @ T.matrix().T`` is the one definition tests check against.

A transform that a model-wide step (QuaRot's ``transform_model``) puts on a float linear
before the block loop is attached with :func:`attach_online_transform`: the linear's weight
already holds ``W T^-1`` and a forward pre-hook applies ``T`` to its input, so the float
model computes ``W x`` as before, every later step sees ``T(x)`` at the linear's input
(GPTQ's Hessian, static activation ranges, search losses), and the engine gives the
linear's record that ``input_transform`` (:func:`online_transform_of`); fake quantization
then applies it in place of the hook.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch

__all__ = ["OnlineTransform", "MatrixTransform", "BlockHadamard", "transform_from_dict",
           "attach_online_transform", "online_transform_of", "detach_online_transform"]

#: the attribute of a float linear holding ``(transform, hook handle)``
_ONLINE_ATTR = "_llmcq_online_transform"


class OnlineTransform(ABC):
    """Base: ``size`` is the input width; subclasses implement :meth:`apply` and
    :meth:`matrix` and serialize with :meth:`to_dict`."""

    kind: str = ""
    size: int

    @abstractmethod
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``T(x)`` along the last dimension, in ``x``'s dtype."""

    @abstractmethod
    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``[size, size]`` matrix ``M`` with ``T(x) = x @ M.T``."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """A serializable description (``kind`` first) that :func:`transform_from_dict`
        reads back."""

    def to(self, device: torch.device | str) -> OnlineTransform:
        return self

    def describe(self) -> str:
        return f"{self.kind}({self.size})"


class MatrixTransform(OnlineTransform):
    """Any dense ``[size, size]`` matrix ``M``: ``T(x) = x @ M.T``."""

    kind = "matrix"

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"a transform matrix is square, got {tuple(matrix.shape)}")
        self.m = matrix.detach().float()
        self.size = int(matrix.shape[0])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() @ self.m.to(x.device).T).to(x.dtype)

    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.m.to(dtype)

    def to(self, device: torch.device | str) -> MatrixTransform:
        return MatrixTransform(self.m.to(device))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "size": self.size, "matrix": self.m.cpu()}


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform (Sylvester order) along the last dimension, a
    power of two, computed in ``x``'s dtype by the butterfly: O(n log n)."""
    n = x.shape[-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.reshape(y.shape[0], -1, 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(x.shape)


class BlockHadamard(OnlineTransform):
    """Normalized Walsh-Hadamard transform on consecutive blocks of ``block`` channels
    (``block`` a power of two dividing ``size``), applied in O(n log block) by the
    butterfly instead of a dense matmul; ``block == size`` is the full transform."""

    kind = "block_hadamard"

    def __init__(self, size: int, block: int | None = None) -> None:
        block = size if block is None else block
        if block < 1 or block & (block - 1) or size % block:
            raise ValueError(f"a Hadamard block is a power of two dividing the size; got "
                             f"block {block} for size {size}")
        self.size, self.block = int(size), int(block)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size:
            raise ValueError(f"input width {x.shape[-1]} != transform size {self.size}")
        y = fwht(x.float().reshape(-1, self.size // self.block, self.block))
        y = y.reshape(x.shape) / math.sqrt(self.block)
        return y.to(x.dtype)

    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.apply(torch.eye(self.size)).T.contiguous().to(dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "size": self.size, "block": self.block}


def transform_from_dict(d: dict[str, Any]) -> OnlineTransform:
    """Inverse of ``to_dict`` for the transforms core knows."""
    kind = d.get("kind")
    if kind == MatrixTransform.kind:
        return MatrixTransform(torch.as_tensor(d["matrix"]))
    if kind == BlockHadamard.kind:
        return BlockHadamard(int(d["size"]), int(d["block"]))
    if kind == "hadamard":  # any size Sylvester x Paley decomposes (llmcq.transforms.hadamard)
        from llmcq.transforms.hadamard import Hadamard

        h = Hadamard(int(d["size"]), fp32=bool(d.get("fp32", True)))
        if "core" in d and int(d["core"]) != h.m:
            raise ValueError(f"hadamard({h.size}): core order {d['core']} written, this "
                             f"version builds {h.m}")
        return h
    raise ValueError(f"unknown online transform {kind!r}: known matrix, block_hadamard, "
                     "hadamard")


def attach_online_transform(linear: torch.nn.Module, transform: OnlineTransform) -> None:
    """Make the float ``linear`` apply ``transform`` to its input (a forward pre-hook) and
    remember it, so the engine gives the linear's record ``input_transform = transform``.
    The caller has already folded ``T^-1`` into the weight (``W -> W T.matrix().T`` for an
    orthogonal ``T``). One transform per linear."""
    if getattr(linear, _ONLINE_ATTR, None) is not None:
        raise ValueError(f"{type(linear).__name__} already has an online input transform")
    width = getattr(linear, "in_features", None)
    if width is not None and width != transform.size:
        raise ValueError(f"transform of size {transform.size} on a linear reading {width} "
                         "inputs")

    def pre_hook(_mod: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (transform.apply(args[0]), *args[1:])

    handle = linear.register_forward_pre_hook(pre_hook)
    setattr(linear, _ONLINE_ATTR, (transform, handle))


def online_transform_of(linear: torch.nn.Module) -> OnlineTransform | None:
    """The online input transform :func:`attach_online_transform` put on ``linear``."""
    held = getattr(linear, _ONLINE_ATTR, None)
    return None if held is None else held[0]


def detach_online_transform(linear: torch.nn.Module) -> OnlineTransform | None:
    """Remove the hook (the weight keeps ``W T^-1``); returns the transform."""
    held = getattr(linear, _ONLINE_ATTR, None)
    if held is None:
        return None
    held[1].remove()
    setattr(linear, _ONLINE_ATTR, None)
    return held[0]
