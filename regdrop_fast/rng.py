"""The Philox RNG contract, public side: `philox_words` and the keep decision.

Element i of stream s at step t draws the uint32 word `philox_words(seed, i, t, s)`; it is
kept with probability p iff word < floor(p * 2^32) (an integer compare: no float rounding, so
every backend decides the same). Indices are global (int64), so a tensor split into chunks,
shards or ranks draws the same bits as the whole.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backends
from ._checks import (UINT32_MAX, UINT64_MAX, check_int, check_prob, check_tensor,
                      keep_threshold, split_seed)
from .reference import philox as _ref

__all__ = ["philox_words", "keep_threshold", "keep_mask_from_words", "bernoulli_keep"]

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def philox_words(seed: int, index: torch.Tensor, step: int = 0, stream: int = 0,
                 backend: Optional[str] = None) -> torch.Tensor:
    """uint32 Philox words (as int64) for the global element indices `index`.

    seed in [0, 2^64), step and stream in [0, 2^32), index an integer tensor of non-negative
    global indices (any shape, any strides). Returns an int64 tensor shaped like `index`."""
    seed = check_int("seed", seed, 0, UINT64_MAX)
    step = check_int("step", step, 0, UINT32_MAX)
    stream = check_int("stream", stream, 0, UINT32_MAX)
    check_tensor("index", index, dtypes=_INT_DTYPES)
    index = index.to(torch.int64).contiguous()
    # a negative index would silently draw the words of index + 2^64: checked on every device
    # (one host sync on a GPU; the kernels' hot paths compute their indices and skip this)
    if index.numel() and int(index.min()) < 0:
        raise ValueError(f"index must be non-negative global element indices, got min "
                         f"{int(index.min())}")
    name = backends.resolve("philox_words", backend, index.device)
    if name == "reference":
        return _ref.philox_words(seed, index, step, stream)
    if name == "triton":
        from .triton_kernels import philox as _tk
        return _tk.philox_words(seed, index, step, stream)
    backends.extension()
    seed_lo, seed_hi = split_seed(seed)
    return torch.ops.regdrop_fast.philox_words(index, seed_lo, seed_hi, step, stream)


def keep_mask_from_words(words: torch.Tensor, keep_prob: float) -> torch.Tensor:
    """bool keep decisions: word < floor(keep_prob * 2^32)."""
    return words < keep_threshold(keep_prob)


def bernoulli_keep(shape, keep_prob: float, seed: int, step: int = 0, stream: int = 0,
                   offset: int = 0, device="cpu", backend: Optional[str] = None) -> torch.Tensor:
    """bool keep mask of `shape` for elements offset .. offset+numel-1 of a stream."""
    keep_prob = check_prob("keep_prob", keep_prob, low_open=False, high_open=False)
    seed = check_int("seed", seed, 0, UINT64_MAX)
    step = check_int("step", step, 0, UINT32_MAX)
    stream = check_int("stream", stream, 0, UINT32_MAX)
    offset = check_int("offset", offset, 0, 2**62)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    for size in shape:
        check_int("shape", size, 0, 2**62)
    shape = tuple(int(size) for size in shape)
    numel = 1
    for size in shape:
        numel *= size
    device = torch.device(device)
    threshold = keep_threshold(keep_prob)
    name = backends.resolve("bernoulli_keep", backend, device)
    if name == "reference":
        index = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
        keep = keep_mask_from_words(_ref.philox_words(seed, index, step, stream), keep_prob)
    elif name == "triton":
        from .triton_kernels import philox as _tk
        keep = _tk.philox_keep(numel, offset, seed, step, stream, threshold, device)
    else:
        backends.extension()
        keep = torch.empty(numel, dtype=torch.bool, device=device)
        seed_lo, seed_hi = split_seed(seed)
        torch.ops.regdrop_fast.philox_keep_(keep, offset, seed_lo, seed_hi, step, stream,
                                            threshold)
    return keep.reshape(shape)
