"""Flash-attention-style attention reading the AD-DROP bit mask, forward and backward, in Triton.

  S = scale·Q·Kᵀ (+ additive mask), S = −inf where not allowed
  allowed[b,h,i,j] = bit j of keep[b,h,i] AND key padding[b,j] AND bool mask[b,h,i,j]
  P = softmax_j(S) (a row with nothing allowed gives P = 0, O = 0, zero gradients)
  O = (P ⊙ Z / (1 − dropout_p))·V,  Z = philox_word(seed, index, step, stream) <
      floor((1 − dropout_p)·2^32), index = b·H·Lq·Lk + h·Lq·Lk + i·Lk + j (when dropout_p > 0)
Online softmax in base 2; saved state: O and the row logsumexp (base 2, +inf on empty rows);
Z is regenerated in backward, nothing of size L² is written.

Backward (FlashAttention-2): delta_i = rowsum(dO ⊙ O); one kernel per key block accumulates
dK, dV over the query blocks, one per query block accumulates dQ over the key blocks (no
atomics): dP = dO·Vᵀ ⊙ Z/(1 − dropout_p), dS = P ⊙ (dP − delta), dQ = scale·dS·K,
dK = scale·dSᵀ·Q, dV = (P ⊙ Z/(1 − dropout_p))ᵀ·dO.

Memory traffic per (b,h): forward reads Q once, K and V once per query block, the mask bits
Lq·Lk/8 bytes, writes O and lse; backward reads Q, K, V, O, dO, the bits, writes dQ, dK, dV.
Launch grids: forward and dQ (cdiv(Lq, BLOCK_M), B·H); dK/dV (cdiv(Lk, BLOCK_N), B·H).
"""
import math

import torch
import triton
import triton.language as tl

from .addrop_mask import mask_element_index
from .philox import philox_word

LOG2E = tl.constexpr(1.4426950408889634)
MASK_NONE = tl.constexpr(0)
MASK_BOOL = tl.constexpr(1)
MASK_ADDITIVE = tl.constexpr(2)


@triton.jit
def _keep_bits(row_ptr, offs_m, Lq, start_n, Lk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """bool [BLOCK_M, BLOCK_N]: keep bits of keys start_n .. start_n + BLOCK_N − 1 (start_n a
    multiple of 32), read as BLOCK_N/32 words per row: one [BLOCK_M] load per word, so no
    per-key pointers (registers) and no 32x repeated loads."""
    cols = tl.arange(0, BLOCK_N)
    bits = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for c in tl.static_range(BLOCK_N // 32):
        # the word test as a block: a scalar bool in the mask trips the interpreter
        in_row = (offs_m < Lq) & (offs_m * 0 + start_n + 32 * c < Lk)
        word = tl.load(row_ptr + start_n // 32 + c, mask=in_row, other=0)
        bits = tl.where((cols // 32 == c)[None, :], word[:, None] >> (cols % 32)[None, :], bits)
    return (bits & 1) != 0


@triton.jit
def _masked_scores(s, offs_m, start_n, b, h, Lq, Lk,
                   keep_ptr, keep_b, keep_h, keep_m,
                   kpm_ptr, kpm_b,
                   am_ptr, am_b, am_h, am_m, am_n,
                   HAS_KEEP: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Scores (base-2 units) of keys start_n .. start_n + BLOCK_N − 1 with the additive mask
    added and −inf where not allowed."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    allowed = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
    if HAS_KEEP:
        allowed = allowed & _keep_bits(keep_ptr + b * keep_b + h * keep_h + offs_m * keep_m,
                                       offs_m, Lq, start_n, Lk, BLOCK_M, BLOCK_N)
    if HAS_KPM:
        real = tl.load(kpm_ptr + b * kpm_b + offs_n, mask=offs_n < Lk, other=0)
        allowed = allowed & (real != 0)[None, :]
    if MASK_KIND != MASK_NONE:
        am_ptrs = (am_ptr + b * am_b + h * am_h + offs_m[:, None] * am_m
                   + offs_n[None, :] * am_n)
        if MASK_KIND == MASK_BOOL:
            allowed = allowed & (tl.load(am_ptrs, mask=allowed, other=0) != 0)
        if MASK_KIND == MASK_ADDITIVE:
            s = s + tl.load(am_ptrs, mask=allowed, other=0.0).to(tl.float32) * LOG2E
    return tl.where(allowed, s, float("-inf"))


@triton.jit
def _dropout_keep(b, h, H, Lq, Lk, offs_m, offs_n, seed_lo, seed_hi, step, stream, keep_thr):
    """Attention-dropout keep decisions of a tile: word < floor((1 − dropout_p)·2^32)."""
    index = mask_element_index(b, h, H, Lq, Lk, offs_m, offs_n)
    word = philox_word(seed_lo, seed_hi, index, step, stream)
    return word.to(tl.int64) < keep_thr


@triton.jit
def masked_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr,  # [B,H,L,D], last stride 1
    o_ptr,  # [B,H,Lq,D] output, contiguous
    lse_ptr,  # fp32 [B,H,Lq] base-2 logsumexp, contiguous
    keep_ptr, keep_b, keep_h, keep_m,  # int32 bits [B,H,Lq,W] and strides (HAS_KEEP)
    kpm_ptr, kpm_b,  # uint8 [B,Lk] key padding, 1 = attend (HAS_KPM)
    am_ptr, am_b, am_h, am_m, am_n,  # 4-D mask broadcast to [B,H,Lq,Lk] by strides (MASK_KIND)
    q_b, q_h, q_m, k_b, k_h, k_n, v_b, v_h, v_n,  # strides of q, k, v
    H, Lq, Lk, D,  # heads, query/key lengths, head dim
    qk_scale,  # scale * log2(e)
    seed_lo, seed_hi, step, stream,  # attention-dropout Philox key halves and counter words
    dropout_keep_thr,  # floor((1 - dropout_p) * 2^32)
    dropout_scale,  # 1 / (1 - dropout_p)
    HAS_KEEP: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    q = tl.load(q_ptr + b * q_b + h * q_h + offs_m[:, None] * q_m + offs_d[None, :],
                mask=(offs_m[:, None] < Lq) & in_d[None, :], other=0.0)
    keep_thr = tl.cast(dropout_keep_thr, tl.int64)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_n = offs_n < Lk
        kt = tl.load(k_ptr + b * k_b + h * k_h + offs_n[None, :] * k_n + offs_d[:, None],
                     mask=in_n[None, :] & in_d[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        s = _masked_scores(s, offs_m, start_n, b, h, Lq, Lk, keep_ptr, keep_b, keep_h, keep_m,
                           kpm_ptr, kpm_b, am_ptr, am_b, am_h, am_m, am_n,
                           HAS_KEEP, HAS_KPM, MASK_KIND, BLOCK_M, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # rows with nothing allowed yet: subtract 0 so exp2 gives 0, not NaN from −inf − −inf
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if HAS_DROPOUT:
            z = _dropout_keep(b, h, H, Lq, Lk, offs_m, offs_n, seed_lo, seed_hi, step, stream,
                              keep_thr)
            p = tl.where(z, p * dropout_scale, 0.0)
        v = tl.load(v_ptr + b * v_b + h * v_h + offs_n[:, None] * v_n + offs_d[None, :],
                    mask=in_n[:, None] & in_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    has_any = l_i > 0.0
    out = acc / tl.where(has_any, l_i, 1.0)[:, None]
    lse = tl.where(has_any, m_i + tl.math.log2(tl.where(has_any, l_i, 1.0)), float("inf"))
    row = bh * Lq + offs_m
    in_m = offs_m < Lq
    tl.store(o_ptr + row[:, None] * D + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=in_m[:, None] & in_d[None, :])
    tl.store(lse_ptr + row, lse, mask=in_m)


@triton.jit
def masked_attention_bwd_delta_kernel(
    o_ptr,  # [B,H,Lq,D] contiguous
    do_ptr,  # [B,H,Lq,D], last stride 1
    delta_ptr,  # fp32 [B,H,Lq] output: rowsum(dO * O)
    do_b, do_h, do_m,  # strides of dO
    H, Lq, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < D)
    row = bh * Lq + offs_m
    o = tl.load(o_ptr + row[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(do_ptr + (bh // H) * do_b + (bh % H) * do_h + offs_m[:, None] * do_m
                 + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + row, delta, mask=offs_m < Lq)


@triton.jit
def _bwd_tile(q, do, kt, vt, lse, delta, offs_m, start_n, b, h, H, Lq, Lk, qk_scale,
              keep_ptr, keep_b, keep_h, keep_m, kpm_ptr, kpm_b,
              am_ptr, am_b, am_h, am_m, am_n,
              seed_lo, seed_hi, step, stream, keep_thr, dropout_scale,
              HAS_KEEP: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr,
              HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(P ⊙ Z/(1−dropout_p), dS) of one [BLOCK_M, BLOCK_N] tile, recomputed from Q, K, lse."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    s = _masked_scores(s, offs_m, start_n, b, h, Lq, Lk, keep_ptr, keep_b, keep_h, keep_m,
                       kpm_ptr, kpm_b, am_ptr, am_b, am_h, am_m, am_n,
                       HAS_KEEP, HAS_KPM, MASK_KIND, BLOCK_M, BLOCK_N)
    p = tl.math.exp2(s - lse[:, None])
    dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        z = _dropout_keep(b, h, H, Lq, Lk, offs_m, offs_n, seed_lo, seed_hi, step, stream,
                          keep_thr)
        p_drop = tl.where(z, p * dropout_scale, 0.0)
        dp = tl.where(z, dp * dropout_scale, 0.0)
    else:
        p_drop = p
    ds = p * (dp - delta[:, None])
    return p_drop, ds


@triton.jit
def masked_attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr,  # [B,H,L,D], last stride 1
    lse_ptr, delta_ptr,  # fp32 [B,H,Lq]
    dk_ptr, dv_ptr,  # [B,H,Lk,D] outputs, contiguous
    keep_ptr, keep_b, keep_h, keep_m,
    kpm_ptr, kpm_b,
    am_ptr, am_b, am_h, am_m, am_n,
    q_b, q_h, q_m, k_b, k_h, k_n, v_b, v_h, v_n, do_b, do_h, do_m,
    H, Lq, Lk, D,
    qk_scale, sm_scale,  # scale * log2(e), scale
    seed_lo, seed_hi, step, stream, dropout_keep_thr, dropout_scale,
    HAS_KEEP: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    in_n = offs_n < Lk
    kt = tl.load(k_ptr + b * k_b + h * k_h + offs_n[None, :] * k_n + offs_d[:, None],
                 mask=in_n[None, :] & in_d[:, None], other=0.0)
    vt = tl.load(v_ptr + b * v_b + h * v_h + offs_n[None, :] * v_n + offs_d[:, None],
                 mask=in_n[None, :] & in_d[:, None], other=0.0)
    keep_thr = tl.cast(dropout_keep_thr, tl.int64)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for start_m in range(0, Lq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_m = offs_m < Lq
        mask_md = in_m[:, None] & in_d[None, :]
        q = tl.load(q_ptr + b * q_b + h * q_h + offs_m[:, None] * q_m + offs_d[None, :],
                    mask=mask_md, other=0.0)
        do = tl.load(do_ptr + b * do_b + h * do_h + offs_m[:, None] * do_m + offs_d[None, :],
                     mask=mask_md, other=0.0)
        lse = tl.load(lse_ptr + bh * Lq + offs_m, mask=in_m, other=float("inf"))
        delta = tl.load(delta_ptr + bh * Lq + offs_m, mask=in_m, other=0.0)
        p_drop, ds = _bwd_tile(q, do, kt, vt, lse, delta, offs_m, start_n, b, h, H, Lq, Lk,
                               qk_scale, keep_ptr, keep_b, keep_h, keep_m, kpm_ptr, kpm_b,
                               am_ptr, am_b, am_h, am_m, am_n, seed_lo, seed_hi, step, stream,
                               keep_thr, dropout_scale, HAS_KEEP, HAS_KPM, MASK_KIND,
                               HAS_DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N)
        dv += tl.dot(tl.trans(p_drop.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    row = bh * Lk + offs_n
    mask_nd = in_n[:, None] & in_d[None, :]
    tl.store(dk_ptr + row[:, None] * D + offs_d[None, :],
             (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=mask_nd)
    tl.store(dv_ptr + row[:, None] * D + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=mask_nd)


@triton.jit
def masked_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr,  # [B,H,L,D], last stride 1
    lse_ptr, delta_ptr,  # fp32 [B,H,Lq]
    dq_ptr,  # [B,H,Lq,D] output, contiguous
    keep_ptr, keep_b, keep_h, keep_m,
    kpm_ptr, kpm_b,
    am_ptr, am_b, am_h, am_m, am_n,
    q_b, q_h, q_m, k_b, k_h, k_n, v_b, v_h, v_n, do_b, do_h, do_m,
    H, Lq, Lk, D,
    qk_scale, sm_scale,
    seed_lo, seed_hi, step, stream, dropout_keep_thr, dropout_scale,
    HAS_KEEP: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    in_m = offs_m < Lq
    mask_md = in_m[:, None] & in_d[None, :]
    q = tl.load(q_ptr + b * q_b + h * q_h + offs_m[:, None] * q_m + offs_d[None, :],
                mask=mask_md, other=0.0)
    do = tl.load(do_ptr + b * do_b + h * do_h + offs_m[:, None] * do_m + offs_d[None, :],
                 mask=mask_md, other=0.0)
    lse = tl.load(lse_ptr + bh * Lq + offs_m, mask=in_m, other=float("inf"))
    delta = tl.load(delta_ptr + bh * Lq + offs_m, mask=in_m, other=0.0)
    keep_thr = tl.cast(dropout_keep_thr, tl.int64)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_n = offs_n < Lk
        kt = tl.load(k_ptr + b * k_b + h * k_h + offs_n[None, :] * k_n + offs_d[:, None],
                     mask=in_n[None, :] & in_d[:, None], other=0.0)
        vt = tl.load(v_ptr + b * v_b + h * v_h + offs_n[None, :] * v_n + offs_d[:, None],
                     mask=in_n[None, :] & in_d[:, None], other=0.0)
        _, ds = _bwd_tile(q, do, kt, vt, lse, delta, offs_m, start_n, b, h, H, Lq, Lk,
                          qk_scale, keep_ptr, keep_b, keep_h, keep_m, kpm_ptr, kpm_b,
                          am_ptr, am_b, am_h, am_m, am_n, seed_lo, seed_hi, step, stream,
                          keep_thr, dropout_scale, HAS_KEEP, HAS_KPM, MASK_KIND,
                          HAS_DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N)
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)
    row = bh * Lq + offs_m
    tl.store(dq_ptr + row[:, None] * D + offs_d[None, :],
             (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=mask_md)


class MaskArgs:
    """Kernel arguments of the masks: keep bits, key padding, 4-D bool/additive mask.

    keep_words: int32 [B,H,Lq,W] or None; kpm: bool [B,Lk] or None; am: bool or float tensor
    broadcast (by strides) to [B,H,Lq,Lk], or None."""

    def __init__(self, keep_words, kpm, am, dummy):
        self.has_keep = keep_words is not None
        self.has_kpm = kpm is not None
        if am is None:
            self.kind, am_t = MASK_NONE.value, dummy
        elif am.dtype == torch.bool:
            self.kind, am_t = MASK_BOOL.value, am.view(torch.uint8)
        else:
            self.kind, am_t = MASK_ADDITIVE.value, am
        keep = keep_words if self.has_keep else dummy
        kpm_t = kpm.contiguous().view(torch.uint8) if self.has_kpm else dummy
        keep_strides = keep_words.stride()[:3] if self.has_keep else (0, 0, 0)
        self.args = (keep, *keep_strides, kpm_t, kpm_t.stride(0) if self.has_kpm else 0,
                     am_t, *(am.stride() if am is not None else (0, 0, 0, 0)))
        self.flags = dict(HAS_KEEP=self.has_keep, HAS_KPM=self.has_kpm, MASK_KIND=self.kind)


def _settings(q, kernel: str):
    """(tile sizes, num_warps) of "fwd", "dkdv" or "dq": small tiles under the interpreter
    (they exercise the loops), FlashAttention-2-like ones on GPU (not tuned on hardware yet).
    BLOCK_N is a multiple of 32: a key tile covers whole words of the keep bits."""
    block_d = max(16, triton.next_power_of_2(q.shape[-1]))
    if q.device.type == "cpu":
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_D=block_d), 1
    if q.dtype == torch.float32:  # exact-fp32 ("ieee") dots: a correctness path, small tiles
        return dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=block_d), 4
    if kernel == "fwd":
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=block_d), 8
    if kernel == "dkdv":  # 8 warps: dK, dV accumulators plus the recomputed tiles fit registers
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d), 8
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d), 4 if block_d <= 64 else 8


def _dropout_args(dropout_p, seed, step, stream):
    keep_thr = int((1.0 - dropout_p) * 4294967296.0)
    scale = 1.0 / (1.0 - dropout_p) if dropout_p > 0.0 else 1.0
    return (seed & 0xFFFFFFFF, seed >> 32, step, stream, keep_thr, scale)


def masked_attention_forward(q, k, v, masks: MaskArgs, scale: float, dropout_p: float,
                             seed: int, step: int, stream: int):
    """(O [B,H,Lq,D] contiguous in q's dtype, lse fp32 [B,H,Lq] base 2)."""
    batch, heads, lq, d = q.shape
    lk = k.shape[2]
    out = torch.empty(batch, heads, lq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, lq, dtype=torch.float32, device=q.device)
    blocks, num_warps = _settings(q, "fwd")
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(lq, blocks["BLOCK_M"]), batch * heads)
    masked_attention_fwd_kernel[grid](
        q, k, v, out, lse, *masks.args,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        heads, lq, lk, d, scale * math.log2(math.e),
        *_dropout_args(dropout_p, seed, step, stream),
        **masks.flags, HAS_DROPOUT=dropout_p > 0.0, **blocks, DOT_PRECISION=precision,
        num_warps=num_warps)
    return out, lse


def masked_attention_backward(do, q, k, v, out, lse, masks: MaskArgs, scale: float,
                              dropout_p: float, seed: int, step: int, stream: int):
    """(dq, dk, dv), contiguous, in q's dtype. `do` needs last stride 1."""
    batch, heads, lq, d = q.shape
    lk = k.shape[2]
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    delta = torch.empty_like(lse)
    blocks, num_warps = _settings(q, "dq")
    grid_m = (triton.cdiv(lq, blocks["BLOCK_M"]), batch * heads)
    masked_attention_bwd_delta_kernel[grid_m](
        out, do, delta, *do.stride()[:3], heads, lq, d,
        BLOCK_M=blocks["BLOCK_M"], BLOCK_D=blocks["BLOCK_D"], num_warps=num_warps)
    dq = torch.empty(batch, heads, lq, d, dtype=q.dtype, device=q.device)
    dk = torch.empty(batch, heads, lk, d, dtype=k.dtype, device=q.device)
    dv = torch.empty(batch, heads, lk, d, dtype=v.dtype, device=q.device)
    common = (*masks.args, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
              *do.stride()[:3], heads, lq, lk, d, scale * math.log2(math.e), scale,
              *_dropout_args(dropout_p, seed, step, stream))
    flags = dict(**masks.flags, HAS_DROPOUT=dropout_p > 0.0, DOT_PRECISION=precision)
    kv_blocks, kv_warps = _settings(q, "dkdv")
    masked_attention_bwd_dkdv_kernel[(triton.cdiv(lk, kv_blocks["BLOCK_N"]), batch * heads)](
        q, k, v, do, lse, delta, dk, dv, *common, **flags, **kv_blocks, num_warps=kv_warps)
    masked_attention_bwd_dq_kernel[grid_m](q, k, v, do, lse, delta, dq, *common, **flags,
                                           **blocks, num_warps=num_warps)
    return dq, dk, dv
