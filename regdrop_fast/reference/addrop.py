"""AD-DROP in pure PyTorch (reference): attribution, keep mask, masked eager attention.

The ground truth the Triton kernels are tested against (../shared/REFERENCE.md, "AD-DROP").

Attribution (kind "gradient"): with O = A_drop·V, the gradient of a target w.r.t. the attention
map is B = ∂target/∂A = dO·Vᵀ, [B,H,Lq,Lk] (`attribution`).

Keep mask (`keep_mask`), per (batch b, head h, query row i), over the valid_len[b] real keys:
  rank      = floor((1 − p) · valid_len)   (float64; clamped to valid_len − 1 for the p where
              1 − p rounds to 1)
  threshold = the value at ascending index `rank` of the row restricted to real keys (sorted)
  candidate = real key AND B >= threshold  (ties included)
  keep      = real key AND (NOT candidate OR word >= floor(q · 2^32))
  word      = philox_words(seed, index, step, stream), index = b·H·Lq·Lk + h·Lq·Lk + i·Lk + j,
so a candidate is dropped iff word < floor(q · 2^32) (probability q). Pad keys are never kept;
rows of a sample with no real key keep nothing. drop="low" is drop="high" applied to −B: the
threshold is the value of −B at ascending index `rank` (i.e. B at descending index `rank`) and
the candidates are B <= −threshold, the lowest fraction p. Attributions must not be NaN.
The official code pushes pad keys to the end with +100 on their score; here pad keys get +inf,
which selects the same threshold for any finite attribution.

Masked attention (`masked_attention`): eager softmax(scale·QKᵀ + masks) with the unpacked keep
mask; fully masked rows give zeros. Optional attention dropout keeps a probability iff
word < floor((1 − dropout_p) · 2^32) (its own seed/step/stream, the same flat index) and
rescales by 1 / (1 − dropout_p).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import keep_threshold
from . import philox as _philox


def attribution(dO: torch.Tensor, v: torch.Tensor, upcast: bool = True) -> torch.Tensor:
    """B = dO·Vᵀ: dO [B,H,Lq,D], v [B,H,Lk,D] -> [B,H,Lq,Lk] (fp32, or fp64 for fp64 inputs)."""
    if upcast and dO.dtype != torch.float64:
        dO, v = dO.float(), v.float()
    return torch.matmul(dO, v.transpose(-1, -2))


def valid_lengths(key_padding_mask: Optional[torch.Tensor], batch: int, lk: int,
                  device) -> torch.Tensor:
    """int64 [B]: number of real keys per sample (all Lk when there is no padding mask)."""
    if key_padding_mask is None:
        return torch.full((batch,), lk, dtype=torch.int64, device=device)
    return key_padding_mask.to(torch.int64).sum(-1)


def threshold_rank(valid_len: torch.Tensor, p: float) -> torch.Tensor:
    """int64 [B]: ascending index of the threshold, floor((1 − p)·valid_len) in float64,
    clamped to valid_len − 1 (0 for samples without real keys)."""
    rank = torch.floor((1.0 - p) * valid_len.to(torch.float64)).to(torch.int64)
    return torch.minimum(rank, (valid_len - 1).clamp_min(0))


def flat_indices(shape, device) -> torch.Tensor:
    """int64 tensor of `shape` holding each element's flat index (the Philox element index)."""
    numel = 1
    for size in shape:
        numel *= int(size)
    return torch.arange(numel, dtype=torch.int64, device=device).view(tuple(shape))


def keep_mask(attr, p: float, q: float, key_padding_mask: Optional[torch.Tensor] = None,
              seed: int = 0, step: int = 0, stream: int = 0, drop: str = "high") -> torch.Tensor:
    """bool keep mask [B,H,Lq,Lk] of the official algorithm (sort + Bernoulli), see module doc.

    `attr` is a [B,H,Lq,Lk] attribution tensor or a (dO, v) pair."""
    if isinstance(attr, (tuple, list)):
        attr = attribution(*attr)
    scores = attr.double() if attr.dtype == torch.float64 else attr.float()
    if drop == "low":
        scores = -scores
    batch, _, _, lk = scores.shape
    device = scores.device
    if key_padding_mask is None:
        real = torch.ones(batch, lk, dtype=torch.bool, device=device)
    else:
        real = key_padding_mask.to(device=device, dtype=torch.bool)
    real4 = real[:, None, None, :]
    ranked = scores.masked_fill(~real4, float("inf")).sort(dim=-1).values
    rank = threshold_rank(real.to(torch.int64).sum(-1), p)
    threshold = ranked.gather(-1, rank.view(batch, 1, 1, 1).expand(*ranked.shape[:-1], 1))
    candidate = real4 & (scores >= threshold)
    words = _philox.philox_words(seed, flat_indices(scores.shape, device), step, stream)
    spared = words >= keep_threshold(q)
    return real4 & (~candidate | spared)


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
                     upcast: bool = True) -> torch.Tensor:
    """Eager attention [B,H,Lq,D]; `keep` a dense bool [B,H,Lq,Lk] (or None). Differentiable.

    Computed in fp32 (fp64 for fp64 inputs) when `upcast`, returned in q's dtype."""
    out_dtype = q.dtype
    if upcast and q.dtype != torch.float64:
        q, k, v = q.float(), k.float(), v.float()
    if scale is None:
        scale = q.shape[-1] ** -0.5
    batch, heads, lq, _ = q.shape
    lk = k.shape[-2]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    allowed, bias = allowed_mask((batch, heads, lq, lk), keep, attn_mask, q.device)
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
