"""Flash-attention-style attention reading the AD-DROP bit mask, forward and backward, in Triton.

  S = scale·Q·Kᵀ (+ additive mask), S = −inf where not allowed
  allowed[b,h,i,j] = bit j of keep[b,h,i] AND key padding[b,j] AND bool mask[b,h,i,j]
                     (AND j <= i + Lk − Lq when IS_CAUSAL: bottom-right aligned)
  P = softmax_j(S) (a row with nothing allowed gives P = 0, O = 0, zero gradients)
  O = (P ⊙ Z / (1 − dropout_p))·V,  Z = philox_word(seed, index, step, stream) <
      floor((1 − dropout_p)·2^32), index = b·H·Lq·Lk + h·Lq·Lk + i·Lk + j (when dropout_p > 0)
Online softmax in base 2 (scores scaled by scale·log2 e once after the dot, exp2 only); saved
state: O and the row logsumexp (base 2, +inf on empty rows); Z is regenerated in backward,
nothing of size L² is written. The keep bits of a tile are one [BLOCK_M, BLOCK_N/32] word load
expanded by shifts.

Grouped-query attention: K, V have Hkv heads (Hkv divides H); query head h reads kv head
h // GROUP, GROUP = H / Hkv, in place. Causal: the forward and dQ loops stop at the block's
last visible key, the dK/dV loop starts at the first query block that sees the key block.

Backward (FlashAttention-2): delta_i = rowsum(dO ⊙ O); one program per query block accumulates
dQ over the key blocks and first computes its rows' delta, which it stores for the dK/dV kernel
launched after it (no separate delta launch); one program per (key block, kv head) accumulates
dK, dV over the GROUP query heads and their query blocks (no atomics):
dP = dO·Vᵀ ⊙ Z/(1 − dropout_p), dS = P ⊙ (dP − delta), dQ = scale·dS·K, dK = scale·dSᵀ·Q,
dV = (P ⊙ Z/(1 − dropout_p))ᵀ·dO.

Tiles: autotuned on GPU over a pruned list keyed on (power-of-two length bucket, D, GROUP,
dtype, flags, TMA_OK); one config under the interpreter (small tiles that exercise the loops).
Each tile shape comes twice: with pointer loads, and (USE_TMA) with the Q/K/V/dO tiles read and
the O/dQ/dK/dV tiles written through tensor descriptors (Hopper's bulk tensor copies), so the
autotuner measures which wins. A descriptor spans one head's [L, D] matrix (out-of-range rows
and the columns of a padded D read as zeros, stores there are dropped: no masks), built on the
device per program and per GQA head, hence any head/batch strides; the keep bits, key padding
and 4-D masks stay pointer loads (their tiles are not [rows, D] boxes). TMA needs 16-byte
aligned bases and strides: when the inputs lack them (TMA_OK = 0) the TMA configs are pruned.

Memory traffic per (b,h): forward reads Q once, K and V once per query block, the mask bits
Lq·Lk/8 bytes, writes O and lse; backward reads Q, K, V, O, dO, the bits, writes dQ, dK, dV.
Launch grids: forward and dQ (cdiv(Lq, BLOCK_M), B·H); dK/dV (cdiv(Lk, BLOCK_N), B·Hkv).
Backward launches dQ (with delta) before dK/dV.
"""
import os

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from .addrop_mask import mask_element_index
from .philox import philox_word
from .utils import cdiv, next_power_of_2

LOG2E = tl.constexpr(1.4426950408889634)
_LOG2E = 1.4426950408889634  # the host's copy
MASK_NONE = tl.constexpr(0)
MASK_BOOL = tl.constexpr(1)
MASK_ADDITIVE = tl.constexpr(2)


@triton.jit
def _keep_bits(row_ptr, offs_m, Lq, start_n, Lk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """bool [BLOCK_M, BLOCK_N]: keep bits of keys start_n .. start_n + BLOCK_N − 1 (start_n a
    multiple of 32): one [BLOCK_M, BLOCK_N/32] word tile load, expanded by shifts (no per-key
    pointers, no per-word loop)."""
    offs_w = start_n // 32 + tl.arange(0, BLOCK_N // 32)
    in_tile = (offs_m[:, None] < Lq) & (offs_w[None, :] * 32 < Lk)
    words = tl.load(row_ptr[:, None] + offs_w[None, :], mask=in_tile, other=0)
    shifts = tl.arange(0, 32)
    bits = (words[:, :, None] >> shifts[None, None, :]) & 1
    return tl.reshape(bits, (BLOCK_M, BLOCK_N)) != 0


@triton.jit
def _masked_scores(s, offs_m, start_n, b, h, Lq, Lk,
                   keep_ptr, keep_b, keep_h, keep_m,
                   kpm_ptr, kpm_b,
                   am_ptr, am_b, am_h, am_m, am_n,
                   HAS_KEEP: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr,
                   IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Scores (base-2 units) of keys start_n .. start_n + BLOCK_N − 1 with the additive mask
    added and −inf where not allowed."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    allowed = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
    if IS_CAUSAL:
        allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + (Lk - Lq))
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
def _key_end(start_m, Lq, Lk, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """Exclusive end of the keys visible from query rows start_m .. start_m + BLOCK_M − 1."""
    end = Lk
    if IS_CAUSAL:
        end = tl.minimum(Lk, tl.maximum(0, start_m + BLOCK_M + (Lk - Lq)))
    return end


@triton.jit
def _query_start(start_n, Lq, Lk, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """First query block start (a multiple of BLOCK_M) whose rows can see key start_n."""
    start = 0
    if IS_CAUSAL:
        start = tl.maximum(0, start_n - (Lk - Lq)) // BLOCK_M * BLOCK_M
    return start


@triton.jit
def _dropout_keep(b, h, H, Lq, Lk, offs_m, offs_n, seed_lo, seed_hi, step, stream, keep_thr):
    """Attention-dropout keep decisions of a tile: word < floor((1 − dropout_p)·2^32)."""
    index = mask_element_index(b, h, H, Lq, Lk, offs_m, offs_n)
    word = philox_word(seed_lo, seed_hi, index, step, stream)
    return word.to(tl.int64) < keep_thr


@triton.jit
def _tile_desc(base, rows, D, row_stride, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Tensor descriptor of the [rows, D] matrix at `base` (row stride in elements, columns
    contiguous), moving [BLOCK_R, BLOCK_D] tiles: zeros beyond rows and D, stores clipped."""
    return tl.make_tensor_descriptor(base, shape=[rows, D], strides=[row_stride, 1],
                                     block_shape=[BLOCK_R, BLOCK_D])


def _prune(configs, named_args, **kwargs):
    """TMA configs only for inputs with 16-byte aligned bases and strides (TMA_OK); exact-fp32
    ("ieee") dots take only the small tiles (their operands are twice as wide)."""
    if not named_args["TMA_OK"]:
        configs = [c for c in configs if not c.kwargs["USE_TMA"]]
    if named_args["q_ptr"].dtype != torch.float32:
        return configs
    small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32]
    return small or configs[:1]


def tma_ok(*tensors) -> int:
    """1 when the [B, H, L, D] tensors (one dtype, one D) suit tensor descriptors over their
    [L, D] head matrices and over those of the contiguous outputs: bases, the strides of dims
    0-2 and a row of D elements multiples of 16 bytes (the last stride is 1 in every
    launcher), rows that do not overlap (an expanded length dim has stride 0), D within one
    TMA box (<= 256 elements). Bitwise ORs: every value is a multiple of a power of two iff
    their OR is (this runs on every call)."""
    d = tensors[0].shape[-1]
    ptrs, strides = 0, d
    for t in tensors:
        st = t.stride()
        if st[2] < d:
            return 0
        ptrs |= t.data_ptr()
        strides |= st[0] | st[1] | st[2]
    return int(d <= 256 and not ptrs & 15
               and not strides & (16 // tensors[0].element_size() - 1))


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator(device) -> None:
    """Descriptors built on the device live in a global scratch buffer that Triton takes from
    the allocator set with triton.set_allocator; install a torch one if the caller set none
    (without one, a TMA config could not launch)."""
    if device.type == "cuda" and isinstance(_allocation._allocator.get(),
                                            _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def _configs(kernel: str):
    """Tile list of one kernel ("fwd", "dkdv", "dq"): (BLOCK_M, BLOCK_N, warps, stages), each
    free of register spills for bf16 at D = 128 with every mask and dropout on (the sm_90
    compile check of tools/triton_aot; bigger tiles spill there, chiefly from the Philox
    rounds), and with wgmma dots; each with pointer loads and with tensor descriptors
    (USE_TMA). One small pointer config in the interpreter (it exercises the loops; the tests
    swap in its TMA twin). BLOCK_N is a multiple of 32: a key tile covers whole words of the
    keep bits."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config(dict(BLOCK_M=16, BLOCK_N=32, USE_TMA=False), num_warps=1,
                              num_stages=1)]
    shapes = {
        "fwd": [(128, 32, 8, 2), (64, 64, 4, 3), (64, 64, 8, 2), (64, 32, 4, 2)],
        "dkdv": [(32, 64, 8, 2)],
        "dq": [(64, 64, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
    }[kernel]
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, USE_TMA=tma), num_warps=w, num_stages=st)
            for tma in (False, True) for m, n, w, st in shapes]


# keyed on a power-of-two length bucket, not the exact lengths: training batches padded to
# their longest sample would otherwise re-tune at every new length
_TUNE_KEY = ["LEN_BUCKET", "TMA_OK", "D", "GROUP", "HAS_KEEP", "HAS_KPM", "MASK_KIND",
             "HAS_DROPOUT", "IS_CAUSAL"]


@triton.autotune(configs=_configs("fwd"), key=_TUNE_KEY,
                 prune_configs_by=dict(early_config_prune=_prune))
@triton.jit
def masked_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr,  # q [B,H,Lq,D], k/v [B,Hkv,Lk,D], last stride 1
    o_ptr,  # [B,H,Lq,D] output, contiguous
    lse_ptr,  # fp32 [B,H,Lq] base-2 logsumexp, contiguous
    keep_ptr, keep_b, keep_h, keep_m,  # int32 bits [B,H,Lq,W] and strides (HAS_KEEP)
    kpm_ptr, kpm_b,  # uint8 [B,Lk] key padding, 1 = attend (HAS_KPM)
    am_ptr, am_b, am_h, am_m, am_n,  # 4-D mask broadcast to [B,H,Lq,Lk] by strides (MASK_KIND)
    q_b, q_h, q_m, k_b, k_h, k_n, v_b, v_h, v_n,  # strides of q, k, v
    H, Lq, Lk, D,  # query heads, query/key lengths, head dim
    GROUP,  # query heads per kv head
    LEN_BUCKET,  # next power of two of max(Lq, Lk): the autotuning key only
    TMA_OK,  # 1 when q, k, v (and dO) suit tensor descriptors (tma_ok): tuning key, pruning
    qk_scale,  # scale * log2(e)
    seed_lo, seed_hi, step, stream,  # attention-dropout Philox key halves and counter words
    dropout_keep_thr,  # floor((1 - dropout_p) * 2^32)
    dropout_scale,  # 1 / (1 - dropout_p)
    HAS_KEEP: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs
    USE_TMA: tl.constexpr,  # tiles of q, k, v, o through tensor descriptors
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hkv = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    k_base = k_ptr + b * k_b + hkv * k_h
    v_base = v_ptr + b * v_b + hkv * v_h
    if USE_TMA:
        q = _tile_desc(q_ptr + b * q_b + h * q_h, Lq, D, q_m, BLOCK_M, BLOCK_D).load([start_m, 0])
        k_desc = _tile_desc(k_base, Lk, D, k_n, BLOCK_N, BLOCK_D)
        v_desc = _tile_desc(v_base, Lk, D, v_n, BLOCK_N, BLOCK_D)
    else:
        q = tl.load(q_ptr + b * q_b + h * q_h + offs_m[:, None] * q_m + offs_d[None, :],
                    mask=(offs_m[:, None] < Lq) & in_d[None, :], other=0.0)
    keep_thr = tl.cast(dropout_keep_thr, tl.int64)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, _key_end(start_m, Lq, Lk, IS_CAUSAL, BLOCK_M), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_n = offs_n < Lk
        if USE_TMA:
            kt = k_desc.load([start_n, 0]).T
        else:
            kt = tl.load(k_base + offs_n[None, :] * k_n + offs_d[:, None],
                         mask=in_n[None, :] & in_d[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        s = _masked_scores(s, offs_m, start_n, b, h, Lq, Lk, keep_ptr, keep_b, keep_h, keep_m,
                           kpm_ptr, kpm_b, am_ptr, am_b, am_h, am_m, am_n,
                           HAS_KEEP, HAS_KPM, MASK_KIND, IS_CAUSAL, BLOCK_M, BLOCK_N)
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
        if USE_TMA:
            v = v_desc.load([start_n, 0])
        else:
            v = tl.load(v_base + offs_n[:, None] * v_n + offs_d[None, :],
                        mask=in_n[:, None] & in_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    has_any = l_i > 0.0
    out = acc / tl.where(has_any, l_i, 1.0)[:, None]
    lse = tl.where(has_any, m_i + tl.math.log2(tl.where(has_any, l_i, 1.0)), float("inf"))
    row = bh * Lq + offs_m
    in_m = offs_m < Lq
    if USE_TMA:
        _tile_desc(o_ptr + bh * Lq * D, Lq, D, D, BLOCK_M, BLOCK_D).store(
            [start_m, 0], out.to(o_ptr.dtype.element_ty))
    else:
        tl.store(o_ptr + row[:, None] * D + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=in_m[:, None] & in_d[None, :])
    tl.store(lse_ptr + row, lse, mask=in_m)


@triton.jit
def _bwd_tile(q, do, kt, vt, lse, delta, offs_m, start_n, b, h, H, Lq, Lk, qk_scale,
              keep_ptr, keep_b, keep_h, keep_m, kpm_ptr, kpm_b,
              am_ptr, am_b, am_h, am_m, am_n,
              seed_lo, seed_hi, step, stream, keep_thr, dropout_scale,
              HAS_KEEP: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr,
              HAS_DROPOUT: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(P ⊙ Z/(1−dropout_p), dS) of one [BLOCK_M, BLOCK_N] tile, recomputed from Q, K, lse."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    s = _masked_scores(s, offs_m, start_n, b, h, Lq, Lk, keep_ptr, keep_b, keep_h, keep_m,
                       kpm_ptr, kpm_b, am_ptr, am_b, am_h, am_m, am_n,
                       HAS_KEEP, HAS_KPM, MASK_KIND, IS_CAUSAL, BLOCK_M, BLOCK_N)
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


@triton.autotune(configs=_configs("dkdv"), key=_TUNE_KEY,
                 prune_configs_by=dict(early_config_prune=_prune))
@triton.jit
def masked_attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr,  # q/dO [B,H,Lq,D], k/v [B,Hkv,Lk,D], last stride 1
    lse_ptr, delta_ptr,  # fp32 [B,H,Lq]
    dk_ptr, dv_ptr,  # [B,Hkv,Lk,D] outputs, contiguous
    keep_ptr, keep_b, keep_h, keep_m,
    kpm_ptr, kpm_b,
    am_ptr, am_b, am_h, am_m, am_n,
    q_b, q_h, q_m, k_b, k_h, k_n, v_b, v_h, v_n, do_b, do_h, do_m,
    H, Lq, Lk, D,
    GROUP,  # query heads per kv head: this program sums over heads hkv·GROUP .. + GROUP − 1
    LEN_BUCKET,  # next power of two of max(Lq, Lk): the autotuning key only
    TMA_OK,  # 1 when q, k, v (and dO) suit tensor descriptors (tma_ok): tuning key, pruning
    qk_scale, sm_scale,  # scale * log2(e), scale
    seed_lo, seed_hi, step, stream, dropout_keep_thr, dropout_scale,
    HAS_KEEP: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,  # tiles of q, k, v, dO and the gradients through tensor descriptors
):
    pid_n = tl.program_id(0)
    bhkv = tl.program_id(1).to(tl.int64)
    hkv_count = H // GROUP
    b = bhkv // hkv_count
    hkv = bhkv % hkv_count
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    in_n = offs_n < Lk
    if USE_TMA:
        kt = _tile_desc(k_ptr + b * k_b + hkv * k_h, Lk, D, k_n, BLOCK_N, BLOCK_D).load(
            [start_n, 0]).T
        vt = _tile_desc(v_ptr + b * v_b + hkv * v_h, Lk, D, v_n, BLOCK_N, BLOCK_D).load(
            [start_n, 0]).T
    else:
        kt = tl.load(k_ptr + b * k_b + hkv * k_h + offs_n[None, :] * k_n + offs_d[:, None],
                     mask=in_n[None, :] & in_d[:, None], other=0.0)
        vt = tl.load(v_ptr + b * v_b + hkv * v_h + offs_n[None, :] * v_n + offs_d[:, None],
                     mask=in_n[None, :] & in_d[:, None], other=0.0)
    keep_thr = tl.cast(dropout_keep_thr, tl.int64)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    lo = _query_start(start_n, Lq, Lk, IS_CAUSAL, BLOCK_M)
    for g in range(GROUP):
        h = hkv * GROUP + g
        bh = b * H + h
        if USE_TMA:  # one descriptor per query head of the group
            q_desc = _tile_desc(q_ptr + b * q_b + h * q_h, Lq, D, q_m, BLOCK_M, BLOCK_D)
            do_desc = _tile_desc(do_ptr + b * do_b + h * do_h, Lq, D, do_m, BLOCK_M, BLOCK_D)
        for start_m in range(lo, Lq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            in_m = offs_m < Lq
            if USE_TMA:
                q = q_desc.load([start_m, 0])
                do = do_desc.load([start_m, 0])
            else:
                mask_md = in_m[:, None] & in_d[None, :]
                q = tl.load(q_ptr + b * q_b + h * q_h + offs_m[:, None] * q_m
                            + offs_d[None, :], mask=mask_md, other=0.0)
                do = tl.load(do_ptr + b * do_b + h * do_h + offs_m[:, None] * do_m
                             + offs_d[None, :], mask=mask_md, other=0.0)
            lse = tl.load(lse_ptr + bh * Lq + offs_m, mask=in_m, other=float("inf"))
            delta = tl.load(delta_ptr + bh * Lq + offs_m, mask=in_m, other=0.0)
            p_drop, ds = _bwd_tile(q, do, kt, vt, lse, delta, offs_m, start_n, b, h, H, Lq, Lk,
                                   qk_scale, keep_ptr, keep_b, keep_h, keep_m, kpm_ptr, kpm_b,
                                   am_ptr, am_b, am_h, am_m, am_n, seed_lo, seed_hi, step,
                                   stream, keep_thr, dropout_scale, HAS_KEEP, HAS_KPM,
                                   MASK_KIND, HAS_DROPOUT, IS_CAUSAL, DOT_PRECISION, BLOCK_M,
                                   BLOCK_N)
            dv += tl.dot(tl.trans(p_drop.to(do.dtype)), do, input_precision=DOT_PRECISION)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    dk = (dk * sm_scale).to(dk_ptr.dtype.element_ty)
    dv = dv.to(dv_ptr.dtype.element_ty)
    if USE_TMA:
        _tile_desc(dk_ptr + bhkv * Lk * D, Lk, D, D, BLOCK_N, BLOCK_D).store([start_n, 0], dk)
        _tile_desc(dv_ptr + bhkv * Lk * D, Lk, D, D, BLOCK_N, BLOCK_D).store([start_n, 0], dv)
    else:
        row = bhkv * Lk + offs_n
        mask_nd = in_n[:, None] & in_d[None, :]
        tl.store(dk_ptr + row[:, None] * D + offs_d[None, :], dk, mask=mask_nd)
        tl.store(dv_ptr + row[:, None] * D + offs_d[None, :], dv, mask=mask_nd)


@triton.autotune(configs=_configs("dq"), key=_TUNE_KEY,
                 prune_configs_by=dict(early_config_prune=_prune))
@triton.jit
def masked_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr,  # q/dO [B,H,Lq,D], k/v [B,Hkv,Lk,D], last stride 1
    o_ptr,  # [B,H,Lq,D] forward output, contiguous
    lse_ptr,  # fp32 [B,H,Lq]
    delta_ptr,  # fp32 [B,H,Lq] output: rowsum(dO ⊙ O), read by the dK/dV kernel
    dq_ptr,  # [B,H,Lq,D] output, contiguous
    keep_ptr, keep_b, keep_h, keep_m,
    kpm_ptr, kpm_b,
    am_ptr, am_b, am_h, am_m, am_n,
    q_b, q_h, q_m, k_b, k_h, k_n, v_b, v_h, v_n, do_b, do_h, do_m,
    H, Lq, Lk, D,
    GROUP,  # query heads per kv head
    LEN_BUCKET,  # next power of two of max(Lq, Lk): the autotuning key only
    TMA_OK,  # 1 when q, k, v (and dO) suit tensor descriptors (tma_ok): tuning key, pruning
    qk_scale, sm_scale,
    seed_lo, seed_hi, step, stream, dropout_keep_thr, dropout_scale,
    HAS_KEEP: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,  # tiles of q, k, v, dO and the gradients through tensor descriptors
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hkv = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    in_m = offs_m < Lq
    mask_md = in_m[:, None] & in_d[None, :]
    k_base = k_ptr + b * k_b + hkv * k_h
    v_base = v_ptr + b * v_b + hkv * v_h
    row = bh * Lq + offs_m
    if USE_TMA:
        q = _tile_desc(q_ptr + b * q_b + h * q_h, Lq, D, q_m, BLOCK_M, BLOCK_D).load([start_m, 0])
        do = _tile_desc(do_ptr + b * do_b + h * do_h, Lq, D, do_m, BLOCK_M, BLOCK_D).load(
            [start_m, 0])
        o = _tile_desc(o_ptr + bh * Lq * D, Lq, D, D, BLOCK_M, BLOCK_D).load([start_m, 0])
        k_desc = _tile_desc(k_base, Lk, D, k_n, BLOCK_N, BLOCK_D)
        v_desc = _tile_desc(v_base, Lk, D, v_n, BLOCK_N, BLOCK_D)
    else:
        q = tl.load(q_ptr + b * q_b + h * q_h + offs_m[:, None] * q_m + offs_d[None, :],
                    mask=mask_md, other=0.0)
        do = tl.load(do_ptr + b * do_b + h * do_h + offs_m[:, None] * do_m + offs_d[None, :],
                     mask=mask_md, other=0.0)
        o = tl.load(o_ptr + row[:, None] * D + offs_d[None, :], mask=mask_md, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + row, delta, mask=in_m)
    lse = tl.load(lse_ptr + row, mask=in_m, other=float("inf"))
    keep_thr = tl.cast(dropout_keep_thr, tl.int64)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, _key_end(start_m, Lq, Lk, IS_CAUSAL, BLOCK_M), BLOCK_N):
        if USE_TMA:
            kt = k_desc.load([start_n, 0]).T
            vt = v_desc.load([start_n, 0]).T
        else:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            in_n = offs_n < Lk
            kt = tl.load(k_base + offs_n[None, :] * k_n + offs_d[:, None],
                         mask=in_n[None, :] & in_d[:, None], other=0.0)
            vt = tl.load(v_base + offs_n[None, :] * v_n + offs_d[:, None],
                         mask=in_n[None, :] & in_d[:, None], other=0.0)
        _, ds = _bwd_tile(q, do, kt, vt, lse, delta, offs_m, start_n, b, h, H, Lq, Lk,
                          qk_scale, keep_ptr, keep_b, keep_h, keep_m, kpm_ptr, kpm_b,
                          am_ptr, am_b, am_h, am_m, am_n, seed_lo, seed_hi, step, stream,
                          keep_thr, dropout_scale, HAS_KEEP, HAS_KPM, MASK_KIND,
                          HAS_DROPOUT, IS_CAUSAL, DOT_PRECISION, BLOCK_M, BLOCK_N)
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)
    dq = (dq * sm_scale).to(dq_ptr.dtype.element_ty)
    if USE_TMA:
        _tile_desc(dq_ptr + bh * Lq * D, Lq, D, D, BLOCK_M, BLOCK_D).store([start_m, 0], dq)
    else:
        tl.store(dq_ptr + row[:, None] * D + offs_d[None, :], dq, mask=mask_md)


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



def _dropout_args(dropout_p, seed, step, stream):
    keep_thr = int((1.0 - dropout_p) * 4294967296.0)
    scale = 1.0 / (1.0 - dropout_p) if dropout_p > 0.0 else 1.0
    return (seed & 0xFFFFFFFF, seed >> 32, step, stream, keep_thr, scale)


def _common(q, k):
    """(batch, heads, kv heads, lq, lk, d, BLOCK_D, dot precision)."""
    batch, heads, lq, d = q.shape
    kv_heads, lk = k.shape[1], k.shape[2]
    block_d = max(16, next_power_of_2(d))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    return batch, heads, kv_heads, lq, lk, d, block_d, precision


def masked_attention_forward(q, k, v, masks: MaskArgs, scale: float, dropout_p: float,
                             seed: int, step: int, stream: int, is_causal: bool = False):
    """(O [B,H,Lq,D] contiguous in q's dtype, lse fp32 [B,H,Lq] base 2). k, v [B,Hkv,Lk,D]."""
    batch, heads, kv_heads, lq, lk, d, block_d, precision = _common(q, k)
    device = q.device
    out = torch.empty(batch, heads, lq, d, dtype=q.dtype, device=device)
    lse = torch.empty(batch, heads, lq, dtype=torch.float32, device=device)
    tma = tma_ok(q, k, v)
    if tma:
        _ensure_allocator(device)
    grid = lambda meta: (cdiv(lq, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    masked_attention_fwd_kernel[grid](
        q, k, v, out, lse, *masks.args,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        heads, lq, lk, d, heads // kv_heads, next_power_of_2(max(lq, lk)), tma,
        scale * _LOG2E,
        *_dropout_args(dropout_p, seed, step, stream),
        **masks.flags, HAS_DROPOUT=dropout_p > 0.0, IS_CAUSAL=is_causal, BLOCK_D=block_d,
        DOT_PRECISION=precision)
    return out, lse


def masked_attention_backward(do, q, k, v, out, lse, masks: MaskArgs, scale: float,
                              dropout_p: float, seed: int, step: int, stream: int,
                              is_causal: bool = False):
    """(dq [B,H,Lq,D], dk, dv [B,Hkv,Lk,D]), contiguous, in q's dtype. `do` needs last
    stride 1."""
    batch, heads, kv_heads, lq, lk, d, block_d, precision = _common(q, k)
    device, dtype = q.device, q.dtype
    delta = torch.empty_like(lse)
    dq = torch.empty(batch, heads, lq, d, dtype=dtype, device=device)
    dk = torch.empty(batch, kv_heads, lk, d, dtype=dtype, device=device)
    dv = torch.empty(batch, kv_heads, lk, d, dtype=dtype, device=device)
    tma = tma_ok(q, k, v, do)
    if tma:
        _ensure_allocator(device)
    common = (*masks.args, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
              *do.stride()[:3], heads, lq, lk, d, heads // kv_heads,
              next_power_of_2(max(lq, lk)), tma, scale * _LOG2E, scale,
              *_dropout_args(dropout_p, seed, step, stream))
    flags = dict(**masks.flags, HAS_DROPOUT=dropout_p > 0.0, IS_CAUSAL=is_causal,
                 BLOCK_D=block_d, DOT_PRECISION=precision)
    grid_q = lambda meta: (cdiv(lq, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    # dQ first: it writes delta, which dK/dV reads
    masked_attention_bwd_dq_kernel[grid_q](q, k, v, do, out, lse, delta, dq, *common, **flags)
    grid_kv = lambda meta: (cdiv(lk, meta["BLOCK_N"]), batch * kv_heads)  # noqa: E731
    masked_attention_bwd_dkdv_kernel[grid_kv](q, k, v, do, lse, delta, dk, dv, *common, **flags)
    return dq, dk, dv
