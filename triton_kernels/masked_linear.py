"""Fused masked linear: y = x · (W ⊙ M)ᵀ + b with M built inside the GEMM tiles.

M is either a bit-packed mask (int32 words [N, ceil(K/32)], bit j of word w = column 32w+j,
1 = keep) or M = (scores > φ) with φ read from a 1-element fp32 tensor (no host sync). W ⊙ M
never exists in memory: each program loads its [BLOCK_N, BLOCK_K] tile of W and of the mask
source and zeroes the pruned entries in registers before tl.dot (fp32 accumulation).

Kernels (x: [M, K], W: [N, K], dy: [M, N]; all three GEMMs are 2·M·N·K flops):
  forward   y[M, N]  = x · (W⊙M)ᵀ + b      grid cdiv(M, BM)·cdiv(N, BN), grouped by GROUP_M
  backward  dx[M, K] = dy · (W⊙M)          grid cdiv(M, BM)·cdiv(K, BK)
  backward  G[N, K]  = dyᵀ · x, then in the epilogue dScore = G ⊙ W (straight-through
            estimator) and/or dW = G ⊙ M   grid cdiv(N, BN)·cdiv(K, BK)
Extra traffic over a plain GEMM per weight element and pass: 1/8 B (packed bits) or 4 B
(fp32 scores) read, instead of writing and re-reading a W⊙M copy (2·sizeof(W) + mask).
fp32 inputs use IEEE fp32 dot products unless torch.backends.cuda.matmul.allow_tf32 is set
(torch's own rule for F.linear); bf16/fp16 tiles go to tl.dot as they are.

Reached only by name (`masked_linear(..., backend="triton")`): one H200 run measured it at
0.20-0.87x of F.linear(x, W*M), so the default is W ⊙ M written once + cuBLAS
(mask_training.py) until a GPU comparison at full size says otherwise (issue 18).
"""
import functools

import torch
import triton
import triton.language as tl

from .mask_training import keep_tile as _keep_tile, mask_args
from .utils import cdiv

_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                  num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [(128, 128, 32, 4, 4), (128, 128, 64, 8, 3), (128, 64, 32, 4, 4),
                             (64, 128, 32, 4, 4), (64, 64, 32, 4, 4), (64, 64, 64, 4, 3)]
]
# the interpreter runs one numpy step per program: one small config, no autotuning
_INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


@triton.jit
def _grouped_pids(pid, rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                  GROUP: tl.constexpr):
    # GROUP row blocks share their column blocks while those are hot in L2
    n_r = tl.cdiv(rows, BLOCK_R)
    n_c = tl.cdiv(cols, BLOCK_C)
    per_group = GROUP * n_c
    first_r = (pid // per_group) * GROUP
    size = tl.minimum(n_r - first_r, GROUP)
    pid_r = first_r + (pid % per_group) % size
    pid_c = (pid % per_group) // size
    return pid_r, pid_c


@triton.jit
def masked_linear_fwd_kernel(
    x_ptr,  # [M, K], row stride stride_xm, unit column stride
    w_ptr,  # [N, K], row stride stride_wn
    b_ptr,  # [N] bias (unused unless HAS_BIAS)
    words_ptr,  # int32 [N, ceil(K/32)] packed mask
    scores_ptr,  # [N, K] scores
    phi_ptr,  # fp32 [1] threshold (a placeholder when the mask is packed)
    y_ptr,  # [M, N] output, row stride stride_ym
    M, N, K,
    stride_xm, stride_wn, stride_words_n, stride_scores_n, stride_ym,
    HAS_BIAS: tl.constexpr,
    FROM_SCORES: tl.constexpr,  # mask from scores > phi, else from packed bits
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_pids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    phi = tl.load(phi_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w_valid = (rn[:, None] < N) & (rk[None, :] < K)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=w_valid, other=0.0)
        keep = _keep_tile(words_ptr, scores_ptr, phi, rn, rk, w_valid, stride_words_n,
                          stride_scores_n, FROM_SCORES)
        w = tl.where(keep, w, tl.zeros_like(w))
        acc = tl.dot(x, tl.trans(w), acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def masked_linear_bwd_input_kernel(
    dy_ptr,  # [M, N], row stride stride_dym
    w_ptr,  # [N, K]
    words_ptr, scores_ptr, phi_ptr,  # mask source, as in the forward
    dx_ptr,  # [M, K] output, row stride stride_dxm
    M, N, K,
    stride_dym, stride_wn, stride_words_n, stride_scores_n, stride_dxm,
    FROM_SCORES: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_k = _grouped_pids(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    phi = tl.load(phi_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :],
                     mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        w_valid = (rn[:, None] < N) & (rk[None, :] < K)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=w_valid, other=0.0)
        keep = _keep_tile(words_ptr, scores_ptr, phi, rn, rk, w_valid, stride_words_n,
                          stride_scores_n, FROM_SCORES)
        w = tl.where(keep, w, tl.zeros_like(w))
        acc = tl.dot(dy, w, acc, input_precision=INPUT_PRECISION)
    tl.store(dx_ptr + rm[:, None] * stride_dxm + rk[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rk[None, :] < K))


@triton.jit
def masked_linear_bwd_weight_kernel(
    dy_ptr,  # [M, N]
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]
    words_ptr, scores_ptr, phi_ptr,  # mask source, as in the forward
    dscore_ptr,  # [N, K] dScore = G ⊙ W (unused unless WANT_DSCORE), contiguous
    dw_ptr,  # [N, K] dW = G ⊙ M (unused unless WANT_DW), contiguous
    M, N, K,
    stride_dym, stride_xm, stride_wn, stride_words_n, stride_scores_n,
    FROM_SCORES: tl.constexpr,
    WANT_DSCORE: tl.constexpr,
    WANT_DW: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_n, pid_k = _grouped_pids(tl.program_id(0), N, K, BLOCK_N, BLOCK_K, GROUP_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :],
                     mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        acc = tl.dot(tl.trans(dy), x, acc, input_precision=INPUT_PRECISION)
    valid = (rn[:, None] < N) & (rk[None, :] < K)
    out_offs = rn[:, None] * K + rk[None, :]
    if WANT_DSCORE:
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=valid,
                    other=0.0).to(tl.float32)
        tl.store(dscore_ptr + out_offs, (acc * w).to(dscore_ptr.dtype.element_ty), mask=valid)
    if WANT_DW:
        phi = tl.load(phi_ptr)
        keep = _keep_tile(words_ptr, scores_ptr, phi, rn, rk, valid, stride_words_n,
                          stride_scores_n, FROM_SCORES)
        tl.store(dw_ptr + out_offs, tl.where(keep, acc, 0.0).to(dw_ptr.dtype.element_ty),
                 mask=valid)


_fwd_tuned = triton.autotune(_GPU_CONFIGS, key=["M", "N", "K", "FROM_SCORES"])(
    masked_linear_fwd_kernel)
_bwd_input_tuned = triton.autotune(_GPU_CONFIGS, key=["M", "N", "K", "FROM_SCORES"])(
    masked_linear_bwd_input_kernel)
_bwd_weight_tuned = triton.autotune(
    _GPU_CONFIGS, key=["M", "N", "K", "FROM_SCORES", "WANT_DSCORE", "WANT_DW"])(
    masked_linear_bwd_weight_kernel)


def _plan(on_gpu, rows, row_block, cols, col_block, **flags):
    """(grid, keyword arguments) of one launch: autotuned on a GPU, one fixed small config
    under the interpreter. The grid covers cdiv(rows, row_block) x cdiv(cols, col_block)
    output tiles (row_block/col_block name the constexprs that tile the output)."""
    if on_gpu:
        def grid(meta):
            return (cdiv(rows, meta[row_block]) * cdiv(cols, meta[col_block]),)
        return grid, flags
    b = _INTERPRETER_BLOCKS
    return (cdiv(rows, b[row_block]) * cdiv(cols, b[col_block]),), {**flags, **b}


# Each launch's plan is a function of these arguments alone: made once per key instead of on
# every call (bounded: one entry per token count and flag set in use).
@functools.lru_cache(maxsize=256)
def _fwd_plan(on_gpu, m, n, has_bias, from_scores, precision):
    return _plan(on_gpu, m, "BLOCK_M", n, "BLOCK_N", HAS_BIAS=has_bias, FROM_SCORES=from_scores,
                 INPUT_PRECISION=precision)


@functools.lru_cache(maxsize=256)
def _bwd_input_plan(on_gpu, m, k, from_scores, precision):
    return _plan(on_gpu, m, "BLOCK_M", k, "BLOCK_K", FROM_SCORES=from_scores,
                 INPUT_PRECISION=precision)


@functools.lru_cache(maxsize=256)
def _bwd_weight_plan(on_gpu, n, k, from_scores, want_dscore, want_dw, precision):
    return _plan(on_gpu, n, "BLOCK_N", k, "BLOCK_K", FROM_SCORES=from_scores,
                 WANT_DSCORE=want_dscore, WANT_DW=want_dw, INPUT_PRECISION=precision)


def _precision(dtype: torch.dtype) -> str:
    # IEEE only matters for fp32 tiles; 16-bit tiles take the default ("tf32" is a no-op there)
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def masked_linear_forward(x2d, weight, bias, words, scores, phi):
    """y [M, N] = x2d [M, K] · (W⊙M)ᵀ + bias; last-dim stride 1 everywhere."""
    m, k = x2d.shape
    n = weight.shape[0]
    device = x2d.device
    y = torch.empty(m, n, dtype=x2d.dtype, device=device)
    if m == 0 or n == 0:
        return y
    words, scores, phi, s_words, s_scores, from_scores = mask_args(words, scores, phi, device)
    on_gpu = not y.is_cpu  # any non-CPU device (meta too: the sm_90 dry run); a flag read
    grid, kwargs = _fwd_plan(on_gpu, m, n, bias is not None, from_scores, _precision(x2d.dtype))
    # .run(grid=, warmup=False) is what kernel[grid](...) calls, without its per-call lambda
    (_fwd_tuned if on_gpu else masked_linear_fwd_kernel).run(
        x2d, weight, weight if bias is None else bias, words, scores, phi, y, m, n, k,
        x2d.stride(0), weight.stride(0), s_words, s_scores, n, grid=grid, warmup=False, **kwargs)
    return y


def masked_linear_backward_input(dy, weight, words, scores, phi):
    """dx [M, K] = dy [M, N] · (W⊙M)."""
    m, n = dy.shape
    k = weight.shape[1]
    device = dy.device
    dx = torch.empty(m, k, dtype=dy.dtype, device=device)
    if m == 0 or k == 0:
        return dx
    if n == 0:
        return dx.zero_()
    words, scores, phi, s_words, s_scores, from_scores = mask_args(words, scores, phi, device)
    on_gpu = not dx.is_cpu
    grid, kwargs = _bwd_input_plan(on_gpu, m, k, from_scores, _precision(dy.dtype))
    (_bwd_input_tuned if on_gpu else masked_linear_bwd_input_kernel).run(
        dy, weight, words, scores, phi, dx, m, n, k, dy.stride(0), weight.stride(0), s_words,
        s_scores, k, grid=grid, warmup=False, **kwargs)
    return dx


def masked_linear_backward_weight(dy, x2d, weight, words, scores, phi, want_dscore, want_dw):
    """(dScore = (dyᵀx) ⊙ W or None, dW = (dyᵀx) ⊙ M or None), both [N, K]."""
    m, n = dy.shape
    k = x2d.shape[1]
    dscore = (torch.empty(n, k, dtype=scores.dtype, device=dy.device) if want_dscore else None)
    dw = torch.empty(n, k, dtype=weight.dtype, device=dy.device) if want_dw else None
    if n == 0 or k == 0 or not (want_dscore or want_dw):
        return dscore, dw
    if m == 0:
        return (None if dscore is None else dscore.zero_()), (None if dw is None else dw.zero_())
    placeholder = dscore if dscore is not None else dw
    device = dy.device
    words, scores, phi, s_words, s_scores, from_scores = mask_args(words, scores, phi, device)
    on_gpu = not dy.is_cpu
    grid, kwargs = _bwd_weight_plan(on_gpu, n, k, from_scores, want_dscore, want_dw,
                                    _precision(dy.dtype))
    (_bwd_weight_tuned if on_gpu else masked_linear_bwd_weight_kernel).run(
        dy, x2d, weight, words, scores, phi, placeholder if dscore is None else dscore,
        placeholder if dw is None else dw, m, n, k, dy.stride(0), x2d.stride(0),
        weight.stride(0), s_words, s_scores, grid=grid, warmup=False, **kwargs)
    return dscore, dw
