"""Bit-packed masks in pure PyTorch (reference).

Format (../shared/DESIGN.md, "Mask formats"): int32 words along the last dimension; bit j of
word w is element 32*w + j (little-endian); 1 = keep; bits past the end of the row are 0.
"""
from __future__ import annotations

import torch

_SHIFTS = torch.arange(32, dtype=torch.int64)


def num_words(n: int) -> int:
    return (n + 31) // 32


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [..., n] -> int32 [..., ceil(n/32)]."""
    n = mask.shape[-1]
    words = num_words(n)
    padded = torch.zeros(*mask.shape[:-1], words * 32, dtype=torch.int64, device=mask.device)
    padded[..., :n] = mask.to(torch.int64)
    bits = padded.view(*mask.shape[:-1], words, 32) << _SHIFTS.to(mask.device)
    value = bits.sum(-1)
    # reinterpret uint32 as int32 (two's complement) explicitly, not through a narrowing cast
    return torch.where(value >= 2**31, value - 2**32, value).to(torch.int32)


def unpack_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    """int32 [..., W] -> bool [..., n], n <= 32*W."""
    value = words.to(torch.int64) & 0xFFFFFFFF
    bits = (value.unsqueeze(-1) >> _SHIFTS.to(words.device)) & 1
    return bits.reshape(*words.shape[:-1], words.shape[-1] * 32)[..., :n].to(torch.bool)


def popcount(words: torch.Tensor) -> int:
    """Number of set bits in all words."""
    value = words.to(torch.int64) & 0xFFFFFFFF
    bits = (value.unsqueeze(-1) >> _SHIFTS.to(words.device)) & 1
    return int(bits.sum())
