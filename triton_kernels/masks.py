"""Bit packing of bool masks in Triton (format: ../shared/DESIGN.md, "Mask formats").

pack_bits_kernel: grid (rows, cdiv(W, BLOCK_W)); each program reads BLOCK_W*32 bytes of one
row and writes BLOCK_W int32 words (1 B read + 1/8 B written per element).
unpack_bits_kernel: grid (rows, cdiv(n, BLOCK)); reads the words (cached), writes 1 B/element.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def pack_bits_kernel(
    mask_ptr,  # uint8 [rows, n] (a bool tensor viewed as bytes), row stride n
    words_ptr,  # int32 [rows, W]
    n,  # elements per row
    n_words,  # W = cdiv(n, 32)
    BLOCK_W: tl.constexpr,  # words per program
):
    row = tl.program_id(0).to(tl.int64)
    word_offs = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    bit = tl.arange(0, 32)
    elem = word_offs[:, None] * 32 + bit[None, :]
    bits = tl.load(mask_ptr + row * n + elem, mask=elem < n, other=0).to(tl.int32)
    # distinct bits never carry, so the sum is the bitwise OR (bit 31 wraps to the sign bit)
    words = tl.sum(bits << bit[None, :], axis=1)
    tl.store(words_ptr + row * n_words + word_offs, words, mask=word_offs < n_words)


@triton.jit
def unpack_bits_kernel(
    words_ptr,  # int32 [rows, W]
    out_ptr,  # uint8 [rows, n] (a bool tensor viewed as bytes)
    n,  # elements per row
    n_words,  # W
    BLOCK: tl.constexpr,  # elements per program
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    words = tl.load(words_ptr + row * n_words + offs // 32, mask=valid, other=0)
    bits = (words >> (offs % 32)) & 1
    tl.store(out_ptr + row * n + offs, bits.to(tl.uint8), mask=valid)


def pack_bits(mask2d: torch.Tensor) -> torch.Tensor:
    """bool [rows, n] contiguous -> int32 [rows, cdiv(n, 32)]."""
    rows, n = mask2d.shape
    n_words = triton.cdiv(n, 32)
    words = torch.empty(rows, n_words, dtype=torch.int32, device=mask2d.device)
    if rows == 0 or n_words == 0:
        return words
    block_w = min(triton.next_power_of_2(n_words), 64)
    grid = (rows, triton.cdiv(n_words, block_w))
    pack_bits_kernel[grid](mask2d.view(torch.uint8), words, n, n_words, BLOCK_W=block_w)
    return words


def unpack_bits(words2d: torch.Tensor, n: int) -> torch.Tensor:
    """int32 [rows, W] contiguous -> bool [rows, n]."""
    rows, n_words = words2d.shape
    out = torch.empty(rows, n, dtype=torch.bool, device=words2d.device)
    if rows == 0 or n == 0:
        return out
    block = min(triton.next_power_of_2(n), 2048)
    grid = (rows, triton.cdiv(n, block))
    unpack_bits_kernel[grid](words2d, out.view(torch.uint8), n, n_words, BLOCK=block)
    return out
