"""Elementwise passes of the default masked linear (regdrop_fast.sparse.masked_linear): every
GEMM is cuBLAS's, these kernels do the work over the weights that mask training adds, one read
of each input and one write of each output per pass.

  materialize  W' = W ⊙ M in the compute dtype, M = scores > φ or packed bits (forward, once
               per step and layer)
  ste_grads    from G = dyᵀ·x (the gradient of W'): dScore = G ⊙ W (straight-through, frozen
               W) and/or dW = G ⊙ M, in one pass over G (backward)
The scores' AdamW step, which also writes the next W' where φ stays, is score_adamw.py's
(one launch for every matrix).

Shapes: W, scores, G [N, K] with any row stride and unit column stride; packed words int32
[N, ceil(K/32)], bit j of word w = column 32w+j, 1 = keep; φ a 1-element fp32 tensor (read on
the device: no host sync). Outputs are contiguous.
"""
import torch
import triton
import triton.language as tl

from .utils import cdiv

_BLOCK_N, _BLOCK_K = 32, 128


@triton.jit
def keep_tile(
    words_ptr,  # int32 [N, W] packed mask (unused when FROM_SCORES)
    scores_ptr,  # [N, K] scores (unused unless FROM_SCORES)
    phi,  # fp32 threshold (keep iff score > phi)
    rn,  # int64 [BLOCK_N] weight rows
    rk,  # int64 [BLOCK_K] weight columns
    valid,  # bool [BLOCK_N, BLOCK_K] in-bounds
    stride_words_n,
    stride_scores_n,
    FROM_SCORES: tl.constexpr,
):
    """bool [BLOCK_N, BLOCK_K] keep decisions (False out of bounds)."""
    if FROM_SCORES:
        s = tl.load(scores_ptr + rn[:, None] * stride_scores_n + rk[None, :], mask=valid,
                    other=0.0).to(tl.float32)
        keep = s > phi
    else:
        word = tl.load(words_ptr + rn[:, None] * stride_words_n + (rk[None, :] >> 5), mask=valid,
                       other=0)
        keep = ((word >> (rk[None, :] & 31).to(tl.int32)) & 1) != 0
    return keep & valid


@triton.jit
def materialize_kernel(
    w_ptr,  # [N, K] weight, row stride stride_wn
    words_ptr, scores_ptr, phi_ptr,  # mask source
    out_ptr,  # [N, K] W ⊙ M in the compute dtype, contiguous
    N, K,
    stride_wn, stride_words_n, stride_scores_n,
    FROM_SCORES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rn = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    valid = (rn[:, None] < N) & (rk[None, :] < K)
    phi = tl.load(phi_ptr)
    w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=valid, other=0.0)
    keep = keep_tile(words_ptr, scores_ptr, phi, rn, rk, valid, stride_words_n, stride_scores_n,
                     FROM_SCORES)
    out = tl.where(keep, w, tl.zeros_like(w)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rn[:, None] * K + rk[None, :], out, mask=valid)


@triton.jit
def ste_grads_kernel(
    g_ptr,  # [N, K] G = dyᵀ·x, row stride stride_gn
    w_ptr,  # [N, K] weight (read only for dScore)
    words_ptr, scores_ptr, phi_ptr,  # mask source (read only for dW)
    dscore_ptr,  # [N, K] G ⊙ W in the scores' dtype, contiguous (unless WANT_DSCORE: unused)
    dw_ptr,  # [N, K] G ⊙ M in the weight's dtype, contiguous (unless WANT_DW: unused)
    N, K,
    stride_gn, stride_wn, stride_words_n, stride_scores_n,
    FROM_SCORES: tl.constexpr,
    WANT_DSCORE: tl.constexpr,
    WANT_DW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rn = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    valid = (rn[:, None] < N) & (rk[None, :] < K)
    g = tl.load(g_ptr + rn[:, None] * stride_gn + rk[None, :], mask=valid,
                other=0.0).to(tl.float32)
    out_offs = rn[:, None] * K + rk[None, :]
    if WANT_DSCORE:
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=valid,
                    other=0.0).to(tl.float32)
        tl.store(dscore_ptr + out_offs, (g * w).to(dscore_ptr.dtype.element_ty), mask=valid)
    if WANT_DW:
        phi = tl.load(phi_ptr)
        keep = keep_tile(words_ptr, scores_ptr, phi, rn, rk, valid, stride_words_n,
                         stride_scores_n, FROM_SCORES)
        tl.store(dw_ptr + out_offs, tl.where(keep, g, 0.0).to(dw_ptr.dtype.element_ty),
                 mask=valid)


_placeholders = {}


def _placeholder(device, dtype):
    """A 1-element tensor for a pointer argument whose value the kernel does not use (the
    unused mask source, φ of a packed mask), made once per device and dtype rather than on
    every launch; never written."""
    key = (device, dtype)
    t = _placeholders.get(key)
    if t is None:
        t = _placeholders[key] = torch.zeros(1, dtype=dtype, device=device)
    return t


def mask_args(words, scores, phi, device):
    """(words, scores, phi, words row stride, scores row stride, from_scores) with placeholders
    for the unused source."""
    if scores is not None:
        return _placeholder(device, torch.int32), scores, phi, 0, scores.stride(0), True
    phi = _placeholder(device, torch.float32)
    return words, phi, phi, words.stride(0), 0, False


def _grid(n, k):
    return (cdiv(n, _BLOCK_N), cdiv(k, _BLOCK_K))


def materialize(weight, words, scores, phi, dtype):
    """W ⊙ M [N, K] in `dtype`, contiguous. weight/scores/words: unit column stride."""
    n, k = weight.shape
    out = torch.empty(n, k, dtype=dtype, device=weight.device)
    if out.numel() == 0:
        return out
    words, scores, phi, s_words, s_scores, from_scores = mask_args(words, scores, phi,
                                                                    weight.device)
    # .run(grid=, warmup=False) is what kernel[grid](...) calls, without its per-call lambda
    materialize_kernel.run(weight, words, scores, phi, out, n, k, weight.stride(0), s_words,
                           s_scores, FROM_SCORES=from_scores, BLOCK_N=_BLOCK_N,
                           BLOCK_K=_BLOCK_K, grid=_grid(n, k), warmup=False)
    return out


def ste_grads(g, weight, words, scores, phi, want_dscore, want_dw, score_dtype):
    """(dScore = G ⊙ W in score_dtype or None, dW = G ⊙ M in weight's dtype or None)."""
    n, k = g.shape
    dscore = torch.empty(n, k, dtype=score_dtype, device=g.device) if want_dscore else None
    dw = torch.empty(n, k, dtype=weight.dtype, device=g.device) if want_dw else None
    if g.numel() == 0 or not (want_dscore or want_dw):
        return dscore, dw
    placeholder = dscore if dscore is not None else dw
    words, scores, phi, s_words, s_scores, from_scores = mask_args(words, scores, phi, g.device)
    ste_grads_kernel.run(
        g, weight, words, scores, phi, dscore if want_dscore else placeholder,
        dw if want_dw else placeholder, n, k, g.stride(0), weight.stride(0), s_words, s_scores,
        FROM_SCORES=from_scores, WANT_DSCORE=want_dscore, WANT_DW=want_dw,
        BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, grid=_grid(n, k), warmup=False)
    return dscore, dw
