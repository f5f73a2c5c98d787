"""Fused masked AdamW step in Triton (ChildTuning-F/-D, sparse masks), one launch per tensor.

Math: regdrop_fast/reference/masked_adamw.py. Per element: keep bit k from the Philox contract
(KIND=1: word(seed, offset+i, step, stream) < threshold, scale 1/p), from bit (offset+i) of
flat int32 words (KIND=2) or 1 (KIND=0); then the Adam moments and the parameter update in
fp32 for fp32/bf16/fp16 parameters; m and v are fp32.
Memory per element: read p, g, m, v, write p, m, v (28 B for fp32 params; 16 B of p/g + 16 B of
state for bf16), plus 1/8 B of mask for KIND=2 and nothing for KIND=1.
Grid: (cdiv(numel, BLOCK),) per tensor; offsets are int64 so tensors past 2^31 elements work.
"""
import triton
import triton.language as tl

from .philox import philox_word

BLOCK = 1024


@triton.jit
def masked_adamw_kernel(
    p_ptr,  # params, contiguous, fp32/bf16/fp16 (updated in place)
    g_ptr,  # grads, same dtype as params
    m_ptr,  # fp32 exp_avg (in place)
    v_ptr,  # fp32 exp_avg_sq (in place)
    words_ptr,  # int32 flat mask words (KIND == 2), else any tensor
    n,  # elements of this tensor
    offset,  # global flat index of local element 0 (Philox index and mask bit)
    seed_lo, seed_hi,  # Philox key
    step, stream,  # Philox counter words 2 and 3
    threshold,  # int64 floor(reserve_p * 2^32)
    scale,  # 1/reserve_p for KIND == 1
    beta1, beta2,
    one_minus_beta1, one_minus_beta2,  # rounded from float64 on the host
    eps,
    lr_wd,  # lr * weight_decay
    decay,  # 1 - lr * weight_decay, rounded from float64
    step_size,  # paper: lr*sqrt(bc2)/bc1, torch: lr/bc1
    bc2_sqrt,  # torch: sqrt(bc2)
    KIND: tl.constexpr,  # 0 none, 1 Philox, 2 bits
    ACTION: tl.constexpr,  # 0 drop grad, 1 drop update, 2 prune
    PAPER: tl.constexpr,  # official ChildTuning/HF order, else torch.optim.AdamW's
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    p = tl.load(p_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=valid, other=0.0)
    v = tl.load(v_ptr + offs, mask=valid, other=0.0)
    gidx = offs + offset
    if KIND == 1:
        word = philox_word(seed_lo, seed_hi, gidx, step, stream)
        keep = word.to(tl.int64) < threshold
        factor = tl.where(keep, scale, 0.0)
    elif KIND == 2:
        w = tl.load(words_ptr + (gidx >> 5), mask=valid, other=0)
        keep = ((w >> (gidx & 31).to(tl.int32)) & 1) != 0
        factor = tl.where(keep, 1.0, 0.0)
    else:
        keep = offs >= 0
        factor = tl.full([BLOCK], 1.0, tl.float32)
    if ACTION == 0:
        g = g * factor
    m1 = beta1 * m + one_minus_beta1 * g
    v1 = beta2 * v + one_minus_beta2 * g * g
    if PAPER:
        p1 = p - step_size * (m1 / (tl.sqrt(v1) + eps))
        p1 = p1 - lr_wd * p1
    else:
        p1 = p * decay - step_size * (m1 / (tl.sqrt(v1) / bc2_sqrt + eps))
    if ACTION == 1:
        p1 = p + factor * (p1 - p)
    if ACTION == 2:
        p1 = tl.where(keep, p1, 0.0)
        m1 = tl.where(keep, m1, m)
        v1 = tl.where(keep, v1, v)
    tl.store(p_ptr + offs, p1.to(p_ptr.dtype.element_ty), mask=valid)
    tl.store(m_ptr + offs, m1, mask=valid)
    tl.store(v_ptr + offs, v1, mask=valid)


def masked_adamw_step(params, grads, exp_avgs, exp_avg_sqs, *, masks, mask_kinds, steps,
                      index_offsets, streams, step_sizes, bc2_sqrts, beta1, beta2, eps, lr_wd,
                      seed, threshold, inv_p, action, paper):
    """Launcher: one kernel per tensor; all tensors contiguous on one device."""
    for i, p in enumerate(params):
        n = p.numel()
        if n == 0:
            continue
        kind = mask_kinds[i]
        words = masks[i] if kind == 2 else p
        grid = (triton.cdiv(n, BLOCK),)
        masked_adamw_kernel[grid](
            p, grads[i], exp_avgs[i], exp_avg_sqs[i], words, n, index_offsets[i],
            seed & 0xFFFFFFFF, seed >> 32, steps[i], streams[i], threshold, inv_p,
            beta1, beta2, 1.0 - beta1, 1.0 - beta2, eps, lr_wd, 1.0 - lr_wd, step_sizes[i],
            bc2_sqrts[i],
            KIND=kind, ACTION=action, PAPER=paper, BLOCK=BLOCK, num_warps=4)

