"""Flash-attention-style attention reading the AD-DROP bit mask, forward and backward, in Triton.

  S = scale·Q·Kᵀ (+ additive mask), S = −inf where not allowed
  allowed[b,h,i,j] = bit j of keep[b,h,i] AND key padding[b,j] AND bool mask[b,h,i,j]
                     (AND j <= i + Lk − Lq when IS_CAUSAL: bottom-right aligned)
  P = softmax_j(S) (a row with nothing allowed gives P = 0, O = 0, zero gradients)
  O = (P ⊙ Z / (1 − dropout_p))·V,  Z = philox_word(seed, index, step, stream) <
      floor((1 − dropout_p)·2^32), index = b·H·Lq·Lk + h·Lq·Lk + i·Lk + j (when dropout_p > 0)
Online softmax in base 2, exp2 only: the scale·log2 e of the scores is folded into the
exponent, exp2(s·qk_scale − m) with m in base-2 units, one FMA per score (scaled after the
max for m; an additive mask's tile is scaled once with the mask added); saved
state: O and the row logsumexp (base 2, +inf on empty rows; one fp32 [2,B,H,Lq] buffer whose
second half takes backward's delta); Z is regenerated in backward,
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
Backward launches dQ (with delta) before dK/dV. Host side: a LaunchPlan holds what a geometry
fixes (shapes, grids, the non-pointer arguments in kernel order), so a call adds only pointers,
TMA_OK and the Philox words, and the backward reuses the forward's plan.
"""
import os

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from .addrop_mask import mask_element_index, visible_key_end
from .philox import philox_word
from .utils import cdiv, next_power_of_2

LOG2E = tl.constexpr(1.4426950408889634)
_LOG2E = 1.4426950408889634  # the host's copy
# qk_scale's floor, the smallest normal fp32: the kernels multiply masked (−inf) scores by it,
# which must stay −inf (0 would give NaN). A smaller scale·log2 e, scale = 0 included, means
# equal weights for all allowed keys, and so does this one: every s·2^-126 rounds to the row
# max within exp2's precision (|s| < 2^100).
_MIN_QK_SCALE = 2.0 ** -126
MASK_NONE = tl.constexpr(0)
MASK_BOOL = tl.constexpr(1)
MASK_ADDITIVE = tl.constexpr(2)
# the host's copies (plain ints)
_NO_MASK, _BOOL_MASK, _ADDITIVE_MASK = MASK_NONE.value, MASK_BOOL.value, MASK_ADDITIVE.value


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
def _masked_scores(s, qk_scale, offs_m, start_n, b, h, Lq, Lk,
                   keep_ptr, keep_b, keep_h, keep_m,
                   kpm_ptr, kpm_b,
                   am_ptr, am_b, am_h, am_m, am_n,
                   HAS_KEEP: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr,
                   IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The dot products s = Q·Kᵀ of keys start_n .. start_n + BLOCK_N − 1, −inf where not
    allowed, still unscaled (the caller folds qk_scale into the exponent: _exp2_minus); with
    an additive mask, scaled here to base-2 units with the mask added (one FMA)."""
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
            s = tl.fma(s, qk_scale, tl.load(am_ptrs, mask=allowed, other=0.0).to(tl.float32)
                       * LOG2E)
    return tl.where(allowed, s, float("-inf"))


@triton.jit
def _row_max(s, qk_scale, MASK_KIND: tl.constexpr):
    """Row maxima of _masked_scores' s in base-2 units: scaled after the max (qk_scale > 0, so
    the max commutes with it and −inf stays −inf)."""
    m = tl.max(s, axis=1)
    if MASK_KIND != MASK_ADDITIVE:
        m = m * qk_scale
    return m


@triton.jit
def _exp2_minus(s, m, qk_scale, MASK_KIND: tl.constexpr):
    """exp2(scores in base-2 units − m[:, None]) of _masked_scores' s: the scale folded into
    the subtraction, one FMA and one exp2 per element (as FlashAttention does)."""
    if MASK_KIND == MASK_ADDITIVE:
        return tl.math.exp2(s - m[:, None])
    return tl.math.exp2(tl.fma(s, qk_scale, -m[:, None]))


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
    TMA box (<= 256 elements)."""
    ptrs = 0
    for t in tensors:
        ptrs |= t.data_ptr()
    return int(_tma_layout_ok(tensors) and not ptrs & 15)


def _tma_layout_ok(tensors) -> bool:
    """tma_ok's conditions on shapes and strides (a launch plan's fact). Bitwise ORs: every
    value is a multiple of a power of two iff their OR is."""
    d = tensors[0].shape[-1]
    strides = d
    for t in tensors:
        st = t.stride()
        if st[2] < d:
            return False
        strides |= st[0] | st[1] | st[2]
    return d <= 256 and not strides & (16 // tensors[0].element_size() - 1)


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Descriptors built on the device live in a global scratch buffer that Triton takes from
    the allocator set with triton.set_allocator; install a torch one if the caller set none
    (without one, a TMA config could not launch on a GPU)."""
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
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
    # the order is the launcher's: pointers, then what a launch plan fixes, then what each
    # call brings (TMA_OK, the Philox words), then the plan's constexprs, then the tuned ones
    q_ptr, k_ptr, v_ptr,  # q [B,H,Lq,D], k/v [B,Hkv,Lk,D], last stride 1
    o_ptr,  # [B,H,Lq,D] output, contiguous
    lse_ptr,  # fp32 [2,B,H,Lq]: writes [0], the base-2 logsumexp ([1] is backward's delta)
    keep_ptr,  # int32 bits [B,H,Lq,W] (HAS_KEEP)
    kpm_ptr,  # bool [B,Lk] key padding, True = attend (HAS_KPM)
    am_ptr,  # 4-D mask broadcast to [B,H,Lq,Lk] by strides (MASK_KIND)
    keep_b, keep_h, keep_m, kpm_b, am_b, am_h, am_m, am_n,  # strides of the masks
    q_b, q_h, q_m, k_b, k_h, k_n, v_b, v_h, v_n,  # strides of q, k, v
    H, Lq, Lk, D,  # query heads, query/key lengths, head dim
    GROUP,  # query heads per kv head
    LEN_BUCKET,  # next power of two of max(Lq, Lk): the autotuning key only
    qk_scale,  # max(scale * log2(e), 2^-126)
    dropout_keep_thr,  # floor((1 - dropout_p) * 2^32)
    dropout_scale,  # 1 / (1 - dropout_p)
    TMA_OK,  # 1 when q, k, v (and dO) suit tensor descriptors (tma_ok): tuning key, pruning
    seed_lo, seed_hi, step, stream,  # attention-dropout Philox key halves and counter words
    HAS_KEEP: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    for start_n in range(0, visible_key_end(start_m, Lq, Lk, IS_CAUSAL, BLOCK_M), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_n = offs_n < Lk
        if USE_TMA:
            kt = k_desc.load([start_n, 0]).T
        else:
            kt = tl.load(k_base + offs_n[None, :] * k_n + offs_d[:, None],
                         mask=in_n[None, :] & in_d[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION)
        s = _masked_scores(s, qk_scale, offs_m, start_n, b, h, Lq, Lk, keep_ptr, keep_b,
                           keep_h, keep_m, kpm_ptr, kpm_b, am_ptr, am_b, am_h, am_m, am_n,
                           HAS_KEEP, HAS_KPM, MASK_KIND, IS_CAUSAL, BLOCK_M, BLOCK_N)
        m_new = tl.maximum(m_i, _row_max(s, qk_scale, MASK_KIND))
        # rows with nothing allowed yet: subtract 0 so exp2 gives 0, not NaN from −inf − −inf
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = _exp2_minus(s, m_safe, qk_scale, MASK_KIND)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if HAS_DROPOUT:
            z = _dropout_keep(b, h, H, Lq, Lk, offs_m, offs_n, seed_lo, seed_hi, step, stream,
                              keep_thr)
            p = tl.where(z, p, 0.0)  # 1/(1 − dropout_p) once per output row, at the end
        if USE_TMA:
            v = v_desc.load([start_n, 0])
        else:
            v = tl.load(v_base + offs_n[:, None] * v_n + offs_d[None, :],
                        mask=in_n[:, None] & in_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    has_any = l_i > 0.0
    out = acc * (dropout_scale / tl.where(has_any, l_i, 1.0))[:, None]
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
    """(P ⊙ Z, dS) of one [BLOCK_M, BLOCK_N] tile, recomputed from Q, K, lse (dV's factor
    1/(1−dropout_p) is left to the caller: once per output element, not per score)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION)
    s = _masked_scores(s, qk_scale, offs_m, start_n, b, h, Lq, Lk, keep_ptr, keep_b, keep_h,
                       keep_m, kpm_ptr, kpm_b, am_ptr, am_b, am_h, am_m, am_n,
                       HAS_KEEP, HAS_KPM, MASK_KIND, IS_CAUSAL, BLOCK_M, BLOCK_N)
    p = _exp2_minus(s, lse, qk_scale, MASK_KIND)
    dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        z = _dropout_keep(b, h, H, Lq, Lk, offs_m, offs_n, seed_lo, seed_hi, step, stream,
                          keep_thr)
        p_drop = tl.where(z, p, 0.0)
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
    lse_ptr,  # fp32 [2,B,H,Lq]: the logsumexp, then delta (from the dQ kernel)
    dk_ptr, dv_ptr,  # [B,Hkv,Lk,D] outputs, contiguous
    keep_ptr, kpm_ptr, am_ptr,
    keep_b, keep_h, keep_m, kpm_b, am_b, am_h, am_m, am_n,
    q_b, q_h, q_m, k_b, k_h, k_n, v_b, v_h, v_n, do_b, do_h, do_m,
    H, Lq, Lk, D,
    GROUP,  # query heads per kv head: this program sums over heads hkv·GROUP .. + GROUP − 1
    LEN_BUCKET,  # next power of two of max(Lq, Lk): the autotuning key only
    qk_scale, sm_scale,  # max(scale * log2(e), 2^-126), scale
    dropout_keep_thr, dropout_scale,
    TMA_OK,  # 1 when q, k, v (and dO) suit tensor descriptors (tma_ok): tuning key, pruning
    seed_lo, seed_hi, step, stream,
    HAS_KEEP: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,  # tiles of q, k, v, dO and the gradients through tensor descriptors
):
    pid_n = tl.program_id(0)
    bhkv = tl.program_id(1).to(tl.int64)
    hkv_count = H // GROUP
    # delta follows the B·H·Lq logsumexps in one buffer (B·Hkv programs · GROUP = B·H)
    delta_ptr = lse_ptr + tl.num_programs(1).to(tl.int64) * GROUP * Lq
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
    if HAS_DROPOUT:
        dv = dv * dropout_scale
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
    lse_ptr,  # fp32 [2,B,H,Lq]: the logsumexp, then delta = rowsum(dO ⊙ O), written here
    dq_ptr,  # [B,H,Lq,D] output, contiguous
    keep_ptr, kpm_ptr, am_ptr,
    keep_b, keep_h, keep_m, kpm_b, am_b, am_h, am_m, am_n,
    q_b, q_h, q_m, k_b, k_h, k_n, v_b, v_h, v_n, do_b, do_h, do_m,
    H, Lq, Lk, D,
    GROUP,  # query heads per kv head
    LEN_BUCKET,  # next power of two of max(Lq, Lk): the autotuning key only
    qk_scale, sm_scale,
    dropout_keep_thr, dropout_scale,
    TMA_OK,  # 1 when q, k, v (and dO) suit tensor descriptors (tma_ok): tuning key, pruning
    seed_lo, seed_hi, step, stream,
    HAS_KEEP: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    delta_ptr = lse_ptr + tl.num_programs(1).to(tl.int64) * Lq  # after the B·H·Lq logsumexps
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
    for start_n in range(0, visible_key_end(start_m, Lq, Lk, IS_CAUSAL, BLOCK_M), BLOCK_N):
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
    """The masks as the kernels take them: keep bits, key padding, 4-D bool/additive mask.

    keep_words: int32 [B,H,Lq,W] or None; kpm: bool [B,Lk] or None; am: bool or float tensor
    broadcast (by strides) to [B,H,Lq,Lk], or None; dummy: any tensor, the pointer passed for
    an absent mask (never read). `tensors` are the ones to save for backward, `ptrs` the
    launch's pointer arguments, `layout` what a launch plan needs to know of them."""

    __slots__ = ("tensors", "ptrs", "kind", "am_strides")

    def __init__(self, keep_words, kpm, am, dummy):
        if keep_words is not None:
            keep_words = keep_words.contiguous()
        if kpm is not None:
            kpm = kpm.contiguous()  # read as bool (Triton *u1, byte loads): no uint8 view
        self.kind, self.am_strides = _NO_MASK, None
        if am is not None:
            self.kind, self.am_strides = _ADDITIVE_MASK, am.stride()
            if am.dtype == torch.bool:
                self.kind, am = _BOOL_MASK, am.view(torch.uint8)
        self.tensors = (keep_words, kpm, am)
        self.ptrs = (dummy if keep_words is None else keep_words, dummy if kpm is None else kpm,
                     dummy if am is None else am)

    @property
    def layout(self) -> tuple:
        """(has keep bits, has key padding, MASK_KIND, the 4-D mask's strides or None)."""
        return (self.tensors[0] is not None, self.tensors[1] is not None, self.kind,
                self.am_strides)


class LaunchPlan:
    """What one geometry fixes of the forward and the two backward launches: output shapes,
    grids, and every argument that is not a pointer, a Philox word or TMA_OK, in kernel order.

    One per (shapes, strides, dtype, device, mask layout, scale, dropout_p, is_causal): a
    caller may keep it for later calls with the same ones (addrop.attention does). q, k, v
    have last stride 1 and v has k's shape; the keep words and key padding are contiguous
    (MaskArgs), so their strides follow from the shapes (a size-1 dim's stride is unused)."""

    __slots__ = ("device", "cuda", "dtype", "out_shape", "kv_shape", "stats_shape", "q_dense",
                 "k_dense", "tma_layout", "fwd_args", "bwd_head", "bwd_tail", "bwd_args",
                 "flags", "fwd_grid", "dkdv_grid")

    def __init__(self, q, k, v, layout, scale: float, dropout_p: float, is_causal: bool):
        batch, heads, lq, d = q.shape
        kv_heads, lk = k.shape[1], k.shape[2]
        has_keep, has_kpm, kind, am_strides = layout
        words = cdiv(lk, 32)
        mask_strides = (((heads * lq * words, lq * words, words) if has_keep else (0, 0, 0))
                        + (lk if has_kpm else 0,) + (am_strides or (0, 0, 0, 0)))
        strides = mask_strides + q.stride()[:3] + k.stride()[:3] + v.stride()[:3]
        sizes = (heads, lq, lk, d, heads // kv_heads, next_power_of_2(max(lq, lk)))
        keep_thr = int((1.0 - dropout_p) * 4294967296.0)
        dropout_scale = 1.0 / (1.0 - dropout_p) if dropout_p > 0.0 else 1.0
        self.device, self.dtype = q.device, q.dtype
        self.cuda = q.device.type == "cuda"
        self.out_shape = (batch, heads, lq, d)
        self.kv_shape = (batch, kv_heads, lk, d)
        self.stats_shape = (2, batch, heads, lq)
        # outputs shaped like a contiguous q or k come from empty_like (cheaper on the host)
        self.q_dense, self.k_dense = q.is_contiguous(), k.is_contiguous()
        self.tma_layout = _tma_layout_ok((q, k, v))
        qk_scale = max(scale * _LOG2E, _MIN_QK_SCALE)
        self.fwd_args = strides + sizes + (qk_scale, keep_thr, dropout_scale)
        # a contiguous dO (the usual gradient) has the strides of O; another gets its own
        self.bwd_head = strides
        self.bwd_tail = sizes + (qk_scale, scale, keep_thr, dropout_scale)
        self.bwd_args = strides + (heads * lq * d, lq * d, d) + self.bwd_tail
        self.flags = (has_keep, has_kpm, kind, dropout_p > 0.0, is_causal,
                      max(16, next_power_of_2(d)),
                      "ieee" if q.dtype == torch.float32 else "tf32")
        self.fwd_grid = lambda meta: (cdiv(lq, meta["BLOCK_M"]), batch * heads)
        self.dkdv_grid = lambda meta: (cdiv(lk, meta["BLOCK_N"]), batch * kv_heads)

    def forward(self, q, k, v, mask_ptrs, philox):
        """(O [B,H,Lq,D] contiguous in q's dtype, stats fp32 [2,B,H,Lq]: [0] the base-2
        logsumexp, [1] room for backward's delta (one allocation rather than two)); philox:
        the dropout's (seed_lo, seed_hi, step, stream)."""
        out = (torch.empty_like(q) if self.q_dense
               else torch.empty(*self.out_shape, dtype=self.dtype, device=self.device))
        lse = torch.empty(*self.stats_shape, dtype=torch.float32, device=self.device)
        tma = int(self.tma_layout and not (q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15)
        if tma and self.cuda:
            _ensure_allocator()
        # .run(grid=...) is what kernel[grid](...) calls, without the per-call lambda
        masked_attention_fwd_kernel.run(q, k, v, out, lse, *mask_ptrs, *self.fwd_args, tma,
                                        *philox, *self.flags, grid=self.fwd_grid, warmup=False)
        return out, lse

    def backward(self, do, q, k, v, out, lse, mask_ptrs, philox):
        """(dq [B,H,Lq,D], dk, dv [B,Hkv,Lk,D]), contiguous, in q's dtype; out, lse: the
        forward's (its lse buffer takes delta)."""
        if do.is_contiguous():
            args = self.bwd_args
            tma = int(self.tma_layout and not (q.data_ptr() | k.data_ptr() | v.data_ptr()
                                               | do.data_ptr()) & 15)
        else:
            if do.stride(-1) != 1:
                do = do.contiguous()
            args = self.bwd_head + do.stride()[:3] + self.bwd_tail
            tma = tma_ok(q, k, v, do)
        if tma and self.cuda:
            _ensure_allocator()
        dq = torch.empty_like(out)
        dk = (torch.empty_like(k) if self.k_dense
              else torch.empty(*self.kv_shape, dtype=self.dtype, device=self.device))
        dv = torch.empty_like(dk)
        tail = (*mask_ptrs, *args, tma, *philox, *self.flags)  # the two launches share it
        # dQ first: it writes delta, which dK/dV reads
        masked_attention_bwd_dq_kernel.run(q, k, v, do, out, lse, dq, *tail, grid=self.fwd_grid,
                                           warmup=False)
        masked_attention_bwd_dkdv_kernel.run(q, k, v, do, lse, dk, dv, *tail,
                                             grid=self.dkdv_grid, warmup=False)
        return dq, dk, dv


def _launch(q, k, v, masks: MaskArgs, scale: float, dropout_p: float, is_causal: bool):
    """(q, k, v with last stride 1, their LaunchPlan)."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return q, k, v, LaunchPlan(q, k, v, masks.layout, scale, dropout_p, is_causal)


def philox_words(seed: int, step: int, stream: int) -> tuple:
    """The attention dropout's Philox arguments: key halves of the 64-bit seed, counter words."""
    return seed & 0xFFFFFFFF, seed >> 32, step, stream


def masked_attention_forward(q, k, v, masks: MaskArgs, scale: float, dropout_p: float,
                             seed: int, step: int, stream: int, is_causal: bool = False):
    """(O [B,H,Lq,D] contiguous in q's dtype, stats fp32 [2,B,H,Lq]: the base-2 logsumexp
    and room for backward's delta). k, v [B,Hkv,Lk,D]."""
    q, k, v, launch = _launch(q, k, v, masks, scale, dropout_p, is_causal)
    return launch.forward(q, k, v, masks.ptrs, philox_words(seed, step, stream))


def masked_attention_backward(do, q, k, v, out, lse, masks: MaskArgs, scale: float,
                              dropout_p: float, seed: int, step: int, stream: int,
                              is_causal: bool = False):
    """(dq [B,H,Lq,D], dk, dv [B,Hkv,Lk,D]), contiguous, in q's dtype; q, k, v as the forward
    had them, out and lse (stats) as it returned them."""
    q, k, v, launch = _launch(q, k, v, masks, scale, dropout_p, is_causal)
    return launch.backward(do, q, k, v, out, lse, masks.ptrs, philox_words(seed, step, stream))
