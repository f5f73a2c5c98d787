"""Philox4x32-10 in Triton, the device side of the RNG contract (../shared/DESIGN.md).

`philox_word(seed_lo, seed_hi, index, step, stream)` is the @triton.jit function kernels call:
for int64 global element indices it returns the uint32 word the contract assigns to each
element, identical to regdrop_fast.reference.philox and csrc/philox.h. Counter =
(index//4 low, index//4 high, step, stream); word index % 4. With step = stream = 0 it equals
tl.randint4x(seed, index // 4) (Triton >= 3.4 splits 64-bit offsets the same way).

`philox_words_kernel` writes the words of a flat index tensor: 8 B read + 8 B written per
element, grid = cdiv(n, BLOCK).
"""
import torch
import triton
import triton.language as tl

from .utils import calculate_settings

PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
PHILOX_KEY_B = tl.constexpr(0xBB67AE85)
PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)


@triton.jit
def philox4x32(c0, c1, c2, c3, k0, k1):
    """10 Philox rounds on uint32 counters and key; returns the four uint32 output words."""
    for _ in tl.static_range(10):
        _c0 = c0
        _c2 = c2
        c0 = tl.umulhi(PHILOX_ROUND_B, _c2) ^ c1 ^ k0
        c2 = tl.umulhi(PHILOX_ROUND_A, _c0) ^ c3 ^ k1
        c1 = _c2 * PHILOX_ROUND_B
        c3 = _c0 * PHILOX_ROUND_A
        k0 = k0 + PHILOX_KEY_A
        k1 = k1 + PHILOX_KEY_B
    return c0, c1, c2, c3


@triton.jit
def philox_word(seed_lo, seed_hi, index, step, stream):
    """uint32 word of the RNG contract for int64 global indices `index` (a block)."""
    counter = index.to(tl.int64) >> 2
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    zero = c0 * 0
    c2 = zero + tl.cast(step, tl.uint32)
    c3 = zero + tl.cast(stream, tl.uint32)
    k0 = tl.cast(seed_lo, tl.uint32)
    k1 = tl.cast(seed_hi, tl.uint32)
    w0, w1, w2, w3 = philox4x32(c0, c1, c2, c3, k0, k1)
    lane = index & 3
    return tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))


@triton.jit
def philox_words_kernel(
    index_ptr,  # int64 [n] global element indices
    out_ptr,  # int64 [n] output words (uint32 values)
    n,  # number of indices
    seed_lo, seed_hi,  # the 64-bit seed as two uint32 halves
    step, stream,  # counter words 2 and 3
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    index = tl.load(index_ptr + offs, mask=valid, other=0)
    word = philox_word(seed_lo, seed_hi, index, step, stream)
    tl.store(out_ptr + offs, word.to(tl.int64), mask=valid)


def philox_words(seed: int, index: torch.Tensor, step: int, stream: int) -> torch.Tensor:
    """Launcher: `index` a contiguous int64 tensor; returns int64 words of the same shape."""
    flat = index.reshape(-1)
    out = torch.empty_like(flat)
    n = flat.numel()
    if n == 0:
        return out.reshape(index.shape)
    block, num_warps = calculate_settings(min(n, 1024))
    grid = (triton.cdiv(n, block),)
    philox_words_kernel[grid](flat, out, n, seed & 0xFFFFFFFF, seed >> 32, step, stream,
                              BLOCK=block, num_warps=num_warps)
    return out.reshape(index.shape)


@triton.jit
def philox_keep_kernel(
    out_ptr,  # uint8 [n]: a bool tensor viewed as bytes
    n,  # elements
    offset,  # global index of element 0 in its stream
    seed_lo, seed_hi,  # the 64-bit seed as two uint32 halves
    step, stream,  # counter words 2 and 3
    threshold,  # int64 floor(keep_prob * 2^32): keep iff word < threshold
    BLOCK: tl.constexpr,  # Philox counters (4 elements each) per program
):
    """Keep decisions without an index or word tensor: one Philox block per 4 elements, 1 B
    written per element; grid = cdiv(counters spanned, BLOCK)."""
    counter = (offset >> 2) + tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    zero = c0 * 0
    w0, w1, w2, w3 = philox4x32(c0, c1, zero + tl.cast(step, tl.uint32),
                                zero + tl.cast(stream, tl.uint32), tl.cast(seed_lo, tl.uint32),
                                tl.cast(seed_hi, tl.uint32))
    first = counter * 4 - offset  # local position of lane 0
    for lane in tl.static_range(4):
        word = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
        pos = first + lane
        keep = word.to(tl.int64) < threshold
        tl.store(out_ptr + pos, keep.to(tl.uint8), mask=(pos >= 0) & (pos < n))


def philox_keep(n: int, offset: int, seed: int, step: int, stream: int, threshold: int,
                device) -> torch.Tensor:
    """Launcher: bool [n] keep decisions of elements offset .. offset+n-1."""
    out = torch.empty(n, dtype=torch.bool, device=device)
    if n == 0:
        return out
    counters = ((offset + n + 3) >> 2) - (offset >> 2)
    block, num_warps = calculate_settings(min(counters, 1024))
    grid = (triton.cdiv(counters, block),)
    philox_keep_kernel[grid](out.view(torch.uint8), n, offset, seed & 0xFFFFFFFF, seed >> 32, step,
                             stream, threshold, BLOCK=block, num_warps=num_warps)
    return out
