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

Capturable (torch.optim.AdamW's capturable=True): column 7 holds the address of the tensor's
0-d float32 step count instead of its value, lr is read through a pointer, and each program
computes the bias corrections in float64 from the step (beta^t by squaring over the step's 32
bits, exact to a few float64 ulps). The int64 table is then made of addresses and constants
only, so it is built once per list of tensors and kept on the device: a step copies nothing from
the host and can be captured in a CUDA graph.
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
    lr_ptr,  # capturable: the 0-d learning rate tensor (else unused)
    consts_ptr,  # capturable: float64 [beta1, beta2, weight_decay] (else unused)
    DTYPE: tl.constexpr,  # parameter and gradient dtype
    ACTION: tl.constexpr,  # 0 drop grad, 1 drop update, 2 prune
    PAPER: tl.constexpr,  # official ChildTuning/HF order, else torch.optim.AdamW's
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
    N_INT: tl.constexpr,  # row lengths of the two tables
    N_FLOAT: tl.constexpr,
    CAPTURABLE: tl.constexpr,  # steps and lr read from device tensors
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
    stream = tl.load(row + 8).to(tl.uint32)
    kind = tl.load(row + 9)
    if CAPTURABLE:
        step_count = tl.load(tl.load(row + 7).to(tl.pointer_type(tl.float32))).to(tl.int64)
        step = step_count.to(tl.uint32)
        b1 = tl.load(consts_ptr + 0)
        b2 = tl.load(consts_ptr + 1)
        lr = tl.load(lr_ptr).to(tl.float64)
        pow1 = b1 * 0.0 + 1.0
        pow2 = pow1
        e = step_count
        for _ in tl.static_range(32):
            odd = (e & 1) != 0
            pow1 = tl.where(odd, pow1 * b1, pow1)
            pow2 = tl.where(odd, pow2 * b2, pow2)
            b1 = b1 * b1
            b2 = b2 * b2
            e = e >> 1
        bc1 = 1.0 - pow1
        bc2 = 1.0 - pow2
        if PAPER:
            step_size = (lr * tl.sqrt(bc2) / bc1).to(tl.float32)
            bc2_sqrt = 1.0
        else:
            step_size = (lr / bc1).to(tl.float32)
            bc2_sqrt = tl.sqrt(bc2).to(tl.float32)
        lr_wd64 = lr * tl.load(consts_ptr + 2)
        lr_wd = lr_wd64.to(tl.float32)
        decay = (1.0 - lr_wd64).to(tl.float32)
    else:
        step = tl.load(row + 7).to(tl.uint32)
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


# capturable launches: (device, rows) -> the int64 table, (device, constants) -> float64
# constants; kept on the device so that a captured step copies nothing from the host
_DEVICE_TABLES: Dict[Tuple, torch.Tensor] = {}
_MAX_DEVICE_TABLES = 64


def _cached(key, make) -> torch.Tensor:
    found = _DEVICE_TABLES.get(key)
    if found is None:
        found = make()
        if len(_DEVICE_TABLES) >= _MAX_DEVICE_TABLES:
            _DEVICE_TABLES.pop(next(iter(_DEVICE_TABLES)))
        _DEVICE_TABLES[key] = found
    return found


def _table(rows, dtype, device) -> torch.Tensor:
    if device.type != "cuda":  # the CPU (interpreter), or meta (the sm_90 check's dry run)
        return torch.tensor(rows, dtype=dtype, device=device)
    # built in pinned memory: the copy is queued behind the step's other work, no host wait
    return torch.tensor(rows, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def masked_adamw_step(params, grads, exp_avgs, exp_avg_sqs, *, masks, mask_kinds, steps,
                      index_offsets, streams, step_sizes, bc2_sqrts, beta1, beta2, eps, lr_wd,
                      seed, threshold, inv_p, action, paper, capturable=None):
    """Launcher: one kernel for the whole list; all tensors contiguous, on one device, params
    and grads of one dtype (float32, bfloat16 or float16).

    capturable: None, or (lr, beta1, beta2, weight_decay) with lr a 0-d tensor on the device;
    then steps are 0-d float32 step tensors on the device and step_sizes, bc2_sqrts, lr_wd are
    unused (the kernel computes them)."""
    live = [i for i, p in enumerate(params) if p.numel() > 0]
    if not live:
        return
    device = params[live[0]].device
    rows = []  # the int64 table's columns, in order
    for i in live:
        kind = mask_kinds[i]
        words = masks[i] if kind == 2 else params[i]
        step = steps[i].data_ptr() if capturable is not None else steps[i]
        rows.append((params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(),
                     exp_avg_sqs[i].data_ptr(), words.data_ptr(), params[i].numel(),
                     index_offsets[i], step, streams[i], kind))
    if capturable is None:
        int_table = _table(rows, torch.int64, device)
        float_table = _table([(step_sizes[i], bc2_sqrts[i]) for i in live], torch.float32,
                             device)
        lr, consts = int_table, float_table  # unused by the kernel
    else:
        lr, b1, b2, weight_decay = capturable
        int_table = _cached((str(device), tuple(rows)),
                            lambda: _table(rows, torch.int64, device))
        consts = _cached((str(device), b1, b2, weight_decay), lambda: torch.tensor(
            [b1, b2, weight_decay], dtype=torch.float64).to(device))
        float_table = consts  # unused by the kernel
        lr_wd = 0.0
    block_tensor, block_chunk = _block_map([params[i].numel() for i in live], device)
    masked_adamw_multi_kernel[(block_tensor.numel(),)](
        int_table, float_table, block_tensor, block_chunk, seed & 0xFFFFFFFF, seed >> 32,
        threshold, inv_p, beta1, beta2, 1.0 - beta1, 1.0 - beta2, eps, lr_wd, 1.0 - lr_wd,
        lr, consts, DTYPE=_DTYPES[params[live[0]].dtype], ACTION=action, PAPER=paper,
        BLOCK=BLOCK, TILES=TILES, N_INT=N_INT, N_FLOAT=N_FLOAT,
        CAPTURABLE=capturable is not None, num_warps=4)
