"""QuaRot's maths as pure functions on modules (torch).

Conventions: the residual stream ``h`` (a column) becomes ``h' = Q^T h`` for an orthogonal
``Q``; as rows (``x @ W.T``, embeddings as rows) that is ``x' = x Q``.

* a writer (``o_proj``, ``down_proj``) outputs ``y = W z + b`` into the stream, so
  ``W -> Q^T W``, ``b -> Q^T b`` (:func:`rotate_writer`);
* a reader (``q/k/v``, ``gate/up``, ``lm_head``) reads ``norm(h)``; a weightless RMSNorm
  commutes with ``Q`` (``rms(Q^T h) = rms(h)``), so ``W -> W Q`` (:func:`rotate_reader`);
* the embeddings ``E -> E Q`` (:func:`rotate_embedding`);
* before that the norm's weight is fused into its readers, ``W -> W diag(w)`` (``1 + w``
  for Gemma's offset RMSNorm), and the norm becomes weightless (:func:`fuse_norm`);
* R2, per head: ``v_proj``'s rows of each kv head ``W_v[h] -> R^T W_v[h]``, ``o_proj``'s
  columns of each query head ``W_o[:, h] -> W_o[:, h] R`` (every query head of a kv head
  reads the same rotated values) (:func:`rotate_heads`);
* R4, online: ``W -> W M^T`` with ``M`` the transform's matrix, so ``W_hat T(x) = W x``
  (:func:`fold_online`).

Every product is computed in float64 on ``device`` and written back in the tensor's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["fuse_norm", "rotate_embedding", "rotate_writer", "rotate_reader", "rotate_heads",
           "fold_online", "untie_head"]


def _set(t: torch.Tensor, value: torch.Tensor) -> None:
    t.data = value.to(device=t.device, dtype=t.dtype).contiguous()


def _f64(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    return t.detach().to(device=device or t.device, dtype=torch.float64)


@torch.no_grad()
def fuse_norm(norm: nn.Module, kind: str, readers: list[nn.Linear],
              device: torch.device | None = None) -> None:
    """Fold the norm's per-channel weight into the input columns of every linear reading its
    output; the norm's weight becomes the identity (1, or 0 for ``rms_offset``)."""
    if kind not in ("rms", "rms_offset"):
        raise ValueError(f"norm kind {kind!r} cannot be fused for a rotation (LayerNorm's "
                         "mean-centering does not commute with it)")
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(norm).__name__} has no weight to fuse")
    if isinstance(getattr(norm, "bias", None), torch.Tensor):
        raise ValueError(f"{type(norm).__name__} has a bias: not an RMSNorm")
    w = _f64(weight, device)
    scale = 1.0 + w if kind == "rms_offset" else w
    for lin in readers:
        if lin.in_features != scale.numel():
            raise ValueError(f"a reader of width {lin.in_features} after a norm of "
                             f"{scale.numel()} channels")
        _set(lin.weight, _f64(lin.weight, device) * scale.view(1, -1))
    weight.data.fill_(0.0 if kind == "rms_offset" else 1.0)


@torch.no_grad()
def rotate_embedding(emb: nn.Module, q: torch.Tensor) -> None:
    """``E -> E Q`` (every token's row rotated)."""
    w = emb.weight
    _set(w, _f64(w, q.device) @ q.to(torch.float64))


@torch.no_grad()
def rotate_writer(lin: nn.Linear, q: torch.Tensor) -> None:
    """Output rows: ``W -> Q^T W``, ``b -> Q^T b``."""
    q64 = q.to(torch.float64)
    _set(lin.weight, q64.T @ _f64(lin.weight, q.device))
    if lin.bias is not None:
        _set(lin.bias, q64.T @ _f64(lin.bias, q.device))


@torch.no_grad()
def rotate_reader(lin: nn.Linear, q: torch.Tensor) -> None:
    """Input columns: ``W -> W Q``."""
    _set(lin.weight, _f64(lin.weight, q.device) @ q.to(torch.float64))


@torch.no_grad()
def rotate_heads(v: nn.Linear, o: nn.Linear, r: torch.Tensor, *, heads: int,
                 kv_heads: int) -> None:
    """R2: ``v_proj``'s output rows of each of ``kv_heads`` heads ``-> R^T W_v[h]`` (and its
    bias), ``o_proj``'s input columns of each of ``heads`` heads ``-> W_o[:, h] R``."""
    hd = r.shape[0]
    if v.out_features != kv_heads * hd or o.in_features != heads * hd:
        raise ValueError(f"v_proj writes {v.out_features} and o_proj reads {o.in_features} "
                         f"channels; expected {kv_heads} and {heads} heads of {hd}")
    r64 = r.to(torch.float64)
    wv = _f64(v.weight, r.device).view(kv_heads, hd, -1)
    _set(v.weight, (r64.T @ wv).reshape(v.out_features, -1))
    if v.bias is not None:
        _set(v.bias, (_f64(v.bias, r.device).view(kv_heads, hd) @ r64).reshape(-1))
    wo = _f64(o.weight, r.device).view(o.out_features, heads, hd)
    _set(o.weight, (wo @ r64).reshape(o.out_features, -1))


@torch.no_grad()
def fold_online(lin: nn.Linear, m: torch.Tensor) -> None:
    """R4's offline half: ``W -> W M^T`` for an online ``T(x) = x M^T`` with ``M``
    orthogonal, so that ``W_new T(x) = W x``."""
    _set(lin.weight, _f64(lin.weight, m.device) @ m.to(torch.float64).T)


def untie_head(model: nn.Module, head: nn.Linear, emb: nn.Module) -> bool:
    """Give ``head`` its own copy of the embedding matrix when they share one, and mark the
    model's config untied (``tie_word_embeddings: False``) so that saving writes both and
    loading does not tie them again. Returns whether they were tied."""
    if head.weight is not emb.weight:
        return False
    head.weight = nn.Parameter(emb.weight.detach().clone(),
                               requires_grad=emb.weight.requires_grad)
    cfgs = [model.config]
    if hasattr(model.config, "get_text_config"):
        cfgs.append(model.config.get_text_config())
    for cfg in cfgs:
        if hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
    return True
