"""Attention under an AD-DROP keep mask: `masked_attention(q, k, v, keep=None, ...)`.

  O = dropout(softmax(scale·Q·Kᵀ + mask)) · V,   q [B,H,Lq,D], k/v [B,Hkv,Lk,D] -> O [B,H,Lq,D]
where positions whose keep bit is 0, pad keys and False entries of a bool mask get −inf; a row
with nothing left gives O = 0 and zero gradients (never NaN). Differentiable w.r.t. q, k, v
(not the masks). The triton backend is flash-attention style: no L² tensor in memory, only O
and the row logsumexp are saved.

Grouped-query attention: k and v may have Hkv heads with Hkv dividing H; query head h reads kv
head h // (H // Hkv) (read in place, never repeated in memory; dK/dV sum over the group).
is_causal=True: key j is visible from query row i iff j <= i + Lk − Lq, the bottom-right
alignment of flash-attn (the usual j <= i when Lq == Lk; with Lq > Lk the first Lq − Lk rows see
no key and give zeros). The kernels skip the key blocks above the diagonal.
scale: a finite number >= 0 (default D^-0.5); 0 gives uniform attention over the allowed keys.

Masks: `keep` a PackedMask [B,H,Lq,Lk] (1 = keep, from `keep_mask`); `attn_mask` either bool
[B,Lk] key padding (True = attend, the HF attention_mask convention) or a 4-D bool (True =
attend) or additive float mask broadcastable to [B,H,Lq,Lk] ([B,1|H,Lq|1,Lk]).

Attention-probability dropout (dropout_p > 0): probability (b,h,i,j) is kept iff
philox_words(seed, b·H·Lq·Lk + h·Lq·Lk + i·Lk + j, step, stream) < floor((1 − dropout_p)·2^32)
and kept ones are scaled by 1/(1 − dropout_p); the softmax normalizer is the undropped one. The
backward pass regenerates the same decisions from (seed, step, stream).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from .. import backends
from .._checks import UINT32_MAX, UINT64_MAX, check_int, check_prob, check_tensor
from ..masks import PackedMask, unpack_mask
from ..reference import masked_attention as _ref

__all__ = ["masked_attention"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


_KERNELS = []  # triton_kernels.masked_attention, imported on first use (it imports triton)


def _kernels():
    if not _KERNELS:
        from ..triton_kernels import masked_attention as module
        _KERNELS.append(module)
    return _KERNELS[0]


class _MaskedAttention(torch.autograd.Function):
    # config = (scale, dropout_p, seed, step, stream, is_causal): one argument rather than six,
    # since Function.apply's cost grows with its argument count
    @staticmethod
    def forward(ctx, q, k, v, keep_words, kpm, am, config):
        tk = _kernels()
        masks = tk.MaskArgs(keep_words, kpm, am, q)
        out, lse = tk.masked_attention_forward(q, k, v, masks, *config)
        # the masks are saved too (an in-place change of one before backward raises), and
        # their kernel arguments kept for backward rather than rebuilt there
        ctx.save_for_backward(q, k, v, out, lse, keep_words, kpm, am)
        ctx.masks, ctx.config = masks, config
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors[:5]
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        dq, dk, dv = _kernels().masked_attention_backward(grad_out, q, k, v, out, lse,
                                                          ctx.masks, *ctx.config)
        return dq, dk, dv, None, None, None, None


def _split_attn_mask(attn_mask, shape, device):
    """(key padding bool [B,Lk] or None, 4-D mask broadcast to [B,H,Lq,Lk] or None)."""
    if attn_mask is None:
        return None, None
    check_tensor("attn_mask", attn_mask, ndim=(2, 4), device=device)
    batch, heads, lq, lk = shape
    if attn_mask.dim() == 2:
        if attn_mask.dtype != torch.bool:
            raise TypeError(f"a 2-D attn_mask is a key padding mask and must be bool [B, Lk], "
                            f"got {attn_mask.dtype}")
        if tuple(attn_mask.shape) != (batch, lk):
            raise ValueError(f"a 2-D attn_mask must have shape [B, Lk] = {(batch, lk)}, got "
                             f"{tuple(attn_mask.shape)}")
        return attn_mask, None
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
    for size, full, name in zip(attn_mask.shape, shape, ("B", "H", "Lq", "Lk")):
        if size not in (1, full):
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast "
                             f"to [B,H,Lq,Lk] = {tuple(shape)} (dim {name})")
    return None, attn_mask.expand(shape)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     keep: Optional[PackedMask] = None, attn_mask: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None, dropout_p: float = 0.0, seed: int = 0,
                     step: int = 0, stream: int = 0, backend: Optional[str] = None,
                     is_causal: bool = False):
    """Attention [B,H,Lq,D] with the AD-DROP keep mask (see the module docstring).

    k, v: [B,Hkv,Lk,D] with Hkv dividing H; scale: finite, >= 0, default D^-0.5; dropout_p in
    [0, 1); seed in [0, 2^64), step and stream in [0, 2^32) name the dropout's Philox stream
    (independent of the mask's); is_causal: bottom-right aligned causal mask."""
    check_tensor("q", q, dtypes=_FLOATS, ndim=4)
    device = q.device
    check_tensor("k", k, dtypes=_FLOATS, ndim=4, device=device)
    check_tensor("v", v, dtypes=_FLOATS, ndim=4, device=device)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, heads, lq, d = q.shape
    kv_heads, lk = k.shape[1], k.shape[2]
    if k.shape != (batch, kv_heads, lk, d) or v.shape != k.shape:
        raise ValueError(f"k and v must be [B,Hkv,Lk,D] with B,D of q {tuple(q.shape)}, got k "
                         f"{tuple(k.shape)} and v {tuple(v.shape)}")
    if kv_heads and heads % kv_heads:
        raise ValueError(f"k and v heads (Hkv = {kv_heads}) must divide q's heads (H = "
                         f"{heads}) for grouped-query attention")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if min(batch, heads, kv_heads, lq, lk, d) == 0:
        raise ValueError(f"q, k, v must be non-empty (empty batch, heads, length or head dim), "
                         f"got q {tuple(q.shape)} and k {tuple(k.shape)}")
    shape = (batch, heads, lq, lk)
    if keep is not None:
        if not isinstance(keep, PackedMask):
            raise TypeError(f"keep must be a PackedMask (from keep_mask) or None, got "
                            f"{type(keep).__name__}")
        if tuple(keep.shape) != shape:
            raise ValueError(f"keep must have shape [B,H,Lq,Lk] = {shape}, got "
                             f"{tuple(keep.shape)}")
        if keep.device != device:
            raise ValueError(f"keep must be on {device}, got {keep.device}")
    kpm, am = _split_attn_mask(attn_mask, shape, device)
    if scale is None:
        scale = d ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    elif not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"scale must be finite and >= 0 (0 = uniform attention), got {scale!r}")
    if type(dropout_p) is not float or not 0.0 <= dropout_p < 1.0:  # else already checked
        dropout_p = check_prob("dropout_p", dropout_p, low_open=False, high_open=True)
    seed = check_int("seed", seed, 0, UINT64_MAX)
    step = check_int("step", step, 0, UINT32_MAX)
    stream = check_int("stream", stream, 0, UINT32_MAX)
    name = backends.resolve("masked_attention", backend, device)  # reference or triton
    if name == "reference":
        dense = None if keep is None else unpack_mask(keep, backend="reference")
        return _ref.masked_attention(q, k, v, dense, attn_mask, float(scale), dropout_p, seed,
                                     step, stream, is_causal=is_causal)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    keep_words = None if keep is None else keep.words.contiguous()
    config = (float(scale), dropout_p, seed, step, stream, is_causal)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _MaskedAttention.apply(q, k, v, keep_words, kpm, am, config)
    # nothing to differentiate: the kernel without the autograd Function (its node, saved
    # tensors and bookkeeping are host work a forward-only call does not need)
    tk = _kernels()
    return tk.masked_attention_forward(q, k, v, tk.MaskArgs(keep_words, kpm, am, q), *config)[0]
