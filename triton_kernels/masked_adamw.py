"""Fused masked AdamW step in Triton (ChildTuning-F/-D, sparse masks): one launch per step for
all tensors of one dtype, like the CUDA multi-tensor kernel (csrc/masked_adamw_cuda.cu).

Role: the interpreter-tested description of the CUDA kernel's math (TRITON_INTERPRET=1 runs it
on CPU against the reference, bit for bit), and the GPU path only where the extension has no
CUDA kernels. On an H200 it measured 4-9x slower than the CUDA kernel (0.11-0.23x torch's fused
AdamW), so "auto" dispatch on CUDA tensors takes the CUDA kernel first (backends.OPS).

Math: regdrop_fast/reference/masked_adamw.py. Per element: keep bit k from the Philox contract
(kind 1: word(seed, offset+i, step, stream) < threshold, scale 1/p), from bit (offset+i) of
flat int32 words (kind 2) or 1 (kind 0); then the Adam moments and the parameter update in
fp32 for fp32/bf16/fp16 parameters; m and v are fp32.
Memory per element: read p, g, m, v, write p, m, v (28 B for fp32 params; 16 B of p/g + 16 B of
state for bf16), plus 1/8 B of mask for kind 2 and nothing for kind 1.

Tensor list: a per-step int64 table holds each tensor's addresses (p, g, m, v, mask words),
numel, global offset, Philox step and stream and mask kind, and an fp32 table its step size and
sqrt(bias correction 2); the tensors' own addresses go in as integers and become typed pointers
in the kernel. Grid: one program per CHUNK elements of one tensor (the block map, cached per
list of sizes); offsets are int64, so tensors past 2^31 elements work. One launch replaces one
per tensor: a Python launch costs tens of microseconds, longer than a BERT layer's step.
"""
from typing import Dict, Tuple

import torch
import triton
import triton.language as tl

from .philox import philox_word

BLOCK = 1024  # elements per tile
TILES = 4  # tiles per program: CHUNK elements of one tensor
CHUNK = BLOCK * TILES

# per-tensor tables, one row per tensor:
#   int64: p, g, m, v, mask-word addresses, numel, global offset, Philox step, stream, kind
#   fp32:  step size, sqrt(bias correction 2)
N_INT = 10
N_FLOAT = 2

_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def masked_adamw_multi_kernel(
    int_table,  # int64 [T, N_INT]: see the columns above
    float_table,  # fp32 [T, N_FLOAT]: step size, sqrt(bc2)
    block_tensor,  # int32 [programs]: the tensor of each program
    block_chunk,  # int32 [programs]: its chunk within that tensor
    seed_lo, seed_hi,  # Philox key
    threshold,  # int64 floor(reserve_p * 2^32)
    scale,  # 1/reserve_p for kind 1
    beta1, beta2,
    one_minus_beta1, one_minus_beta2,  # rounded from float64 on the host
    eps,
    lr_wd,  # lr * weight_decay
    decay,  # 1 - lr * weight_decay, rounded from float64
    DTYPE: tl.constexpr,  # parameter and gradient dtype
    ACTION: tl.constexpr,  # 0 drop grad, 1 drop update, 2 prune
    PAPER: tl.constexpr,  # official ChildTuning/HF order, else torch.optim.AdamW's
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
    N_INT: tl.constexpr,  # row lengths of the two tables
    N_FLOAT: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid).to(tl.int64)
    chunk = tl.load(block_chunk + pid).to(tl.int64)
    row = int_table + t * N_INT
    p_ptr = tl.load(row + 0).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    words_ptr = tl.load(row + 4).to(tl.pointer_type(tl.int32))
    n = tl.load(row + 5)
    offset = tl.load(row + 6)
    step = tl.load(row + 7).to(tl.uint32)
    stream = tl.load(row + 8).to(tl.uint32)
    kind = tl.load(row + 9)
    step_size = tl.load(float_table + t * N_FLOAT + 0)
    bc2_sqrt = tl.load(float_table + t * N_FLOAT + 1)
    for tile in tl.static_range(TILES):
        offs = (chunk * TILES + tile) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n
        p = tl.load(p_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=valid, other=0.0)
        v = tl.load(v_ptr + offs, mask=valid, other=0.0)
        gidx = offs + offset
        if kind == 1:
            word = philox_word(seed_lo, seed_hi, gidx, step, stream)
            keep = word.to(tl.int64) < threshold
            factor = tl.where(keep, scale, 0.0)
        elif kind == 2:
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
        tl.store(p_ptr + offs, p1.to(DTYPE), mask=valid)
        tl.store(m_ptr + offs, m1, mask=valid)
        tl.store(v_ptr + offs, v1, mask=valid)


# block maps by (device, sizes): the sizes of a model's tensors repeat every step
_BLOCK_MAPS: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
_MAX_BLOCK_MAPS = 64


def _block_map(numels, device) -> Tuple[torch.Tensor, torch.Tensor]:
    key = (str(device), tuple(numels))
    found = _BLOCK_MAPS.get(key)
    if found is None:
        chunks = torch.tensor([triton.cdiv(n, CHUNK) for n in numels], dtype=torch.int64)
        tensor = torch.repeat_interleave(torch.arange(len(numels)), chunks)
        first = torch.cumsum(chunks, 0) - chunks  # first program of each tensor
        chunk = torch.arange(tensor.numel()) - first[tensor]
        found = (tensor.to(torch.int32).to(device), chunk.to(torch.int32).to(device))
        if len(_BLOCK_MAPS) >= _MAX_BLOCK_MAPS:
            _BLOCK_MAPS.pop(next(iter(_BLOCK_MAPS)))
        _BLOCK_MAPS[key] = found
    return found


def _table(rows, dtype, device) -> torch.Tensor:
    if device.type == "cpu":
        return torch.tensor(rows, dtype=dtype)
    # built in pinned memory: the copy is queued behind the step's other work, no host wait
    return torch.tensor(rows, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def masked_adamw_step(params, grads, exp_avgs, exp_avg_sqs, *, masks, mask_kinds, steps,
                      index_offsets, streams, step_sizes, bc2_sqrts, beta1, beta2, eps, lr_wd,
                      seed, threshold, inv_p, action, paper):
    """Launcher: one kernel for the whole list; all tensors contiguous, on one device, params
    and grads of one dtype (float32, bfloat16 or float16)."""
    live = [i for i, p in enumerate(params) if p.numel() > 0]
    if not live:
        return
    device = params[live[0]].device
    rows = []  # the int64 table's columns, in order
    for i in live:
        kind = mask_kinds[i]
        words = masks[i] if kind == 2 else params[i]
        rows.append((params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(),
                     exp_avg_sqs[i].data_ptr(), words.data_ptr(), params[i].numel(),
                     index_offsets[i], steps[i], streams[i], kind))
    int_table = _table(rows, torch.int64, device)
    float_table = _table([(step_sizes[i], bc2_sqrts[i]) for i in live], torch.float32, device)
    block_tensor, block_chunk = _block_map([params[i].numel() for i in live], device)
    masked_adamw_multi_kernel[(block_tensor.numel(),)](
        int_table, float_table, block_tensor, block_chunk, seed & 0xFFFFFFFF, seed >> 32,
        threshold, inv_p, beta1, beta2, 1.0 - beta1, 1.0 - beta2, eps, lr_wd, 1.0 - lr_wd,
        DTYPE=_DTYPES[params[live[0]].dtype], ACTION=action, PAPER=paper, BLOCK=BLOCK,
        TILES=TILES, N_INT=N_INT, N_FLOAT=N_FLOAT, num_warps=4)
