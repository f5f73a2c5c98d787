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


class _MaskedAttention(torch.autograd.Function):
    # q, k, v and one tuple (launch plan, MaskArgs, Philox words): Function.apply's cost grows
    # with its argument count, and the backward reuses the forward's plan and mask arguments
    @staticmethod
    def forward(ctx, q, k, v, call):
        launch, masks, philox = call
        out, lse = launch.forward(q, k, v, masks.ptrs, philox)
        # the masks are saved too: an in-place change of one before backward raises
        ctx.save_for_backward(q, k, v, out, lse, *masks.tensors)
        ctx.call = call
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors[:5]
        launch, masks, philox = ctx.call
        return (*launch.backward(grad_out, q, k, v, out, lse, masks.ptrs, philox), None)


class _Checked:
    """What a call geometry that passed the tensor checks fixes: whether q, k, v need a copy
    with last stride 1, and the launch plan (built by the first triton call)."""

    __slots__ = ("fix_strides", "plan")

    def __init__(self, fix_strides: bool):
        self.fix_strides, self.plan = fix_strides, None


# Call geometries whose tensor checks passed: each key holds every fact those checks read
# (types, shapes, dtypes and devices of q, k, v, keep and attn_mask) and what the launch plan
# fixes (strides, scale, dropout_p, is_causal), so a call with the same key passes them again
# and launches with the same plan. Scalars, the backend and the data are checked every call.
_CHECKED = {}
_MAX_CHECKED = 1024  # distinct geometries kept (padded batches of many lengths stay below)


def _geometry(q, k, v, keep, attn_mask, scale, dropout_p, is_causal):
    """The cache key of a call, or None when a tensor argument is not of the type the checks
    expect (they run, and say which)."""
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
            and isinstance(v, torch.Tensor)):
        return None
    if keep is None:
        keep_key = None
    elif type(keep) is PackedMask:
        keep_key = (keep.shape, keep.words.device)
    else:
        return None
    if attn_mask is None:
        mask_key = None
    elif isinstance(attn_mask, torch.Tensor):
        mask_key = (attn_mask.shape, attn_mask.stride(), attn_mask.dtype, attn_mask.device)
    else:
        return None
    return (q.shape, q.stride(), q.dtype, q.device, k.shape, k.stride(), k.dtype, k.device,
            v.shape, v.stride(), v.dtype, v.device, keep_key, mask_key, scale, dropout_p,
            is_causal)


def _check_tensors(q, k, v, keep, attn_mask) -> None:
    """The checks of q, k, v, keep and attn_mask (types, dtypes, shapes, devices)."""
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
    if attn_mask is None:
        return
    check_tensor("attn_mask", attn_mask, ndim=(2, 4), device=device)
    if attn_mask.dim() == 2:
        if attn_mask.dtype != torch.bool:
            raise TypeError(f"a 2-D attn_mask is a key padding mask and must be bool [B, Lk], "
                            f"got {attn_mask.dtype}")
        if tuple(attn_mask.shape) != (batch, lk):
            raise ValueError(f"a 2-D attn_mask must have shape [B, Lk] = {(batch, lk)}, got "
                             f"{tuple(attn_mask.shape)}")
        return
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
    for size, full, name in zip(attn_mask.shape, shape, ("B", "H", "Lq", "Lk")):
        if size not in (1, full):
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast "
                             f"to [B,H,Lq,Lk] = {tuple(shape)} (dim {name})")


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     keep: Optional[PackedMask] = None, attn_mask: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None, dropout_p: float = 0.0, seed: int = 0,
                     step: int = 0, stream: int = 0, backend: Optional[str] = None,
                     is_causal: bool = False):
    """Attention [B,H,Lq,D] with the AD-DROP keep mask (see the module docstring).

    k, v: [B,Hkv,Lk,D] with Hkv dividing H; scale: finite, >= 0, default D^-0.5; dropout_p in
    [0, 1); seed in [0, 2^64), step and stream in [0, 2^32) name the dropout's Philox stream
    (independent of the mask's); is_causal: bottom-right aligned causal mask."""
    # the scalars first: they are part of the cache key, so they must be valid and hashable
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
        if not (math.isfinite(scale) and scale >= 0):
            raise ValueError(f"scale must be finite and >= 0 (0 = uniform attention), got "
                             f"{scale!r}")
        scale = float(scale)
    if type(dropout_p) is not float or not 0.0 <= dropout_p < 1.0:  # else already checked
        dropout_p = check_prob("dropout_p", dropout_p, low_open=False, high_open=True)
    seed = check_int("seed", seed, 0, UINT64_MAX)
    step = check_int("step", step, 0, UINT32_MAX)
    stream = check_int("stream", stream, 0, UINT32_MAX)
    key = _geometry(q, k, v, keep, attn_mask, scale, dropout_p, is_causal)
    checked = _CHECKED.get(key)
    if checked is None:
        _check_tensors(q, k, v, keep, attn_mask)
        checked = _Checked(q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1)
        if key is not None:
            if len(_CHECKED) >= _MAX_CHECKED:
                _CHECKED.clear()
            _CHECKED[key] = checked
    if scale is None:
        scale = q.shape[-1] ** -0.5
    name = backends.resolve("masked_attention", backend, q.device)  # reference or triton
    if name == "reference":
        dense = None if keep is None else unpack_mask(keep, backend="reference")
        return _ref.masked_attention(q, k, v, dense, attn_mask, scale, dropout_p, seed, step,
                                     stream, is_causal=is_causal)
    tk = backends.triton_kernels("masked_attention")
    kpm = am = None
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            kpm = attn_mask
        else:
            am = attn_mask.expand(*q.shape[:3], k.shape[2])
    masks = tk.MaskArgs(None if keep is None else keep.words, kpm, am, q)
    if checked.fix_strides:
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    launch = checked.plan
    if launch is None:
        launch = checked.plan = tk.LaunchPlan(q, k, v, masks.layout, scale, dropout_p,
                                              is_causal)
    call = (launch, masks, tk.philox_words(seed, step, stream))
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _MaskedAttention.apply(q, k, v, call)
    # nothing to differentiate: the kernel without the autograd Function (its node, saved
    # tensors and bookkeeping are host work a forward-only call does not need)
    return launch.forward(q, k, v, masks.ptrs, call[2])[0]
