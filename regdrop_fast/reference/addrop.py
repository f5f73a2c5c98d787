"""AD-DROP in pure PyTorch (reference): attribution and keep mask.

The ground truth the Triton kernels are tested against (../shared/REFERENCE.md, "AD-DROP");
the attention under the mask is in reference/masked_attention.py.

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

Random keep mask (`random_keep_mask`, the official RD kind: candidates without an attribution):
  candidate = philox_words(seed, index, step, candidate_stream) < floor(p · 2^32)
  keep      = allowed AND (NOT candidate OR philox_words(seed, index, step, stream)
              >= floor(q · 2^32))
with the same element index and allowed keys (real, causal) as the keep mask above: a real key
is a candidate with probability p, a candidate is dropped with probability q.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import keep_threshold
from . import philox as _philox
from .masked_attention import causal_allowed, expand_kv_heads, flat_indices


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


def random_keep_mask(shape, p: float, q: float, key_padding_mask: Optional[torch.Tensor] = None,
                     seed: int = 0, step: int = 0, stream: int = 0, candidate_stream: int = 0,
                     is_causal: bool = False, device=None) -> torch.Tensor:
    """bool keep mask [B,H,Lq,Lk] of the official RD kind (see the module docstring); shape is
    (B, H, Lq, Lk), device the mask's (key_padding_mask's when given)."""
    batch, _, lq, lk = shape
    if key_padding_mask is not None:
        device = key_padding_mask.device
    index = flat_indices(shape, device)
    candidate = _philox.philox_words(seed, index, step, candidate_stream) < keep_threshold(p)
    spared = _philox.philox_words(seed, index, step, stream) >= keep_threshold(q)
    allowed = allowed_keys(key_padding_mask, batch, lq, lk, device, is_causal)
    return allowed & (~candidate | spared)
