"""AD-DROP keep mask: `keep_mask(attr, p, q, ...)` -> PackedMask [B,H,Lq,Lk] (1 = keep).

Per (batch b, head h, query row i), over the row's allowed keys: the real keys of sample b, and
with is_causal=True only keys j <= i + Lk − Lq (bottom-right aligned, as flash-attn); n = their
number. The rule is the official code's (TaoYang225/AD-DROP, generate_mask_high/_low):
  drop="high": threshold = value at ascending index ((1 − p)·n).long() of the row's allowed
               attributions, candidates = attribution >= threshold (ties included)
  drop="low":  threshold = value at ascending index (p·n).long(), candidates = attribution
               strictly below it (ties kept): floor(p·n) candidates without ties
  keep = allowed AND (NOT candidate OR word >= floor(q·2^32))
where (x·n).long() is torch's float32 product of a Python float and an int64 length (both
rounded to float32, the product rounded, truncated): e.g. p=0.9, n=10 gives index 1, not the
float64 floor 0. Candidates are dropped with probability q.

Causal rows are our extension (the paper covers encoders): the top-p fraction of the keys the
row may attend to. Keys that are not allowed are never kept; rows without an allowed key keep
nothing. Padded query rows are not treated specially (as in the official code).

Philox contract (../shared/DESIGN.md): word = philox_words(seed, index, step, stream) with the
element's global flat index in [B,H,Lq,Lk], index = b·H·Lq·Lk + h·Lq·Lk + i·Lk + j. The caller
picks the stream (regdrop_fast.addrop passes the layer index) and the step (the training step).

`attr` is a [B,H,Lq,Lk] attribution tensor (any kind: gradient, integrated gradients, the
attention map, random scores) or a (dO, v) pair, dO [B,H,Lq,D] and v [B,Hkv,Lk,D] (Hkv dividing
H: grouped-query attention, head h uses kv head h // (H // Hkv)): then B = dO·Vᵀ is computed tile
by tile inside the Triton kernel and never stored. Masks of the triton and reference backends
are bit-identical whenever both see the same fp32 attributions (always for an attribution
tensor; for a (dO, v) pair the kernel's dot may round B differently from torch's matmul, which
can only swap near-equal scores at the threshold).
"""
from __future__ import annotations

import struct
from typing import Optional

import torch

from .. import backends
from .._checks import UINT32_MAX, UINT64_MAX, check_int, check_prob, check_tensor, keep_threshold
from ..masks import PackedMask
from ..reference import addrop as _ref
from ..reference import masks as _ref_masks

__all__ = ["keep_mask"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_KERNEL_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check_dO_v(dO, v):
    """dO [B,H,Lq,D] and v [B,Hkv,Lk,D] with Hkv dividing H: one float dtype and device."""
    check_tensor("dO", dO, dtypes=_FLOATS, ndim=4)
    check_tensor("v", v, dtypes=_FLOATS, ndim=4, device=dO.device)
    if v.dtype != dO.dtype:
        raise TypeError(f"dO and v must have the same dtype, got {dO.dtype} and {v.dtype}")
    if v.shape[0] != dO.shape[0] or v.shape[3] != dO.shape[3]:
        raise ValueError(f"v must be [B,Hkv,Lk,D] matching dO [B,H,Lq,D] = {tuple(dO.shape)}, "
                         f"got {tuple(v.shape)}")
    if v.shape[1] == 0 or dO.shape[1] % v.shape[1]:
        raise ValueError(f"v's heads (Hkv = {v.shape[1]}) must divide dO's heads "
                         f"(H = {dO.shape[1]}) for grouped-query attention")


def _f32(x: float) -> float:
    """x rounded to float32, as torch rounds a Python float that multiplies a float32 tensor."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _fraction(p: float, drop: str) -> float:
    return _f32((1.0 - p) if drop == "high" else p)


def _ranks_f32(n: torch.Tensor, frac: float) -> torch.Tensor:
    """int32: `threshold_rank` of the float32 key counts n (exact integers) in four small ops.
    trunc(max(min(n·frac, n − 1), 0)) equals its min(trunc(n·frac), max(n − 1, 0)): n − 1 is an
    integer and n·frac >= 0 is the same float32 product."""
    return torch.minimum(n * frac, n - 1).clamp_min_(0).to(torch.int32)


def row_ranks(key_padding_mask, batch: int, lk: int, p: float, drop: str,
              device) -> torch.Tensor:
    """int32 [B]: each sample's threshold index over its real keys, the value of
    `threshold_rank(valid_lengths(...))` with fewer device ops (one fill without padding)."""
    frac = _fraction(p, drop)
    if key_padding_mask is None:
        rank = min(int(_f32(_f32(float(lk)) * frac)), max(lk - 1, 0))
        return torch.full((batch,), rank, dtype=torch.int32, device=device)
    return _ranks_f32(key_padding_mask.sum(-1, dtype=torch.float32), frac)


def causal_ranks(key_padding_mask, batch: int, lq: int, lk: int, p: float, drop: str,
                 device) -> torch.Tensor:
    """int32 [B,Lq]: each causal row's threshold index over its visible real keys."""
    real = (torch.ones(batch, lk, dtype=torch.float32, device=device) if key_padding_mask is None
            else key_padding_mask.to(torch.float32))
    prefix = torch.cat([real.new_zeros(batch, 1), real.cumsum(-1)], dim=-1)
    last = (torch.arange(lq, device=device) + (lk - lq + 1)).clamp(0, lk)
    return _ranks_f32(prefix[:, last], _fraction(p, drop))


def _check_attr(attr):
    """(shape [B,H,Lq,Lk], device, attribution tensor or None, dO, v) after validation."""
    if isinstance(attr, (tuple, list)):
        if len(attr) != 2:
            raise ValueError(f"attr as a pair must be (dO, v), got {len(attr)} items")
        dO, v = attr
        _check_dO_v(dO, v)
        shape = (*dO.shape[:3], v.shape[2])
        if dO.shape[3] == 0:
            raise ValueError(f"dO must have a non-empty head dim, got shape {tuple(dO.shape)}")
        return shape, dO.device, None, dO, v
    check_tensor("attr", attr, dtypes=_FLOATS, ndim=4)
    return tuple(attr.shape), attr.device, attr, None, None


def keep_mask(attr, p: float, q: float, key_padding_mask: Optional[torch.Tensor] = None,
              seed: int = 0, step: int = 0, stream: int = 0, backend: Optional[str] = None,
              drop: str = "high", is_causal: bool = False) -> PackedMask:
    """AD-DROP keep mask as a PackedMask of shape [B,H,Lq,Lk] (see the module docstring).

    p in (0, 1): fraction of real keys that are drop candidates; q in [0, 1]: probability a
    candidate is dropped; key_padding_mask: bool [B,Lk], True = real token (HF attention_mask);
    seed in [0, 2^64), step and stream in [0, 2^32); drop: "high" (default) or "low";
    is_causal: threshold each row over its causal prefix (bottom-right aligned when Lq != Lk).
    """
    p = check_prob("p", p, low_open=True, high_open=True)
    q = check_prob("q", q, low_open=False, high_open=False)
    seed = check_int("seed", seed, 0, UINT64_MAX)
    step = check_int("step", step, 0, UINT32_MAX)
    stream = check_int("stream", stream, 0, UINT32_MAX)
    if drop not in ("high", "low"):
        raise ValueError(f"drop must be 'high' or 'low', got {drop!r}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    shape, device, scores, dO, v = _check_attr(attr)
    batch, heads, lq, lk = shape
    if min(shape) == 0:
        raise ValueError(f"attr must describe a non-empty [B,H,Lq,Lk] map (empty batch or "
                         f"length), got shape {shape}")
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, dtypes=(torch.bool,), ndim=2,
                     device=device)
        if tuple(key_padding_mask.shape) != (batch, lk):
            raise ValueError(f"key_padding_mask must have shape [B, Lk] = {(batch, lk)}, got "
                             f"{tuple(key_padding_mask.shape)}")
    name = backends.resolve("addrop_keep_mask", backend, device,
                            implemented=("reference", "triton"))
    if name == "reference":
        dense = _ref.keep_mask(attr if scores is not None else (dO, v), p, q, key_padding_mask,
                               seed, step, stream, drop, is_causal)
        return PackedMask(_ref_masks.pack_bits(dense), torch.Size(shape))
    from ..triton_kernels import addrop_mask as _tk
    src = scores if scores is not None else dO
    if src.dtype not in _KERNEL_FLOATS:
        raise TypeError(f"the triton backend takes float32/float16/bfloat16 attributions, got "
                        f"{src.dtype} (use backend='reference' for float64)")
    if dO is not None:
        dO = dO if dO.stride(-1) == 1 else dO.contiguous()
        v = v if v.stride(-1) == 1 else v.contiguous()
        src = dO
    if is_causal:
        rank = causal_ranks(key_padding_mask, batch, lq, lk, p, drop, device)
    else:
        rank = row_ranks(key_padding_mask, batch, lk, p, drop, device)
    kpm = None if key_padding_mask is None else key_padding_mask.contiguous()
    words = _tk.keep_mask_bits(src, v, kpm, rank, keep_threshold(q), seed, step, stream,
                               drop == "low", is_causal)
    return PackedMask(words, torch.Size(shape))
