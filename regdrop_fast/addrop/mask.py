"""AD-DROP keep mask: `keep_mask(attr, p, q, ...)` -> PackedMask [B,H,Lq,Lk] (1 = keep).

Per (batch b, head h, query row i), over the real keys of sample b (valid_len[b] of them):
  rank      = floor((1 − p)·valid_len[b])  (float64; clamped to valid_len − 1)
  threshold = value at ascending index `rank` of the row's attributions over real keys
  candidate = real key AND B[i,j] >= threshold            (ties included)
  keep      = real key AND (NOT candidate OR word >= floor(q·2^32))
so candidates (about the top fraction p) are dropped with probability q.

Philox contract (../shared/DESIGN.md): word = philox_words(seed, index, step, stream) with the
element's global flat index in [B,H,Lq,Lk], index = b·H·Lq·Lk + h·Lq·Lk + i·Lk + j. The caller
picks the stream (regdrop_fast.addrop passes the layer index) and the step (the training step).

drop="low" drops among the lowest attributions: it is drop="high" applied to −B (threshold =
value of −B at ascending index `rank`, candidates −B >= threshold, i.e. B at or below the value
at descending index `rank`). Pad keys are never kept; rows of a sample without real keys keep
nothing. Query rows are not treated specially (as in the official code).

`attr` is a [B,H,Lq,Lk] attribution tensor (any kind: gradient, integrated gradients, the
attention map, random scores) or a (dO, v) pair, dO [B,H,Lq,D] and v [B,H,Lk,D]: then B = dO·Vᵀ
is computed tile by tile inside the Triton kernel and never stored. Masks of the triton and
reference backends are bit-identical whenever both see the same fp32 attributions (always for an
attribution tensor; for a (dO, v) pair the kernel's dot may round B differently from torch's
matmul, which can only swap near-equal scores at the threshold).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import backends
from .._checks import UINT32_MAX, UINT64_MAX, check_int, check_prob, check_tensor, keep_threshold
from ..masks import PackedMask
from ..reference import addrop as _ref
from ..reference import masks as _ref_masks
from .attribution import check_dO_v

__all__ = ["keep_mask"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_KERNEL_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check_attr(attr):
    """(shape [B,H,Lq,Lk], device, attribution tensor or None, dO, v) after validation."""
    if isinstance(attr, (tuple, list)):
        if len(attr) != 2:
            raise ValueError(f"attr as a pair must be (dO, v), got {len(attr)} items")
        dO, v = attr
        check_dO_v(dO, v)
        shape = (*dO.shape[:3], v.shape[2])
        if dO.shape[3] == 0:
            raise ValueError(f"dO must have a non-empty head dim, got shape {tuple(dO.shape)}")
        return shape, dO.device, None, dO, v
    check_tensor("attr", attr, dtypes=_FLOATS, ndim=4)
    return tuple(attr.shape), attr.device, attr, None, None


def keep_mask(attr, p: float, q: float, key_padding_mask: Optional[torch.Tensor] = None,
              seed: int = 0, step: int = 0, stream: int = 0, backend: Optional[str] = None,
              drop: str = "high") -> PackedMask:
    """AD-DROP keep mask as a PackedMask of shape [B,H,Lq,Lk] (see the module docstring).

    p in (0, 1): fraction of real keys that are drop candidates; q in [0, 1]: probability a
    candidate is dropped; key_padding_mask: bool [B,Lk], True = real token (HF attention_mask);
    seed in [0, 2^64), step and stream in [0, 2^32); drop: "high" (default) or "low"."""
    p = check_prob("p", p, low_open=True, high_open=True)
    q = check_prob("q", q, low_open=False, high_open=False)
    seed = check_int("seed", seed, 0, UINT64_MAX)
    step = check_int("step", step, 0, UINT32_MAX)
    stream = check_int("stream", stream, 0, UINT32_MAX)
    if drop not in ("high", "low"):
        raise ValueError(f"drop must be 'high' or 'low', got {drop!r}")
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
                               seed, step, stream, drop)
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
    valid_len = _ref.valid_lengths(key_padding_mask, batch, lk, device)
    rank = _ref.threshold_rank(valid_len, p).to(torch.int32)
    kpm = None if key_padding_mask is None else key_padding_mask.contiguous()
    words = _tk.keep_mask_bits(src, v, kpm, rank, keep_threshold(q), seed, step,
                               stream, drop == "low")
    return PackedMask(words, torch.Size(shape))
