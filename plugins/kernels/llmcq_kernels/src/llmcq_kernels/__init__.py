"""llmcq-kernels: weight-only matmul reading the mixpack layout (Triton on CUDA, the
pure-torch reference elsewhere), :class:`KernelLinear` and :func:`load_model`::

    from llmcq_kernels import load_model
    model = load_model("save/run/mixpack_model", "cuda", dtype=torch.bfloat16)
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_model", "swap_linears", "KernelLinear", "WALinear"]


def load_model(folder: Any, device: Any = "cpu", **kwargs: Any) -> Any:
    """A mixpack folder as a transformers model with KernelLinear linears
    (:func:`llmcq_kernels.module.load_model`)."""
    from llmcq_kernels.module import load_model as _load

    return _load(folder, device, **kwargs)


def __getattr__(name: str) -> Any:
    if name in ("KernelLinear", "WALinear", "swap_linears"):
        from llmcq_kernels import module

        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
