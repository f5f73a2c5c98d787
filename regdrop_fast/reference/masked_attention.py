"""Attention under an AD-DROP keep mask in pure PyTorch (reference of addrop/attention.py).

`masked_attention`: eager softmax(scale·QKᵀ + masks) with the unpacked keep mask (and with
is_causal the bottom-right causal mask, key j visible from row i iff j <= i + Lk − Lq); fully
masked rows give zeros. k, v may have Hkv heads dividing H (grouped-query attention: query head
h reads kv head h // (H // Hkv)). Optional attention dropout keeps a probability iff
philox_words(seed, index, step, stream) < floor((1 − dropout_p)·2^32), index the element's flat
index in [B,H,Lq,Lk], and rescales by 1 / (1 − dropout_p).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import keep_threshold
from . import philox as _philox


def expand_kv_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B,Hkv,L,D] -> [B,H,L,D]: query head h reads kv head h // (H // Hkv)."""
    return t.repeat_interleave(heads // t.shape[1], dim=1) if t.shape[1] != heads else t


def causal_allowed(lq: int, lk: int, device) -> torch.Tensor:
    """bool [Lq,Lk]: key j is visible from query row i iff j <= i + Lk − Lq (bottom-right)."""
    rows = torch.arange(lq, device=device)[:, None]
    return torch.arange(lk, device=device)[None, :] <= rows + (lk - lq)


def flat_indices(shape, device) -> torch.Tensor:
    """int64 tensor of `shape` holding each element's flat index (the Philox element index)."""
    numel = 1
    for size in shape:
        numel *= int(size)
    return torch.arange(numel, dtype=torch.int64, device=device).view(tuple(shape))


def dropout_keep(shape, dropout_p: float, seed: int, step: int, stream: int,
                 device) -> torch.Tensor:
    """bool [B,H,Lq,Lk] attention-dropout keep decisions: word < floor((1 − dropout_p)·2^32)."""
    words = _philox.philox_words(seed, flat_indices(shape, device), step, stream)
    return words < keep_threshold(1.0 - dropout_p)


def allowed_mask(shape, keep: Optional[torch.Tensor] = None,
                 attn_mask: Optional[torch.Tensor] = None, device=None):
    """(bool [B,H,Lq,Lk] of attended positions, additive float mask or None) from a dense bool
    keep mask and an attn_mask (bool [B,Lk] key padding, or bool/additive 4-D broadcastable)."""
    batch, heads, lq, lk = shape
    allowed = torch.ones(shape, dtype=torch.bool, device=device)
    bias = None
    if keep is not None:
        allowed = allowed & keep
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            allowed = allowed & attn_mask[:, None, None, :].to(torch.bool)
        elif attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            bias = attn_mask
    return allowed, bias


def masked_attention(q, k, v, keep: Optional[torch.Tensor] = None,
                     attn_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                     dropout_p: float = 0.0, seed: int = 0, step: int = 0, stream: int = 0,
                     upcast: bool = True, is_causal: bool = False) -> torch.Tensor:
    """Eager attention [B,H,Lq,D]; `keep` a dense bool [B,H,Lq,Lk] (or None); k, v [B,Hkv,Lk,D]
    with Hkv dividing H. Differentiable.

    Computed in fp32 (fp64 for fp64 inputs) when `upcast`, returned in q's dtype."""
    out_dtype = q.dtype
    if upcast and q.dtype != torch.float64:
        q, k, v = q.float(), k.float(), v.float()
    if scale is None:
        scale = q.shape[-1] ** -0.5
    batch, heads, lq, _ = q.shape
    lk = k.shape[-2]
    k, v = expand_kv_heads(k, heads), expand_kv_heads(v, heads)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    allowed, bias = allowed_mask((batch, heads, lq, lk), keep, attn_mask, q.device)
    if is_causal:
        allowed = allowed & causal_allowed(lq, lk, q.device)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    scores = scores.masked_fill(~allowed, float("-inf"))
    # fully masked rows: a finite row max keeps exp() at 0 instead of NaN, the sum 0 -> zeros
    row_max = scores.amax(-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    expd = torch.exp(scores - row_max)
    denom = expd.sum(-1, keepdim=True)
    probs = expd / torch.where(denom > 0, denom, torch.ones_like(denom))
    if dropout_p > 0.0:
        kept = dropout_keep((batch, heads, lq, lk), dropout_p, seed, step, stream, q.device)
        probs = probs * kept.to(probs.dtype) / (1.0 - dropout_p)
    return torch.matmul(probs, v).to(out_dtype)
