"""Argument checks shared by the public ops: each error names the argument, what was expected
and what was given (ValueError for bad values, TypeError for bad types)."""
from __future__ import annotations

import numbers

import torch

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1


def check_int(name: str, value, low: int, high: int) -> int:
    """A Python/numpy/0-d tensor integer in [low, high]."""
    if type(value) is int and low <= value <= high:  # the per-call common case, checked first
        return value
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer, got a {value.dtype} tensor of shape "
                            f"{tuple(value.shape)}")
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def check_prob(name: str, value, *, low_open: bool, high_open: bool) -> float:
    """A probability in the interval (or closed interval) from 0 to 1."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    ok_low = value > 0.0 if low_open else value >= 0.0
    ok_high = value < 1.0 if high_open else value <= 1.0
    if not (ok_low and ok_high):
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def check_tensor(name: str, value, *, dtypes=None, ndim=None, device=None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {value.dtype}")
    if ndim is not None and value.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if device is not None and value.device != torch.device(device):
        raise ValueError(f"{name} must be on {device}, got {value.device}")
    return value


def keep_threshold(prob: float) -> int:
    """floor(prob * 2^32): a uint32 word w keeps its element iff w < keep_threshold(keep_prob).

    prob = 1 gives 2^32, which every word is below: a keep probability of 1 always keeps."""
    return int(prob * 4294967296.0)


def split_seed(seed: int) -> tuple:
    """The Philox key of a 64-bit seed: (low 32 bits, high 32 bits), as every kernel takes it."""
    return seed & UINT32_MAX, seed >> 32
