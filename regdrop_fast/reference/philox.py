"""Philox4x32-10 in torch int64 arithmetic emulating uint32 (the RNG contract's reference).

Key = (seed low 32, seed high 32); counter = (c0, c1, c2, c3); Triton's constants, so the
words equal tl.randint4x's. For element i of stream s at step t the counter is
(i//4 low 32, i//4 high 32, t, s) and the element takes output word i % 4.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
N_ROUNDS = 10


def _mul_hi_lo(a: int, b: torch.Tensor):
    """High and low 32 bits of the 64-bit product of constant `a` and uint32 values `b`.

    a*b can reach 2^64 and overflow int64, so b is split into 16-bit halves: each partial
    product stays below 2^48."""
    b_hi = b >> 16
    b_lo = b & 0xFFFF
    part_hi = a * b_hi
    part_lo = a * b_lo
    hi = (part_hi + (part_lo >> 16)) >> 16
    lo = ((part_hi << 16) + part_lo) & MASK32
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, n_rounds: int = N_ROUNDS):
    """Philox rounds on int64 tensors holding uint32 values; returns the 4 output words."""
    for _ in range(n_rounds):
        hi_b, lo_b = _mul_hi_lo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def philox_words(seed: int, index: torch.Tensor, step: int = 0, stream: int = 0) -> torch.Tensor:
    """uint32 word (held in int64) for each global element index (int64, >= 0)."""
    index = index.to(torch.int64)
    counter = index >> 2
    c0 = counter & MASK32
    c1 = counter >> 32
    c2 = torch.full_like(index, step)
    c3 = torch.full_like(index, stream)
    w0, w1, w2, w3 = philox4x32(c0, c1, c2, c3, seed & MASK32, (seed >> 32) & MASK32)
    lane = index & 3
    return torch.where(lane == 0, w0, torch.where(lane == 1, w1, torch.where(lane == 2, w2, w3)))
