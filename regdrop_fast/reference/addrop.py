"""AD-DROP in pure PyTorch (reference): attribution, keep mask, masked eager attention.

The ground truth the Triton kernels are tested against (../shared/REFERENCE.md, "AD-DROP").

Attribution (kind "gradient"): with O = A_drop·V, the gradient of a target w.r.t. the attention
map is B = ∂target/∂A = dO·Vᵀ, [B,H,Lq,Lk] (`attribution`; v may have Hkv heads dividing H, query
head h then reads kv head h // (H // Hkv)).

Keep mask (`keep_mask`), per (batch b, head h, query row i), over the row's allowed keys: the
real (non-pad) keys of sample b, and with is_causal only those j <= i + Lk − Lq (bottom-right
aligned, as flash-attn); n = their number:
  drop="high" (official generate_mask_high):
    rank      = ((1 − p)·n).long() with torch's float32 product (`threshold_rank`)
    threshold = the value at ascending index `rank` of the row's allowed keys (sorted)
    candidate = allowed AND B >= threshold  (ties included)
  drop="low" (official generate_mask_low):
    rank      = (p·n).long(), same float32 rule; threshold as above
    candidate = allowed AND B < threshold   (strictly below: ties with it are kept)
  keep = allowed AND (NOT candidate OR word >= floor(q · 2^32))
  word = philox_words(seed, index, step, stream), index = b·H·Lq·Lk + h·Lq·Lk + i·Lk + j,
so a candidate is dropped iff word < floor(q · 2^32) (probability q). Keys that are not allowed
are never kept; rows without an allowed key keep nothing. rank is clamped to n − 1 (only reached
for p within float32 rounding of 0 or 1, where the official code would index past the row).
The official code pushes pad keys to the end with +100 on their score; here they get +inf, which
selects the same threshold for any finite attribution. Attributions must not be NaN.

Masked attention (`masked_attention`): eager softmax(scale·QKᵀ + masks) with the unpacked keep
mask (and with is_causal the bottom-right causal mask); fully masked rows give zeros. k, v may
have Hkv heads dividing H (grouped-query attention). Optional attention dropout keeps a
probability iff word < floor((1 − dropout_p) · 2^32) (its own seed/step/stream, the same flat
index over [B,H,Lq,Lk]) and rescales by 1 / (1 − dropout_p).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import keep_threshold
from . import philox as _philox


def expand_kv_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B,Hkv,L,D] -> [B,H,L,D]: query head h reads kv head h // (H // Hkv)."""
    return t.repeat_interleave(heads // t.shape[1], dim=1) if t.shape[1] != heads else t


def attribution(dO: torch.Tensor, v: torch.Tensor, upcast: bool = True) -> torch.Tensor:
    """B = dO·Vᵀ: dO [B,H,Lq,D], v [B,H|Hkv,Lk,D] -> [B,H,Lq,Lk] (fp32, or fp64 for fp64)."""
    if upcast and dO.dtype != torch.float64:
        dO, v = dO.float(), v.float()
    return torch.matmul(dO, expand_kv_heads(v, dO.shape[1]).transpose(-1, -2))


def valid_lengths(key_padding_mask: Optional[torch.Tensor], batch: int, lk: int,
                  device) -> torch.Tensor:
    """int64 [B]: number of real keys per sample (all Lk when there is no padding mask)."""
    if key_padding_mask is None:
        return torch.full((batch,), lk, dtype=torch.int64, device=device)
    return key_padding_mask.to(torch.int64).sum(-1)


def causal_allowed(lq: int, lk: int, device) -> torch.Tensor:
    """bool [Lq,Lk]: key j is visible from query row i iff j <= i + Lk − Lq (bottom-right)."""
    rows = torch.arange(lq, device=device)[:, None]
    return torch.arange(lk, device=device)[None, :] <= rows + (lk - lq)


def allowed_keys(key_padding_mask: Optional[torch.Tensor], batch: int, lq: int, lk: int,
                 device, is_causal: bool = False) -> torch.Tensor:
    """bool [B,1,Lq|1,Lk]: the keys each row's threshold is taken over (real, causal)."""
    if key_padding_mask is None:
        real = torch.ones(batch, lk, dtype=torch.bool, device=device)
    else:
        real = key_padding_mask.to(device=device, dtype=torch.bool)
    allowed = real[:, None, None, :]
    if is_causal:
        allowed = allowed & causal_allowed(lq, lk, device)
    return allowed


def threshold_rank(allowed_len: torch.Tensor, p: float, drop: str = "high") -> torch.Tensor:
    """int64, shape of allowed_len: the ascending index of the threshold, the official
    ((1 − p)·n).long() ("high") or (p·n).long() ("low") where a Python float times an int64
    tensor is a float32 product (both factors rounded to float32, then the product), clamped to
    n − 1 (0 for rows without allowed keys). Written with explicit float32 so torch's default
    dtype cannot change it."""
    frac = (1.0 - p) if drop == "high" else p
    product = allowed_len.to(torch.float32) * torch.tensor(frac, dtype=torch.float32)
    rank = product.to(torch.int64)
    return torch.minimum(rank, (allowed_len - 1).clamp_min(0))


def flat_indices(shape, device) -> torch.Tensor:
    """int64 tensor of `shape` holding each element's flat index (the Philox element index)."""
    numel = 1
    for size in shape:
        numel *= int(size)
    return torch.arange(numel, dtype=torch.int64, device=device).view(tuple(shape))


def keep_mask(attr, p: float, q: float, key_padding_mask: Optional[torch.Tensor] = None,
              seed: int = 0, step: int = 0, stream: int = 0, drop: str = "high",
              is_causal: bool = False) -> torch.Tensor:
    """bool keep mask [B,H,Lq,Lk] of the official algorithm (sort + Bernoulli), see module doc.

    `attr` is a [B,H,Lq,Lk] attribution tensor or a (dO, v) pair."""
    if isinstance(attr, (tuple, list)):
        attr = attribution(*attr)
    scores = attr.double() if attr.dtype == torch.float64 else attr.float()
    batch, _, lq, lk = scores.shape
    device = scores.device
    allowed = allowed_keys(key_padding_mask, batch, lq, lk, device, is_causal)
    ranked = scores.masked_fill(~allowed, float("inf")).sort(dim=-1).values
    rank = threshold_rank(allowed.to(torch.int64).sum(-1, keepdim=True), p, drop)
    threshold = ranked.gather(-1, rank.expand(*ranked.shape[:-1], 1))
    above = scores >= threshold
    candidate = allowed & (above if drop == "high" else ~above)
    words = _philox.philox_words(seed, flat_indices(scores.shape, device), step, stream)
    spared = words >= keep_threshold(q)
    return allowed & (~candidate | spared)


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
